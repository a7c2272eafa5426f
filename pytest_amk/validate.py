"""Static proof that a task Program is safe (DESIGN §6).

``validate(program)`` checks, in order:

1. Well-formedness: ids, ops and their params, regions inside their buffers and
   consistent with what the op's params make it touch, dtypes the ops require,
   SM ids, threads and shared memory inside the target's limits.
2. Deadlock freedom: every wait threshold is reachable, and a greedy run (any
   queue head whose waits hold runs next) completes. Counters only increase, so
   greedy execution is confluent: one complete run proves every run completes.
3. Race freedom: a happens-before (HB) relation is built from queue order and
   from what each wait guarantees (a task is guaranteed finished when fewer
   than ``threshold`` of the available signallers can finish without it). Every
   two tasks whose regions overlap, where one writes, must be HB-ordered;
   accumulates into the same region commute with each other.
4. Initialisation: every output element is written; every read of an activation
   or output element is covered by writes of tasks that happen-before the reader.

HB-ancestor sets are Python int bitsets indexed by position in the greedy run
(a topological order), so each check is a few big-int operations per task.
"""

from __future__ import annotations

import heapq
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from pytest_amk import ir
from pytest_amk.ir import Buffer, BufferKind, Counter, DType, GpuTarget, OpSpec, Program, Region, Task, Wait

ERROR_CAP = 20  # errors shown per code; the rest are counted
MAX_HB_PASSES = 8  # refinement passes of the HB fixpoint (each pass is sound on its own)
MUTABLE = (BufferKind.ACTIVATION, BufferKind.KV, BufferKind.OUTPUT)

# dtypes the op docs in ir.OPS fix for some params.
_DTYPES: dict[tuple[str, str], DType] = {
    ("EMBED", "token"): DType.INT32, ("ROPE_APPEND", "pos"): DType.INT32,
    ("ROPE_APPEND", "rope"): DType.FP32, ("ATTN_PARTIAL", "seq_len"): DType.INT32,
    ("ATTN_PARTIAL", "partial"): DType.FP32, ("ATTN_COMBINE", "partial"): DType.FP32,
    ("LM_HEAD", "out"): DType.FP32, ("LM_HEAD", "amax"): DType.FP32, ("ARGMAX", "amax"): DType.FP32,
}


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


def _bits(mask: int) -> list[int]:
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


# -- 1. well-formedness ---------------------------------------------------------

def _footprint(op: str, p: dict[str, Any]) -> list[tuple[str, str, int, int]]:
    """(param, "r"|"w", lo, hi): the element ranges the op touches per its doc in ir.OPS.

    Runtime values (token, pos, seq_len) are covered conservatively. Raises ValueError
    for params the op cannot run with."""
    if op == "EMBED":
        if p["hi"] > p["hidden"]:
            raise ValueError(f"hi = {p['hi']} exceeds hidden = {p['hidden']}")
        return [("token", "r", 0, 1), ("table", "r", p["lo"], p["hi"]), ("out", "w", p["lo"], p["hi"])]
    if op == "RMSNORM":
        lo, hi = p["lo"], p["hi"]
        return [("inp", "r", 0, p["n"]), ("weight", "r", lo, hi), ("out", "w", lo, hi)]
    if op in ("GEMV", "LM_HEAD"):
        lo, hi, k = p["n_lo"], p["n_hi"], p["k"]
        fp = [("inp", "r", 0, k), ("weight", "r", lo * k, hi * k), ("norm_weight", "r", 0, k),
              ("out", "w", lo, hi)]
        if op == "LM_HEAD":
            return fp + [("amax", "w", 2 * p["tile"], 2 * p["tile"] + 2)]
        if p["act"] not in (0, 1):
            raise ValueError(f"act = {p['act']} (expected 0 or 1)")
        if p["act"]:
            fp.append(("weight", "r", (p["up_row"] + lo) * k, (p["up_row"] + hi) * k))
        return fp + [("residual", "r", lo, hi)]
    if op in ("ROPE_APPEND", "ATTN_PARTIAL"):
        nh, nkv, d, s, g = p["n_heads"], p["n_kv_heads"], p["head_dim"], p["max_seq"], p["kv_head"]
        if nkv < 1 or nh % nkv or d < 1 or s < 1 or not 0 <= g < nkv:
            raise ValueError(f"n_heads = {nh}, n_kv_heads = {nkv}, head_dim = {d}, max_seq = {s}, "
                             f"kv_head = {g} are inconsistent")
        rep = nh // nkv
        q = (g * rep * d, (g + 1) * rep * d)
        if op == "ROPE_APPEND":
            if d % 2:
                raise ValueError(f"head_dim = {d} must be even for RoPE")
            kv = (g * s * d, (g + 1) * s * d)
            ko, vo = (nh + g) * d, (nh + nkv + g) * d
            return [("qkv", "r", *q), ("qkv", "r", ko, ko + d), ("qkv", "r", vo, vo + d),
                    ("rope", "r", 0, s * d), ("pos", "r", 0, 1), ("q_out", "w", *q),
                    ("k_cache", "w", *kv), ("v_cache", "w", *kv)]
        blk, kb, nb = p["blk"], p["kv_block"], p["n_blocks"]
        if kb < 1 or not 0 <= blk < nb:
            raise ValueError(f"blk = {blk}, kv_block = {kb}, n_blocks = {nb} are inconsistent")
        kv = ((g * s + blk * kb) * d, (g * s + min(s, (blk + 1) * kb)) * d)
        return [("q", "r", *q), ("k_cache", "r", *kv), ("v_cache", "r", *kv), ("seq_len", "r", 0, 1)] + [
            ("partial", "w", (h * nb + blk) * (d + 2), (h * nb + blk + 1) * (d + 2))
            for h in range(g * rep, (g + 1) * rep)]
    if op == "ATTN_COMBINE":
        w, d = p["n_blocks"] * (p["head_dim"] + 2), p["head_dim"]
        return [("partial", "r", p["head_lo"] * w, p["head_hi"] * w),
                ("out", "w", p["head_lo"] * d, p["head_hi"] * d)]
    if op == "ADD":
        lo, hi = p["lo"], p["hi"]
        return [("a", "r", lo, hi), ("b", "r", lo, hi), ("out", "w", lo, hi)]
    if op == "SILU_MUL":
        lo, hi, up = p["lo"], p["hi"], p["up_off"]
        return [("inp", "r", lo, hi), ("inp", "r", up + lo, up + hi), ("out", "w", lo, hi)]
    if op == "ARGMAX":
        return [("amax", "r", 0, 2 * p["n_tiles"]), ("out", "w", 0, 1)]
    return []  # NOP


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
        fp = _footprint(t.op, p)
    except ValueError as e:
        E.add("malformed", f"{_tl(t)}: {e}")
        return
    for (op, name), dt in _DTYPES.items():
        if op == t.op and p[name] >= 0 and bufs[p[name]].dtype is not dt:
            b = bufs[p[name]]
            E.add("malformed", f"{_tl(t)}: param {name!r} is {b.kind.value} '{b.name}' of dtype "
                               f"{b.dtype.value}; {op} needs {dt.value}")
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
    total = ir.SMEM_RESERVED + smem_need
    if tgt is not None and total > tgt.smem_per_block:
        assert smem_task is not None
        detail = ", ".join(f"{k} = {v}" for k, v in smem_task.params.items()
                           if k in ("k", "n_heads", "n_kv_heads", "head_dim", "kv_block"))
        E.add("resource", f"shared memory: the kernel needs {total} bytes per block ({_tl(smem_task)} needs "
                          f"{smem_need} for {detail}, plus {ir.SMEM_RESERVED} reserved) but "
                          f"{tgt.name} allows {tgt.smem_per_block}")
    return sound


# -- 2. deadlock ------------------------------------------------------------------

def _simulate(prog: Program, sigs: list[list[int]], E: _Errors) -> list[int]:
    """Greedy run (lowest ready task id first); returns the run order. Reports deadlock."""
    tasks, counters = prog.tasks, prog.counters
    for t in tasks:
        for w in t.waits:
            if w.threshold > len(sigs[w.counter]):
                who = ", ".join(_tl(tasks[s]) for s in sigs[w.counter][:8]) or "none"
                E.add("unreachable-threshold", f"{_tl(t)} waits for {_cl(counters[w.counter])} >= {w.threshold} "
                                               f"but only {len(sigs[w.counter])} task(s) signal it ({who})")
    queues: dict[int, list[int]] = {}
    for t in tasks:
        queues.setdefault(t.sm, []).append(t.id)
    head = dict.fromkeys(queues, 0)
    value = [0] * len(counters)
    blocked: list[list[tuple[int, int]]] = [[] for _ in counters]
    ready: list[int] = []

    def arm(tid: int) -> None:
        for w in tasks[tid].waits:
            if value[w.counter] < w.threshold:
                heapq.heappush(blocked[w.counter], (w.threshold, tid))
                return
        heapq.heappush(ready, tid)

    for q in queues.values():
        arm(q[0])
    order: list[int] = []
    while ready:
        tid = heapq.heappop(ready)
        order.append(tid)
        t = tasks[tid]
        if t.signal is not None:
            c = t.signal
            value[c] += 1
            while blocked[c] and blocked[c][0][0] <= value[c]:
                arm(heapq.heappop(blocked[c])[1])
        head[t.sm] += 1
        if head[t.sm] < len(queues[t.sm]):
            arm(queues[t.sm][head[t.sm]])
    if len(order) == len(tasks):
        return order
    done = bytearray(len(tasks))
    for tid in order:
        done[tid] = 1
    stuck = {sm: q[head[sm]] for sm, q in queues.items() if head[sm] < len(q)}

    def unmet(tid: int) -> list[Wait]:
        return [w for w in tasks[tid].waits if value[w.counter] < w.threshold]

    # Follow "waits for a signaller queued behind another stuck head" to find a cycle.
    cyc: list[int] = []
    for start in sorted(stuck.values()):
        path, at = [], start
        while at not in path:
            path.append(at)
            nxt = [s for w in unmet(at)[:1] for s in sigs[w.counter] if not done[s]]
            if not nxt:
                break
            at = stuck[tasks[nxt[0]].sm]
        else:
            cyc = path[path.index(at):] + [at]
            break
    if cyc:
        steps = []
        for a, b in zip(cyc, cyc[1:], strict=False):
            w = unmet(a)[0]
            s = next(s for s in sigs[w.counter] if not done[s] and tasks[s].sm == tasks[b].sm)
            where = "which is itself stuck" if s == b else f"queued behind {_tl(tasks[b])}"
            steps.append(f"{_tl(tasks[a])} waits for {_cl(counters[w.counter])} >= {w.threshold} "
                         f"(reached {value[w.counter]}), signalled by {_tl(tasks[s])} {where}")
        cause = "cycle: " + "; ".join(steps)
    else:
        cause = "no cycle: a threshold can never be reached"
    E.add("deadlock", f"{len(tasks) - len(order)} of {len(tasks)} tasks can never run, "
                      f"{len(stuck)} SM queue(s) stuck; {cause}")
    for sm in sorted(stuck):
        tid = stuck[sm]
        why = "; ".join(f"{_cl(counters[w.counter])} reached {value[w.counter]} of threshold {w.threshold} "
                        f"({sum(1 for s in sigs[w.counter] if not done[s])} signaller(s) never run)"
                        for w in unmet(tid))
        E.add("deadlock", f"{_tl(tasks[tid])} is stuck at the head of SM {sm}'s queue: {why}")
    return order


# -- 3. happens-before ------------------------------------------------------------

def _at_least(sets: list[int], k: int) -> int:
    """Bitset of the elements that lie in at least ``k`` of ``sets``."""
    if k <= 1:
        out = 0
        for s in sets:
            out |= s
        return out
    if k > len(sets):
        return 0
    if k == len(sets):
        out = sets[0]
        for s in sets[1:]:
            out &= s
        return out
    planes: list[int] = []  # bit-sliced per-element counters
    for s in sets:
        carry = s
        for i, pl in enumerate(planes):
            if not carry:
                break
            planes[i], carry = pl ^ carry, pl & carry
        if carry:
            planes.append(carry)
    gt, eq = 0, -1
    for i in reversed(range(max(len(planes), k.bit_length()))):
        pl = planes[i] if i < len(planes) else 0
        if (k >> i) & 1:
            eq &= pl
        else:
            gt |= eq & pl
            eq &= ~pl
    return gt | eq


def _happens_before(prog: Program, order: list[int], sigs: list[list[int]]) -> tuple[list[int], list[int], int]:
    """anc[tid]: bitset (by run position) of the tasks that finish before ``tid`` starts in every
    execution. A wait (c, t) guarantees x finished when fewer than t of the signallers that can
    be among the first t to finish (not the waiter's known descendants, not those that
    themselves wait for c >= t) are not descendants of x. Signallers later in the run order
    use the previous pass's sets (first pass: none), so passes repeat
    while that changes anything; every pass is sound."""
    tasks = prog.tasks
    pos = [0] * len(tasks)
    for i, tid in enumerate(order):
        pos[tid] = i
    qpred, last = [-1] * len(tasks), {}
    for tid in order:  # queue order is run order within an SM
        qpred[tid] = last.get(tasks[tid].sm, -1)
        last[tasks[tid].sm] = tid
    sig_run = [sorted(s, key=pos.__getitem__) for s in sigs]
    prev: list[int] | None = None
    anc: list[int] = []
    for npass in range(1, MAX_HB_PASSES + 1):  # noqa: B007 (returned)
        anc = [0] * len(tasks)
        ran = [0] * len(sigs)  # signallers of each counter already processed in this pass
        cache: dict[tuple[int, int], int] = {}
        partial = False
        for tid in order:
            t = tasks[tid]
            qp = qpred[tid]
            a = anc[qp] | (1 << pos[qp]) if qp >= 0 else 0
            for w in t.waits:
                c, th = w.counter, w.threshold
                if th < 1:
                    continue
                lst, k, full = sig_run[c], ran[c], ran[c] == len(sig_run[c])
                g = cache.get((c, th)) if full else None
                if g is None:
                    sets = []
                    for i, s in enumerate(lst):
                        if any(v.counter == c and v.threshold >= th for v in tasks[s].waits):
                            continue  # s starts only once c >= th: never among the first th to finish
                        if i < k:
                            sets.append(anc[s] | (1 << pos[s]))
                        elif prev is None:
                            sets.append(1 << pos[s])
                        elif not (prev[s] >> pos[tid]) & 1:  # a descendant of the waiter cannot help
                            sets.append(prev[s] | (1 << pos[s]))
                    g = _at_least(sets, len(sets) - th + 1)
                    if full:
                        cache[(c, th)] = g
                    else:
                        partial = True
                a |= g
            anc[tid] = a
            if t.signal is not None:
                ran[t.signal] += 1
        if not partial or anc == prev:
            break
        prev = anc
    return anc, pos, npass


# -- 4. races and initialisation --------------------------------------------------

_VERB = {"r": "reads", "w": "writes", "a": "accumulates into"}
_CONFLICT = {"r": "wa", "w": "rwa", "a": "rw"}


def _check_accesses(prog: Program, order: list[int], anc: list[int], pos: list[int], E: _Errors) -> int:
    """Race and initialisation checks; returns the number of access-pair checks made."""
    tasks, bufs = prog.tasks, prog.buffers
    # buffer -> (lo, hi) -> [read mask, write mask, accumulate mask]; buffer -> task -> accesses
    groups: dict[int, dict[tuple[int, int], list[int]]] = {}
    acc: dict[int, dict[int, list[tuple[str, int, int]]]] = {}
    for tid in order:
        t, bit = tasks[tid], 1 << pos[tid]
        for role, r in [("r", r) for r in t.reads] + [("a" if r.mode == "accumulate" else "w", r) for r in t.writes]:
            if r.lo >= r.hi or bufs[r.buffer].kind not in MUTABLE:
                continue
            m = groups.setdefault(r.buffer, {}).setdefault((r.lo, r.hi), [0, 0, 0])
            m["rwa".index(role)] |= bit
            acc.setdefault(r.buffer, {}).setdefault(tid, []).append((role, r.lo, r.hi))
    checks = 0
    for bid, group in groups.items():
        b, keys = bufs[bid], sorted(group)
        masks = [group[k] for k in keys]
        conf = [[m[1] | m[2], m[1] | m[2] | m[0], m[1] | m[0]] for m in masks]  # per role: what conflicts
        active: list[int] = []
        for j, (lo, _hi) in enumerate(keys):  # sweep: every overlapping pair of distinct intervals
            active = [i for i in active if keys[i][1] > lo]
            for i in active:
                for x, (r, w, a) in ((i, masks[j]), (j, masks[i])):
                    conf[x][0], conf[x][1], conf[x][2] = conf[x][0] | w | a, conf[x][1] | w | a | r, conf[x][2] | w | r
            active.append(j)
        by_task = acc[bid]
        for j, (lo, hi) in enumerate(keys):
            for role in range(3):
                cm = conf[j][role]
                if not masks[j][role] or not cm:
                    continue
                for pb in _bits(masks[j][role]):
                    checks += 1
                    bad = cm & ((1 << pb) - 1) & ~anc[order[pb]]
                    if bad:
                        _report_races(prog, order, bad, order[pb], by_task, b, E)
            if b.kind is BufferKind.KV or not masks[j][0]:
                continue
            writers, seen = conf[j][0], {}  # tasks writing anything in [lo, hi)
            for pb in _bits(masks[j][0]):
                tid = order[pb]
                avail = writers & anc[tid]
                gaps = seen.get(avail)
                if gaps is None:
                    cover = [(a, c) for q in _bits(avail) for role, a, c in by_task[order[q]] if role != "r"]
                    gaps = seen[avail] = _gaps(lo, hi, cover)
                for g0, g1 in gaps:
                    late = [order[q] for q in _bits(writers & ~avail)
                            if any(rl != "r" and a < g1 and c > g0 for rl, a, c in by_task[order[q]])]
                    who = (f"; only unordered or later task(s) write it: {', '.join(_tl(tasks[x]) for x in late[:4])}"
                           if late else "; no task writes it")
                    E.add("uninitialised-read", f"{_tl(tasks[tid])} reads {_rl(b, lo, hi)} but {_rl(b, g0, g1)} "
                                                f"is not written by any task that happens-before it{who}")
    for b in bufs:
        if b.kind is BufferKind.OUTPUT:
            cover = [(a, c) for accs in acc.get(b.id, {}).values() for role, a, c in accs if role != "r"]
            for g0, g1 in _gaps(0, b.numel, cover):
                E.add("unwritten-output", f"output '{b.name}' elements [{g0}:{g1}) of [0:{b.numel}) are never "
                                          f"written by any task")
    return checks


def _report_races(prog: Program, order: list[int], bad: int, tid: int,
                  by_task: dict[int, list[tuple[str, int, int]]], b: Buffer, E: _Errors) -> None:
    """Report task ``tid``'s unordered partners in ``bad`` (positions) on buffer ``b``."""
    tasks = prog.tasks
    if not E.room("race"):
        E.add("race", "", bad.bit_count())
        return
    qs = _bits(bad)
    for i, q in enumerate(qs):
        if not E.room("race"):
            E.add("race", "", len(qs) - i)
            return
        x, y = sorted((order[q], tid))  # name the pair in intended order: signaller, else id order
        if tasks[y].signal is not None and any(w.counter == tasks[y].signal for w in tasks[x].waits):
            x, y = y, x
        if (x, y, b.id) in E.seen:
            continue
        E.seen.add((x, y, b.id))
        rx, ax, bx, ry, ay, by = next((rx, ax, bx, ry, ay, by) for rx, ax, bx in by_task[x] for ry, ay, by in by_task[y]
                                      if ry in _CONFLICT[rx] and max(ax, ay) < min(bx, by))
        kind = "WAW" if "r" not in (rx, ry) else ("RAW" if ry == "r" else "WAR")
        hint, c = "", tasks[x].signal
        if c is not None:
            cnt, ctr = sum(1 for t in tasks if t.signal == c), _cl(prog.counters[c])
            ws = [w for w in tasks[y].waits if w.counter == c]
            hint = (f"; task {y} waits for {ctr} >= {ws[0].threshold} but {cnt} tasks signal it, so task {x} "
                    f"need not have finished" if ws else f"; task {y} does not wait on {ctr} that task {x} signals")
        E.add("race", f"{kind} race on {_rl(b, max(ax, ay), min(bx, by))}: {_tl(tasks[x])} {_VERB[rx]} "
                      f"[{ax}:{bx}) and {_tl(tasks[y])} {_VERB[ry]} [{ay}:{by}) with no happens-before order "
                      f"between them{hint}")


# -- entry points -------------------------------------------------------------------

def validate(program: Program, target: GpuTarget | None = None) -> Result:
    """Prove ``program`` safe on ``target`` (default: ``ir.TARGETS[program.meta["target"]]``)."""
    t0 = time.perf_counter()
    E = _Errors()
    stats: dict[str, Any] = {"tasks": 0, "counters": 0, "edges": 0}
    try:
        meta = program.meta if isinstance(program.meta, dict) else {}
        if target is None and meta.get("target") is not None:
            target = ir.TARGETS.get(meta["target"]) if isinstance(meta["target"], str) else None
            if target is None:
                E.add("malformed", f"meta.target {meta['target']!r} is not a known GPU; known: {', '.join(ir.TARGETS)}")
        stats["target"] = target.name if target is not None else None
        if _check_wellformed(program, target, E):
            tasks = program.tasks
            sigs: list[list[int]] = [[] for _ in program.counters]
            for t in tasks:
                if t.signal is not None:
                    sigs[t.signal].append(t.id)
            stats.update(tasks=len(tasks), counters=len(program.counters),
                         edges=len(tasks) - len({t.sm for t in tasks})
                         + sum(len(sigs[w.counter]) for t in tasks for w in t.waits))
            order = _simulate(program, sigs, E)
            if len(order) == len(tasks):
                anc, pos, stats["hb_passes"] = _happens_before(program, order, sigs)
                stats["access_checks"] = _check_accesses(program, order, anc, pos, E)
            else:
                stats["skipped"] = "race and initialisation checks (the program deadlocks)"
        else:
            stats["skipped"] = "deadlock, race and initialisation checks (malformed structure)"
    except Exception as e:  # the validator must never crash its caller
        E.add("malformed", f"the program could not be analysed: {type(e).__name__}: {e}")
    stats["seconds"] = round(time.perf_counter() - t0, 4)
    return E.result(stats)


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


def validate_json(text: str | bytes, target: GpuTarget | None = None) -> Result:
    """Validate program JSON; malformed input gives a "malformed" error, never an exception."""
    t0 = time.perf_counter()
    try:
        data = json.loads(text)
    except (ValueError, TypeError, RecursionError) as e:
        problems = [f"not JSON: {e}"]
    else:
        problems = _json_problems(data)
        if not problems:
            try:
                return validate(Program.from_json(data), target)
            except Exception as e:
                problems = [f"{type(e).__name__}: {e}"]
    E = _Errors()
    for msg in problems:
        E.add("malformed", msg)
    return E.result({"tasks": 0, "counters": 0, "edges": 0, "seconds": round(time.perf_counter() - t0, 4)})
