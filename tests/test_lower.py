"""Lowering: every knob changes the program; projections spread over all SMs."""

from __future__ import annotations

import hashlib
import json

import pytest

from pytest_amk.ir import TARGETS, Program
from pytest_amk.lower import LoweringError, lower
from pytest_amk.models import config_for
from pytest_amk.schedule import KNOBS, default_knobs


def program_hash(p: Program) -> str:
    """Hash of what the kernel executes: tasks, buffers, counters and the kernel-build
    settings; the knob record in meta is left out so the test cannot pass trivially."""
    d = p.to_json()
    d["meta"] = {k: v for k, v in d["meta"].items() if k != "knobs"}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def lower_small(**overrides: object) -> Program:
    knobs = default_knobs()
    knobs.update(overrides)
    return lower(config_for("toy-4L"), TARGETS["h100"], knobs, "bf16", 512)


FUSION_VARIANTS = [[], [["rmsnorm", "gemv"]], [["gemv", "residual_add"]], [["gemv", "silu_mul"]],
                   [["rope_append", "attn_partial"]], [["attn_combine", "gemv"]]]
# Knobs that shape a stage only some fusions keep: checked where that stage exists.
WHERE = {"tiling.attention.combine_heads": {"fusion": [["rmsnorm", "gemv"]]}}


@pytest.mark.parametrize("name", sorted(KNOBS))
def test_every_knob_value_changes_the_program(name: str) -> None:
    knob = KNOBS[name]
    values = FUSION_VARIANTS if name == "fusion" else [v for v in knob.choices if v != knob.default]
    assert values, f"knob {name} has no alternative value to search"
    where = WHERE.get(name, {})
    base = program_hash(lower_small(**where))
    seen = {base}
    for value in values:
        h = program_hash(lower_small(**(where | {name: value})))
        assert h not in seen, f"{name} = {value!r} emits the same program as another value"
        seen.add(h)


def test_projections_spread_over_all_sms() -> None:
    cfg = config_for("llama-3.2-1b-shape")
    p = lower(cfg, TARGETS["h100"], default_knobs(), "bf16", 512)
    gemv_sms: dict[int, set[int]] = {}
    for t in p.tasks:
        if t.op in ("GEMV", "LM_HEAD"):
            gemv_sms.setdefault(t.signal, set()).add(t.sm)
    assert gemv_sms and all(len(sms) == 132 for sms in gemv_sms.values())
    assert len(p.tasks) > 5000


def test_runtime_inputs_not_constants() -> None:
    p = lower_small()
    kinds = {b.name: b.kind.value for b in p.buffers}
    assert kinds["token"] == kinds["pos"] == kinds["seq_len"] == "input"
    # No task param carries a position or token value: only buffer ids of the inputs.
    ids = {p.buffer(n).id for n in ("token", "pos", "seq_len")}
    assert any(t.params.get("pos") in ids for t in p.tasks if t.op in ("ROPE_APPEND", "ROPE_ATTN_PARTIAL"))
    assert any(t.params.get("pos") in ids for t in lower_small(fusion=[]).tasks if t.op == "ROPE_APPEND")


def test_too_many_sms_is_a_lowering_error() -> None:
    with pytest.raises(LoweringError, match="132 SMs"):
        lower_small(sm_count=200)


def test_combine_heads_must_divide_heads() -> None:
    with pytest.raises(LoweringError, match="combine_heads"):
        lower_small(**{"tiling.attention.combine_heads": 3})


def test_json_round_trip() -> None:
    p = lower_small(fusion=[])
    q = Program.loads(p.dumps())
    assert q.digest() == p.digest()
    assert q.to_json() == p.to_json()


def test_tied_lm_head_reads_embedding() -> None:
    p = lower(config_for("toy"), TARGETS["h100"], default_knobs(), "bf16", 64)
    lm = [t for t in p.tasks if t.op == "LM_HEAD"]
    assert lm and all(t.params["weight"] == p.buffer("embed").id for t in lm)
    untied = lower(config_for("toy-4L"), TARGETS["h100"], default_knobs(), "bf16", 64)
    assert untied.buffer("lm_head")


def test_sync_skeleton_keeps_queues_waits_and_signals_only() -> None:
    from pytest_amk.validate import validate

    p = lower_small()
    s = p.sync_skeleton()
    assert [(t.id, t.sm, t.waits, t.signal) for t in s.tasks] == [(t.id, t.sm, t.waits, t.signal) for t in p.tasks]
    assert {t.op for t in s.tasks} == {"NOP"} and not any(t.reads or t.writes or t.params for t in s.tasks)
    assert any(t.op != "NOP" for t in p.tasks)  # the original is untouched
    # No deadlock or race; only the outputs are left unwritten (it computes nothing).
    assert {e.code for e in validate(s).errors} == {"unwritten-output"}


def test_without_waits_keeps_the_work_and_is_rejected_by_the_validator() -> None:
    from pytest_amk.gpu.checks import check_program
    from pytest_amk.validate import validate

    p = lower_small()
    w = p.without_waits()
    assert [(t.id, t.op, t.sm, t.reads, t.writes, t.signal, t.params) for t in w.tasks] == \
        [(t.id, t.op, t.sm, t.reads, t.writes, t.signal, t.params) for t in p.tasks]
    assert not any(t.waits for t in w.tasks) and any(t.waits for t in p.tasks)  # the original keeps its own
    assert check_program(w) == []  # still memory-safe to launch (timing only) ...
    assert "race" in {e.code for e in validate(w).errors}  # ... but never a program the pipeline runs


def dependent_levels(p: Program) -> int:
    """The longest chain of stages, each waiting for the one before."""
    producers: dict[int, list] = {}
    for t in p.tasks:
        producers.setdefault(t.signal, []).append(t)
    level: dict[int, int] = {}
    for t in p.tasks:  # waits only point to earlier stages, which come first in task order
        level[t.id] = 1 + max((level[q.id] for w in t.waits for q in producers.get(w.counter, [])), default=0)
    return max(level.values())


def test_stage_kind_is_the_counter_name_without_its_layer() -> None:
    from pytest_amk.lower import stage_kind

    assert [stage_kind(n) for n in ("layers.12.qkv", "layers.0.attn_combine", "x.4", "lm_head", "embed")] == \
        ["qkv", "attn_combine", "down", "lm_head", "embed"]


def test_bypass_stages_merges_each_bypassed_stage_with_its_readers() -> None:
    from pytest_amk.gpu.checks import check_program
    from pytest_amk.lower import bypass_stages, stage_kind
    from pytest_amk.validate import validate

    p = lower_small()
    layers = 4
    kind = {c.id: stage_kind(c.name) for c in p.counters}
    base = dependent_levels(p)
    b = bypass_stages(p, {"act"})
    assert [(t.id, t.op, t.sm, t.reads, t.writes, t.signal, t.params) for t in b.tasks] == \
        [(t.id, t.op, t.sm, t.reads, t.writes, t.signal, t.params) for t in p.tasks]
    assert dependent_levels(b) == base - layers  # one level fewer a layer: gate/up and down run as one
    for t, u in zip(p.tasks, b.tasks, strict=True):
        if kind[t.signal] == "down":  # down waited for its layer's act and h; now for h only (what act waited for)
            assert {kind[w.counter] for w in t.waits} == {"act", "h"}
            assert {kind[w.counter] for w in u.waits} == {"h"}
        else:
            assert u.waits == t.waits
    assert dependent_levels(p) == base  # the original is untouched
    # Chained: the O projection no longer waits for the attention nor its combine, but for what
    # the attention waited for (the qkv projection).
    c = bypass_stages(p, {"attn_partial", "attn_combine"})
    assert dependent_levels(c) == base - 2 * layers
    o_waits = {kind[w.counter] for t in c.tasks if kind[t.signal] == "h" for w in t.waits}
    assert o_waits == {"qkv", "down", "embed"}  # and its residual's producer, as before
    assert check_program(c) == []  # memory-safe to launch (timing only) ...
    assert "race" in {e.code for e in validate(c).errors}  # ... but never a program the pipeline runs
    with pytest.raises(ValueError, match="no stage of kind mlp; the kinds are act, argmax"):
        bypass_stages(p, {"mlp"})
