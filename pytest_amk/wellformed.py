"""Well-formedness checks for a task Program (step 1 of ``validate``, DESIGN §6).

Ids, ops and their params, regions inside their buffers and consistent with what
the op's params make it touch (``ir.footprint``), dtypes the ops require, SM ids,
threads and shared memory inside the target's limits; and the strict JSON shape
check used by ``validate_json``. Also holds the error collector, ``Result`` and
``ValidationError`` and the label helpers that ``validate`` shares; this module
never imports ``validate``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pytest_amk import ir
from pytest_amk.ir import (
    FIXED_DTYPES,
    Buffer,
    BufferKind,
    Counter,
    DType,
    GpuTarget,
    OpSpec,
    Program,
    Region,
    Task,
    Wait,
    buffer_dtype,
)

ERROR_CAP = 20  # errors shown per code; the rest are counted
MUTABLE = (BufferKind.ACTIVATION, BufferKind.KV, BufferKind.OUTPUT)

@dataclass(frozen=True)
class ValidationError:
    code: str  # malformed | bad-region | resource | unreachable-threshold | deadlock | race | ...
    message: str

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass
class Result:
    ok: bool
    errors: list[ValidationError] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    def codes(self) -> set[str]:
        return {e.code for e in self.errors}

    def summary(self) -> str:
        return "ok" if self.ok else "; ".join(map(str, self.errors[:5])) + (
            f" (+{len(self.errors) - 5} more)" if len(self.errors) > 5 else "")


class _Errors:
    def __init__(self) -> None:
        self.shown: list[ValidationError] = []
        self.count: dict[str, int] = {}
        self.seen: set[tuple[int, int, int]] = set()  # race pairs already shown

    def room(self, code: str) -> bool:
        return self.count.get(code, 0) < ERROR_CAP

    def add(self, code: str, message: str, n: int = 1) -> None:
        if self.room(code):
            self.shown.append(ValidationError(code, message))
        self.count[code] = self.count.get(code, 0) + n

    def result(self, stats: dict[str, Any]) -> Result:
        errors = list(self.shown)
        for code, n in self.count.items():
            if n > ERROR_CAP:
                errors.append(ValidationError(code, f"... and {n - ERROR_CAP} more {code} errors not shown"))
        stats["errors"] = dict(self.count)
        return Result(not errors, errors, stats)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _tl(t: Task) -> str:
    return f"task {t.id} ({t.op}, sm {t.sm})"


def _rl(b: Buffer, lo: int, hi: int) -> str:
    return f"{b.kind.value} '{b.name}'[{lo}:{hi})"


def _cl(c: Counter) -> str:
    return f"counter {c.id} '{c.name}'"


def _gaps(lo: int, hi: int, cover: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sub-ranges of [lo, hi) not covered by the union of ``cover``."""
    gaps, at = [], lo
    for a, b in sorted(cover):
        if a > at:
            gaps.append((at, min(a, hi)))
        at = max(at, b)
        if at >= hi:
            break
    if at < hi:
        gaps.append((at, hi))
    return [g for g in gaps if g[0] < g[1]]


# -- checks ---------------------------------------------------------------------------

def _check_params(t: Task, spec: OpSpec, nbuf: int, E: _Errors) -> dict[str, Any] | None:
    """The params with optional ids defaulted, or None when some are unusable."""
    if not isinstance(t.params, dict):
        E.add("malformed", f"{_tl(t)}: params must be a dict, got {type(t.params).__name__}")
        return None
    p, ok = dict(t.params), True
    for extra in sorted(set(map(str, p)) - set(spec.params)):
        E.add("malformed", f"{_tl(t)}: unknown param {extra!r}; {spec.name} takes {', '.join(spec.params)}")
        ok = False
    for name in spec.params:
        v = p.setdefault(name, -1) if name in spec.optional else p.get(name)
        if v is None:
            E.add("malformed", f"{_tl(t)}: missing param {name!r}")
            ok = False
        elif name in spec.float_params:
            if not (isinstance(v, float | int) and not isinstance(v, bool) and math.isfinite(v)):
                E.add("malformed", f"{_tl(t)}: param {name!r} must be a finite number, got {v!r}")
                ok = False
        elif not _is_int(v) or not -(1 << 31) <= v < 1 << 31:
            E.add("malformed", f"{_tl(t)}: param {name!r} must be an int32, got {v!r}")
            ok = False
        elif name in spec.buffer_params and not (0 <= v < nbuf or (v == -1 and name in spec.optional)):
            E.add("malformed", f"{_tl(t)}: param {name!r} = {v} is not a buffer id (0..{nbuf - 1})")
            ok = False
    return p if ok else None


def _check_footprint(t: Task, p: dict[str, Any], bufs: list[Buffer], E: _Errors) -> None:
    """Declared regions must cover what the params make the op read and write, and
    declared writes must not exceed what it writes (output/init checks rely on them)."""
    try:
        fp = ir.footprint(t.op, p)
    except ValueError as e:
        E.add("malformed", f"{_tl(t)}: {e}")
        return
    for (op, name), dt in FIXED_DTYPES.items():
        if op == t.op and p[name] >= 0 and bufs[p[name]].dtype is not dt:
            b = bufs[p[name]]
            E.add("malformed", f"{_tl(t)}: param {name!r} is {b.kind.value} '{b.name}' of dtype "
                               f"{b.dtype.value}; {op} needs {dt.value}")
    if t.op == "GEMV" and p["inp"] >= 0 and p["weight"] >= 0:
        want = buffer_dtype("GEMV", "inp", p, bufs[p["weight"]].dtype)  # the weight's, or fp32 partials
        if bufs[p["inp"]].dtype is not want:
            b = bufs[p["inp"]]
            E.add("malformed", f"{_tl(t)}: param 'inp' is '{b.name}' of dtype {b.dtype.value}; GEMV with "
                               f"inp_blocks = {p['inp_blocks']} needs {want.value}")
    declared: dict[str, dict[int, list[tuple[int, int]]]] = {"r": {}, "w": {}}
    for rw, regions in (("r", t.reads), ("w", t.writes)):
        for r in regions:
            declared[rw].setdefault(r.buffer, []).append((r.lo, r.hi))
    implied_w: dict[int, list[tuple[int, int]]] = {}
    for name, rw, lo, hi in fp:
        bid = p[name]
        if lo >= hi or bid < 0:
            continue
        b, verb = bufs[bid], "read" if rw == "r" else "write"
        if lo < 0 or hi > b.numel:
            E.add("bad-region", f"{_tl(t)}: its params ({name} = {bid}) make it {verb} {_rl(b, lo, hi)}, "
                                f"outside the buffer's {b.numel} elements")
            continue
        if rw == "w":
            implied_w.setdefault(bid, []).append((lo, hi))
            if b.kind not in MUTABLE:
                E.add("bad-region", f"{_tl(t)}: param {name!r} makes it write {b.kind.value} '{b.name}', "
                                    f"which is read-only")
        if b.kind in MUTABLE:
            for g in _gaps(lo, hi, declared[rw].get(bid, [])):
                E.add("bad-region", f"{_tl(t)}: its params ({name} = {bid}) make it {verb} {_rl(b, lo, hi)} "
                                    f"but its declared {verb}s do not cover [{g[0]}:{g[1]})")
    for r in t.writes:
        if bufs[r.buffer].kind in MUTABLE:
            for g in _gaps(r.lo, r.hi, implied_w.get(r.buffer, [])):
                E.add("bad-region", f"{_tl(t)}: declares a write of {_rl(bufs[r.buffer], r.lo, r.hi)} but "
                                    f"its params do not write [{g[0]}:{g[1]})")


def _check_wellformed(prog: Program, tgt: GpuTarget | None, E: _Errors) -> bool:
    """Adds errors; returns False when the structure is too broken to analyse further."""
    for what in ("buffers", "counters", "tasks"):
        if not isinstance(getattr(prog, what), list):
            E.add("malformed", f"program.{what} must be a list")
            return False
    sound, names = True, set()
    for i, b in enumerate(prog.buffers):
        if not (isinstance(b, Buffer) and b.id == i and isinstance(b.kind, BufferKind)
                and isinstance(b.dtype, DType) and isinstance(b.shape, tuple)
                and all(_is_int(s) and s >= 1 for s in b.shape)):
            E.add("malformed", f"buffer at index {i} is malformed (expected Buffer id {i} with a kind, "
                               f"a dtype and a shape of positive ints): {b!r}")
            sound = False
        elif b.name in names:
            E.add("malformed", f"buffer {i}: duplicate name {b.name!r}")
        names.add(getattr(b, "name", None))
    for i, c in enumerate(prog.counters):
        if not (isinstance(c, Counter) and c.id == i):
            E.add("malformed", f"counter at index {i} must be Counter id {i}: {c!r}")
            sound = False
    if not sound:
        return False
    nb, nc = len(prog.buffers), len(prog.counters)
    meta = prog.meta if isinstance(prog.meta, dict) else {}
    num_sms = meta.get("num_sms")
    if num_sms is not None and (not _is_int(num_sms) or num_sms < 1):
        E.add("malformed", f"meta.num_sms must be a positive int, got {num_sms!r}")
        num_sms = None
    if tgt is not None and num_sms is not None and num_sms > tgt.sm_count:
        E.add("resource", f"meta.num_sms = {num_sms} but {tgt.name} has {tgt.sm_count} SMs")
    tpb = meta.get("threads_per_block")
    if tpb is not None and (not _is_int(tpb) or tpb < 32 or tpb % 32):
        E.add("resource", f"meta.threads_per_block = {tpb!r} must be a positive multiple of 32")
    elif tpb is not None and tgt is not None and tpb > tgt.max_threads_per_block:
        E.add("resource", f"meta.threads_per_block = {tpb} exceeds {tgt.name}'s limit of "
                          f"{tgt.max_threads_per_block} threads per block")
    depth, dtype = meta.get("pipelining_depth"), meta.get("dtype")
    if _is_int(tpb) and tpb >= 32 and _is_int(depth) and isinstance(dtype, str):
        cap = ir.max_pipelining_depth(tpb, dtype)
        if depth > cap:
            E.add("resource", f"meta.pipelining_depth = {depth} needs more registers than a block of {tpb} "
                              f"threads has: at most {cap} loads in flight fit ({dtype})")
    smem_need, smem_task = 0, None
    for i, t in enumerate(prog.tasks):
        if not (isinstance(t, Task) and _is_int(t.id) and t.id == i and _is_int(t.sm)
                and isinstance(t.reads, list) and isinstance(t.writes, list) and isinstance(t.waits, list)):
            E.add("malformed", f"task at index {i} is malformed (expected Task id {i} with an int sm and "
                               f"lists of reads, writes and waits)")
            sound = False
            continue
        spec = ir.OPS_BY_NAME.get(t.op) if isinstance(t.op, str) else None
        if spec is None:
            E.add("malformed", f"task {i}: unknown op {t.op!r}; known: {', '.join(ir.OPS_BY_NAME)}")
        if t.sm < 0:
            E.add("malformed", f"{_tl(t)}: negative SM id")
        elif tgt is not None and t.sm >= tgt.sm_count:
            E.add("resource", f"{_tl(t)}: SM {t.sm} is outside {tgt.name}'s {tgt.sm_count} SMs")
        elif num_sms is not None and t.sm >= num_sms:
            E.add("resource", f"{_tl(t)}: SM {t.sm} is outside meta.num_sms = {num_sms}")
        if len(t.waits) > ir.MAX_WAITS:
            E.add("malformed", f"{_tl(t)}: {len(t.waits)} waits; an instruction holds {ir.MAX_WAITS}")
        for w in t.waits:
            if not (isinstance(w, Wait) and _is_int(w.counter) and _is_int(w.threshold) and 0 <= w.counter < nc):
                E.add("malformed", f"{_tl(t)}: wait {w!r} must name one of the {nc} counters and an int threshold")
                sound = False
            elif w.threshold < 1:
                E.add("malformed", f"{_tl(t)}: waits for {_cl(prog.counters[w.counter])} >= {w.threshold}; "
                                   f"thresholds start at 1")
        if t.signal is not None and not (_is_int(t.signal) and 0 <= t.signal < nc):
            E.add("malformed", f"{_tl(t)}: signal {t.signal!r} is not None or a counter id ({nc} counters)")
            sound = False
        regions_ok = True
        for rw, regions in (("read", t.reads), ("write", t.writes)):
            for r in regions:
                if not (isinstance(r, Region) and _is_int(r.buffer) and _is_int(r.lo) and _is_int(r.hi)
                        and 0 <= r.buffer < nb):
                    E.add("malformed", f"{_tl(t)}: {rw} region {r!r} must name a buffer id in 0..{nb - 1} "
                                       f"with int bounds")
                    sound = regions_ok = False
                    continue
                b = prog.buffers[r.buffer]
                if not 0 <= r.lo < r.hi <= b.numel:
                    E.add("bad-region", f"{_tl(t)}: {rw} region {_rl(b, r.lo, r.hi)} is not a non-empty "
                                        f"range inside its {b.numel} elements")
                    regions_ok = False
                if rw == "write" and b.kind in (BufferKind.WEIGHT, BufferKind.INPUT):
                    E.add("bad-region", f"{_tl(t)}: writes {_rl(b, r.lo, r.hi)}; {b.kind.value} buffers "
                                        f"are read-only")
                if r.mode not in (("write", "accumulate") if rw == "write" else ("write",)):
                    E.add("bad-region", f"{_tl(t)}: {rw} region {_rl(b, r.lo, r.hi)} has mode {r.mode!r}")
        p = _check_params(t, spec, nb, E) if spec is not None else None
        if p is None:
            continue
        if regions_ok:
            _check_footprint(t, p, prog.buffers, E)
        try:
            need = ir.task_smem_bytes(prog, t)
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            need = 0
        if need > smem_need:
            smem_need, smem_task = need, t
        if t.op in ir.HEAD_OPS and _is_int(p.get("head_dim")) \
                and p["head_dim"] > ir.MAX_HEAD_DIM:
            E.add("resource", f"{_tl(t)}: head_dim = {p['head_dim']} exceeds the VM's limit of {ir.MAX_HEAD_DIM}")
    table = ir.buffer_table_bytes(prog)
    total = ir.SMEM_RESERVED + table + smem_need
    if tgt is not None and total > tgt.smem_per_block:
        assert smem_task is not None
        detail = ", ".join(f"{k} = {v}" for k, v in smem_task.params.items()
                           if k in ("k", "n_heads", "n_kv_heads", "head_dim", "kv_block"))
        E.add("resource", f"shared memory: the kernel needs {total} bytes per block ({_tl(smem_task)} needs "
                          f"{smem_need} for {detail}, plus {table} for the buffer table and {ir.SMEM_RESERVED} "
                          f"reserved) but "
                          f"{tgt.name} allows {tgt.smem_per_block}")
    return sound


# -- JSON shape (validate_json) -------------------------------------------------------

_FIELDS: dict[str, dict[str, str]] = {
    "buffers": {"id": "int", "name": "str", "kind": "kind", "dtype": "dtype", "shape": "ints"},
    "counters": {"id": "int", "name": "str"},
    "tasks": {"id": "int", "op": "str", "sm": "int", "reads": "regions?", "writes": "regions?",
              "waits": "waits?", "signal": "int?", "params": "dict?"},
}


def _json_problems(d: Any) -> list[str]:
    if not isinstance(d, dict):
        return [f"the program must be a JSON object, got {type(d).__name__}"]
    out = [] if d.get("version") == ir.IR_VERSION else [f"version: expected {ir.IR_VERSION}, got {d.get('version')!r}"]
    if not isinstance(d.get("meta", {}), dict):
        out.append("meta: must be an object")

    def bad(v: Any, ty: str) -> bool:
        if ty in ("regions", "waits"):
            keys = ("counter", "threshold") if ty == "waits" else ("buffer", "lo", "hi")
            return not (isinstance(v, list) and all(isinstance(r, dict) and all(_is_int(r.get(k)) for k in keys)
                                                    and isinstance(r.get("mode", ""), str) for r in v))
        return not {"int": _is_int(v), "str": isinstance(v, str), "dict": isinstance(v, dict),
                    "ints": isinstance(v, list) and all(map(_is_int, v)),
                    "kind": v in [k.value for k in BufferKind], "dtype": v in [d.value for d in DType]}[ty]

    for section, fields in _FIELDS.items():
        items = d.get(section)
        if not isinstance(items, list):
            out.append(f"{section}: expected a list, got {type(items).__name__}")
            continue
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                out.append(f"{section}[{i}]: expected an object, got {type(item).__name__}")
                continue
            for key, ty in fields.items():
                if key not in item:
                    if not ty.endswith("?"):
                        out.append(f"{section}[{i}]: missing field {key!r}")
                elif not (key == "signal" and item[key] is None) and bad(item[key], ty.rstrip("?")):
                    out.append(f"{section}[{i}].{key}: expected {ty.rstrip('?')}, got {item[key]!r}"[:200])
    return out

