"""The graph-friendly baseline step computes the same function as the eager model."""

from __future__ import annotations

from pytest_amk.bench import StaticStep, floor_us, format_table
from pytest_amk.models import load_model


def test_static_step_matches_eager_for_several_positions() -> None:
    model = load_model("toy-4L", "fp32", 0, 32)
    step = StaticStep(model, device="cpu")
    token = 3
    for pos in range(5):
        ref = model.step(token, pos)
        step.token.fill_(token)
        step.pos.fill_(pos)
        got = step()
        assert (got - ref).abs().max() < 1e-4
        token = int(ref.argmax())


def test_floor_and_table() -> None:
    assert floor_us(3_000_000, 0, 3000.0) == 1.0
    table = format_table([("megakernel", 2.0, ""), ("x", None, "failed")], 1.0)
    assert "50.0" in table and "failed" in table
