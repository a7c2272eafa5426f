"""Memory-safety checks the GPU runner always makes before a launch.

The static validator (validate.py) proves a program deadlock and race free; this
module only makes sure the VM, following each task's params, stays inside the
buffers it was given, with the dtypes the kernel was built for. An out-of-bounds
access would poison the CUDA context for the whole process, so these checks are
never skipped, not even for fault-injection programs. Plain Python, no torch.
"""

from __future__ import annotations

from typing import Any

from pytest_amk import ir

MAX_HEAD_DIM = ir.MAX_HEAD_DIM
INT32_MAX = 2**31 - 1


def _extents(op: str, p: dict[str, Any]) -> tuple[list[tuple[str, int, int]], list[str]]:
    """(param, lo, hi) element ranges the VM touches for this task (ir.footprint, the one
    definition of each opcode's footprint), and the limits of this VM's build."""
    errs: list[str] = []
    try:
        fp = ir.footprint(op, p)
    except ValueError as e:
        return [], [str(e)]
    rng = [(name, lo, hi) for name, _, lo, hi in fp if not (p.get(name) == ir.NO_BUFFER)]
    if op == "RMSNORM" and not (p["n"] >= 1 and p["hi"] <= p["n"]):
        errs.append(f"n={p['n']} must be >= 1 and >= hi={p['hi']}")
    elif op in ("GEMV", "LM_HEAD") and p["k"] < 1:
        errs.append(f"k={p['k']} must be >= 1")
    elif op in ir.HEAD_OPS and not 2 <= p["head_dim"] <= MAX_HEAD_DIM:
        errs.append(f"head_dim={p['head_dim']} outside [2, {MAX_HEAD_DIM}] (AMK_MAX_HEAD_DIM of the VM)")
    elif op == "ATTN_COMBINE" and (p["n_blocks"] < 1 or p["head_dim"] < 1):
        errs.append(f"n_blocks={p['n_blocks']} and head_dim={p['head_dim']} must be >= 1")
    elif op == "ARGMAX" and p["n_tiles"] < 1:
        errs.append(f"n_tiles={p['n_tiles']} must be >= 1")
    elif op == "EMBED" and p["hidden"] < 1:
        errs.append(f"hidden={p['hidden']} must be >= 1")
    return rng, errs


def check_program(program: ir.Program) -> list[str]:
    """Errors that make the program unsafe to launch (empty list: safe to launch)."""
    errors: list[str] = []
    dtype = str(program.meta.get("dtype", "bf16"))
    if dtype not in ("fp32", "fp16", "bf16"):
        return [f"meta.dtype={dtype!r} is not a model dtype"]
    bufs = {b.id: b for b in program.buffers}
    if len(bufs) != len(program.buffers) or any(b.id < 0 for b in program.buffers):
        errors.append("buffer ids must be unique and non-negative")
    counter_ids = {c.id for c in program.counters}
    n_sms = program.num_sms
    for t in program.tasks:
        where = f"task {t.id} ({t.op})"
        spec = ir.OPS_BY_NAME.get(t.op)
        if spec is None:
            errors.append(f"{where}: unknown opcode")
            continue
        if not 0 <= t.sm < n_sms:
            errors.append(f"{where}: sm {t.sm} outside [0, {n_sms})")
        if len(t.waits) > ir.MAX_WAITS:
            errors.append(f"{where}: {len(t.waits)} waits, an instruction holds {ir.MAX_WAITS}")
        for w in t.waits:
            if w.counter not in counter_ids or not 0 <= w.threshold <= INT32_MAX:
                errors.append(f"{where}: wait on counter {w.counter} >= {w.threshold} is malformed")
        if t.signal is not None and t.signal not in counter_ids:
            errors.append(f"{where}: signal counter {t.signal} does not exist")
        p = dict(t.params)
        missing = [name for name in spec.params if name not in p and name not in spec.optional]
        if missing:
            errors.append(f"{where}: missing params {missing}")
            continue
        for name in spec.optional:
            p.setdefault(name, ir.NO_BUFFER)
        ints = {k: v for k, v in p.items() if k in spec.params and k not in spec.float_params}
        if any(not isinstance(v, int) or isinstance(v, bool) or abs(v) > INT32_MAX for v in ints.values()):
            errors.append(f"{where}: integer params must be int32: {ints}")
            continue
        for name in spec.buffer_params:
            bid = p[name]
            if bid == ir.NO_BUFFER and name in spec.optional:
                continue
            buf = bufs.get(bid)
            if buf is None:
                errors.append(f"{where}: {name}={bid} is not a buffer")
                continue
            want = ir.buffer_dtype(t.op, name, p, ir.DType(dtype)).value
            if buf.dtype.value != want:
                errors.append(f"{where}: {name} is buffer {buf.name!r} of {buf.dtype.value}, the VM reads {want}")
        if any(e.startswith(where) for e in errors):
            continue
        ranges, perrs = _extents(t.op, p)
        errors += [f"{where}: {e}" for e in perrs]
        for name, lo, hi in ranges:
            buf = bufs[p[name]]
            if not 0 <= lo <= hi <= buf.numel:
                errors.append(f"{where}: {name} range [{lo}, {hi}) outside buffer {buf.name!r} "
                              f"of {buf.numel} elements")
    return errors


def input_limits(program: ir.Program) -> tuple[int | None, int | None]:
    """(vocab, max_seq) the runtime inputs must respect: token < vocab, pos < max_seq."""
    bufs = {b.id: b for b in program.buffers}
    vocab = [bufs[t.params["table"]].numel // max(1, t.params["hidden"]) for t in program.tasks if t.op == "EMBED"]
    seqs = [t.params["max_seq"] for t in program.tasks if t.op in ir.HEAD_OPS]
    return (min(vocab) if vocab else None, min(seqs) if seqs else None)
