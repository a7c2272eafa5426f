"""The reference VM against eager PyTorch, for several decode steps in a row."""

from __future__ import annotations

import pytest
import torch

from pytest_amk import refvm
from pytest_amk.ir import TARGETS, Counter, Program, Task, Wait
from pytest_amk.lower import lower
from pytest_amk.models import load_model
from pytest_amk.oracle import compare_logits
from pytest_amk.schedule import default_knobs


def run_steps(model_id: str, dtype: str, steps: int, order_seed: int | None = None, **knobs: object) -> list:
    k = default_knobs()
    k.update(knobs)
    model = load_model(model_id, dtype, seed=3, max_seq=64)
    program = lower(model.cfg, TARGETS["h100"], k, dtype, 64)
    bufs = refvm.alloc_buffers(program, refvm.bind_weights(program, model))
    results = []
    token = 5
    for pos in range(steps):
        ref = model.step(token, pos)
        got = refvm.run_step(program, bufs, token, pos, order_seed)
        results.append(compare_logits(got, ref, dtype))
        assert int(bufs[program.buffer("next_token").id][0]) == int(got.argmax())
        token = int(ref.argmax())
    return results


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("fusion", ["all", "none"])
def test_multi_step_matches_eager(dtype: str, fusion: str) -> None:
    knobs = {} if fusion == "all" else {"fusion": []}
    for pos, cmp in enumerate(run_steps("toy", dtype, steps=6, **knobs)):
        assert cmp.ok, f"position {pos}: {cmp.message}"
    if dtype == "fp32":
        assert cmp.max_abs_err < 1e-4


def test_toy_4l_gqa_untied_multi_step() -> None:
    for cmp in run_steps("toy-4L", "bf16", steps=4, **{"tiling.attention.kv_block": 16}):
        assert cmp.ok, cmp.message


def test_random_task_orders_give_identical_results() -> None:
    a = run_steps("toy", "fp32", 3, order_seed=1, **{"tiling.attention.kv_block": 2})
    b = run_steps("toy", "fp32", 3, order_seed=2, **{"tiling.attention.kv_block": 2})
    assert [x.max_abs_err for x in a] == [x.max_abs_err for x in b]


def test_attention_spans_several_kv_blocks() -> None:
    # kv_block 2 with 6 positions: later steps combine three partial blocks.
    for cmp in run_steps("toy", "fp32", 6, **{"tiling.attention.kv_block": 2}):
        assert cmp.ok and cmp.max_abs_err < 1e-4, cmp.message


def test_wrong_kernel_is_caught() -> None:
    """A deliberately broken opcode must make the oracle fail (the check can fail)."""
    original = refvm.OPS_IMPL["SILU_MUL"]
    refvm.OPS_IMPL["SILU_MUL"] = lambda bufs, p: bufs[p["out"]].__setitem__(
        slice(p["lo"], p["hi"]), bufs[p["inp"]][p["lo"] : p["hi"]])
    try:
        results = run_steps("toy", "fp32", 2, fusion=[])
    finally:
        refvm.OPS_IMPL["SILU_MUL"] = original
    assert not any(c.ok for c in results)


def test_unwritten_read_poisons_logits() -> None:
    model = load_model("toy", "fp32", 0, 16)
    program = lower(model.cfg, TARGETS["h100"], default_knobs(), "fp32", 16)
    program.tasks = [t for t in program.tasks if t.op != "EMBED"]
    for t in program.tasks:
        t.waits = [w for w in t.waits if w.counter != 0]
    bufs = refvm.alloc_buffers(program, refvm.bind_weights(program, model))
    logits = refvm.run_step(program, bufs, 1, 0)
    assert not torch.isfinite(logits).all()


def test_deadlock_is_reported() -> None:
    # One task waiting on the counter only it signals: it can never start.
    program = Program(buffers=[], counters=[Counter(0, "self")], tasks=[
        Task(0, "NOP", 0, [], [], [Wait(0, 1)], 0, {}),
    ], meta={"num_sms": 1})
    with pytest.raises(refvm.RefVmDeadlock, match="task 0"):
        refvm.schedule_order(program)
