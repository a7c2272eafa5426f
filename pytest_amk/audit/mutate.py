"""Mutation corpus: lowered programs with unsafe-prone and safe edits, and random programs.

Each ``Case`` carries its class name. A class only says what the edit is *meant*
to do; whether the mutated program is actually unsafe is decided by the
simulator (``pytest_amk.audit.simulate``), never by the class. Edits keep
programs well formed (task ids = list positions, params consistent with the
declared regions, at most ``MAX_WAITS`` waits, thresholds >= 1, SMs inside
``meta.num_sms``) so that a rejection is about safety, not syntax.

Base programs are small lowerings (toy, toy-4L and one-layer variants, few SMs
so that queues are shared, small ``max_seq``) over several schedules. The random
programs come from ``pytest_amk.audit.randprog``.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import TypeVar

from pytest_amk.audit.randprog import RANDOM, random_program, random_sync_program
from pytest_amk.audit.randprog import set_wait as _set_wait
from pytest_amk.audit.randprog import signallers_of as _signallers
from pytest_amk.ir import (
    MAX_WAITS,
    OPS_BY_NAME,
    TARGETS,
    Buffer,
    BufferKind,
    Counter,
    Program,
    Region,
    Task,
    Wait,
    gemv_input_len,
)

Mutation = Callable[[Program, random.Random], "Program | None"]
T = TypeVar("T")


@dataclass
class Case:
    index: int
    cls: str  # mutation class
    intent: str  # "unsafe" (unsafe-prone) or "safe" (meant to preserve safety)
    base: str  # base program name
    program: Program


# -- base programs -------------------------------------------------------------------

ALL_FUSIONS = [["rmsnorm", "gemv"], ["gemv", "residual_add"], ["gemv", "silu_mul"]]

# (name, model, layers override, sm_count, max_seq, knob overrides)
_BASES: tuple[tuple[str, str, int, int, int, dict[str, object]], ...] = (
    ("toy1-sm4-s8", "toy", 1, 4, 8, {}),
    ("toy1-sm4-s16-kv8-nofuse", "toy", 1, 4, 16, {"fusion": [], "tiling.attention.kv_block": 8}),
    ("toy1-sm3-s16-tile64-bal", "toy", 1, 3, 16,
     {"tiling.gemv.n_tile": 64, "sm_assignment": "balanced", "tiling.attention.kv_block": 8}),
    ("toy1-sm2-s8-ch2-lm128", "toy", 1, 2, 8,
     {"tiling.attention.combine_heads": 2, "tiling.lm_head.n_tile": 128, "fusion": [ALL_FUSIONS[0]]}),
    ("toy1-sm5-s32-kv16-silu", "toy", 1, 5, 32,
     {"tiling.attention.kv_block": 16, "fusion": [ALL_FUSIONS[2]], "tiling.attention.combine_heads": 4}),
    ("toy1-sm8-s16-tile128-res", "toy", 1, 8, 16, {"tiling.gemv.n_tile": 128, "fusion": [ALL_FUSIONS[1]]}),
    ("toy-sm4-s16", "toy", 0, 4, 16, {"tiling.attention.kv_block": 8}),
    ("toy-sm6-s8-bal-nofuse", "toy", 0, 6, 8, {"sm_assignment": "balanced", "fusion": []}),
    ("toy4L-sm4-s16", "toy-4L", 0, 4, 16, {"tiling.gemv.n_tile": 256}),
    ("toy4L1-sm4-s32-kv16", "toy-4L", 1, 4, 32, {"tiling.attention.kv_block": 16, "fusion": []}),
    ("toy1-sm4-s16-kv8-allfuse", "toy", 1, 4, 16,  # RoPE in attention, the combine in the O projection
     {"tiling.attention.kv_block": 8, "fusion": ALL_FUSIONS + [["rope_append", "attn_partial"],
                                                              ["attn_combine", "gemv"]]}),
)
BASE_NAMES = tuple(b[0] for b in _BASES)


@cache
def _lowered(name: str) -> Program:
    from pytest_amk.lower import lower
    from pytest_amk.models.config import PRESETS
    from pytest_amk.schedule import default_knobs

    _, model, layers, sms, max_seq, over = next(b for b in _BASES if b[0] == name)
    cfg = PRESETS[model]
    if layers:
        cfg = dataclasses.replace(cfg, layers=layers)
    knobs = default_knobs()
    knobs.update(over)
    knobs["sm_count"] = sms
    return lower(cfg, TARGETS["h100"], knobs, "bf16", max_seq)


def base_program(name: str) -> Program:
    """A fresh copy of a named base program."""
    return clone(_lowered(name))


# -- helpers -------------------------------------------------------------------------

def clone(p: Program) -> Program:
    tasks = [Task(t.id, t.op, t.sm, list(t.reads), list(t.writes), list(t.waits), t.signal, dict(t.params))
             for t in p.tasks]
    return Program(list(p.buffers), list(p.counters), tasks, dict(p.meta))


def _renumber(p: Program) -> Program:
    for i, t in enumerate(p.tasks):
        t.id = i
    return p


def _num_sms(p: Program) -> int:
    return int(p.meta.get("num_sms", 1 + max((t.sm for t in p.tasks), default=0)))


RANGE_OPS = ("ADD", "RMSNORM", "SILU_MUL", "EMBED", "GEMV")


def _range(t: Task) -> tuple[int, int]:
    return (t.params["n_lo"], t.params["n_hi"]) if t.op == "GEMV" else (t.params["lo"], t.params["hi"])


def _retile(p: Program, t: Task, lo: int, hi: int) -> Task:
    """A copy of range task ``t`` computing rows [lo, hi), regions rebuilt from its params."""
    q = dict(t.params)
    if t.op == "GEMV":
        q["n_lo"], q["n_hi"] = lo, hi
    else:
        q["lo"], q["hi"] = lo, hi
    if t.op == "ADD":
        reads = [Region(q["a"], lo, hi), Region(q["b"], lo, hi)]
    elif t.op == "RMSNORM":
        reads = [Region(q["inp"], 0, q["n"]), Region(q["weight"], lo, hi)]
    elif t.op == "SILU_MUL":
        reads = [Region(q["inp"], lo, hi), Region(q["inp"], q["up_off"] + lo, q["up_off"] + hi)]
    elif t.op == "EMBED":
        reads = [r for r in t.reads]
    else:  # GEMV
        k = q["k"]
        x_len = gemv_input_len(k, q.get("inp_blocks", 0), q.get("head_dim", 0))
        reads = [Region(q["inp"], 0, x_len), Region(q["weight"], lo * k, hi * k)]
        if q.get("act"):
            reads.append(Region(q["weight"], (q["up_row"] + lo) * k, (q["up_row"] + hi) * k))
        if q.get("norm_weight", -1) >= 0:
            reads.append(Region(q["norm_weight"], 0, k))
        if q.get("residual", -1) >= 0:
            reads.append(Region(q["residual"], lo, hi))
    return Task(t.id, t.op, t.sm, reads, [Region(q["out"], lo, hi)], list(t.waits), t.signal, q)


def _range_limit(p: Program, t: Task) -> int:
    """Largest ``hi`` the task's params allow (its output's rows)."""
    n = p.buffers[t.params["out"]].numel
    if t.op in ("RMSNORM", "EMBED"):
        n = min(n, t.params["n" if t.op == "RMSNORM" else "hidden"])
    if t.op == "ADD":
        n = min(n, p.buffers[t.params["a"]].numel, p.buffers[t.params["b"]].numel)
    if t.op == "SILU_MUL":
        n = min(n, p.buffers[t.params["inp"]].numel - t.params["up_off"])
    return n


UNSAFE_EDITS: dict[str, Mutation] = {}  # unsafe-prone edits of a program
SAFE: dict[str, Mutation] = {}  # edits meant to keep a safe program safe


def _unsafe(fn: Mutation) -> Mutation:
    UNSAFE_EDITS[fn.__name__] = fn  # type: ignore[attr-defined]
    return fn


def _safe(fn: Mutation) -> Mutation:
    SAFE[fn.__name__] = fn  # type: ignore[attr-defined]
    return fn


def _pick(rng: random.Random, items: list[T]) -> T | None:
    return rng.choice(items) if items else None


def _resignal(p: Program, old: int, new: int, threshold: Callable[[Wait], int]) -> Program:
    """Signallers of counter ``old`` signal ``new``; a wait on ``old`` becomes a wait on ``new``
    with ``threshold(wait)``; two waits on one counter merge (the larger threshold)."""
    for t in p.tasks:
        if t.signal == old:
            t.signal = new
        ws: dict[int, int] = {}
        for w in t.waits:
            c, th = (new, threshold(w)) if w.counter == old else (w.counter, w.threshold)
            ws[c] = max(ws.get(c, 0), th)
        t.waits = [Wait(c, th) for c, th in ws.items()]
    return p


# -- unsafe-prone mutations ---------------------------------------------------------

@_unsafe
def drop_wait(p: Program, rng: random.Random) -> Program | None:
    if (t := _pick(rng, [t for t in p.tasks if t.waits])) is None:
        return None
    t.waits.pop(rng.randrange(len(t.waits)))
    return p


@_unsafe
def lower_threshold(p: Program, rng: random.Random) -> Program | None:
    """threshold < count: the wait no longer orders a specific signaller."""
    cands = [(t, k) for t in p.tasks for k, w in enumerate(t.waits) if w.threshold >= 2]
    if not cands:
        return None
    t, k = rng.choice(cands)
    w = t.waits[k]
    t.waits[k] = Wait(w.counter, w.threshold - 1 if rng.random() < 0.6 else rng.randint(1, w.threshold - 1))
    return p


@_unsafe
def retarget_wait(p: Program, rng: random.Random) -> Program | None:
    sig = _signallers(p)
    cands = [(t, k) for t in p.tasks for k in range(len(t.waits))]
    if not cands or len(sig) < 2:
        return None
    t, k = rng.choice(cands)
    c = rng.choice([c for c in sig if c != t.waits[k].counter and all(w.counter != c for w in t.waits)] or [None])
    if c is None:
        return None
    t.waits[k] = Wait(c, len(sig[c]) if rng.random() < 0.7 else rng.randint(1, len(sig[c])))
    return p


@_unsafe
def swap_queue(p: Program, rng: random.Random) -> Program | None:
    """Swap two tasks of one SM queue (their list positions)."""
    qs = [q for q in p.queues() if len(q) >= 2]
    if not qs:
        return None
    q = rng.choice(qs)
    a = rng.randrange(len(q) - 1)
    b = a + 1 if rng.random() < 0.5 else rng.randrange(a + 1, len(q))
    i, j = q[a].id, q[b].id
    p.tasks[i], p.tasks[j] = p.tasks[j], p.tasks[i]
    return _renumber(p)


@_unsafe
def move_sm(p: Program, rng: random.Random) -> Program | None:
    """Move a task to another SM, at a random place in the program (and so in that queue)."""
    n = _num_sms(p)
    if n < 2 or len(p.tasks) < 2:
        return None
    t = p.tasks.pop(rng.randrange(len(p.tasks)))
    t.sm = rng.choice([s for s in range(n) if s != t.sm])
    p.tasks.insert(rng.randrange(len(p.tasks) + 1), t)
    return _renumber(p)


@_unsafe
def widen_read(p: Program, rng: random.Random) -> Program | None:
    mutable = {b.id for b in p.buffers if b.kind in (BufferKind.ACTIVATION, BufferKind.OUTPUT, BufferKind.KV)}
    cands = [(t, k) for t in p.tasks for k, r in enumerate(t.reads) if r.buffer in mutable]
    if not cands:
        return None
    t, k = rng.choice(cands)
    r = t.reads[k]
    n = p.buffers[r.buffer].numel
    d = rng.randint(1, max(1, r.hi - r.lo))
    lo, hi = (0, n) if rng.random() < 0.3 else (max(0, r.lo - d), min(n, r.hi + d))
    if (lo, hi) == (r.lo, r.hi):
        return None
    t.reads[k] = Region(r.buffer, lo, hi)
    return p


@_unsafe
def stray_read(p: Program, rng: random.Random) -> Program | None:
    """Make a task also read another activation buffer (the offsets of one of its reads,
    clipped); declared reads may exceed what the params read, so the task stays well formed."""
    acts = [b for b in p.buffers if b.kind is BufferKind.ACTIVATION]
    cands = [(t, k) for t in p.tasks for k, r in enumerate(t.reads)
             if p.buffers[r.buffer].kind is not BufferKind.WEIGHT]
    if not cands or len(acts) < 2:
        return None
    t, k = rng.choice(cands)
    r = t.reads[k]
    b = rng.choice([b for b in acts if b.id != r.buffer])
    lo = min(r.lo, b.numel - 1)
    t.reads.append(Region(b.id, lo, max(lo + 1, min(r.hi, b.numel))))
    return p


@_unsafe
def shift_region(p: Program, rng: random.Random) -> Program | None:
    """Shift or widen a tile's row range (params and regions together)."""
    if (t := _pick(rng, [t for t in p.tasks if t.op in RANGE_OPS])) is None:
        return None
    lo, hi = _range(t)
    n, d = _range_limit(p, t), rng.randint(1, max(1, hi - lo))
    if rng.random() < 0.5:
        d = max(-lo, min(d if rng.random() < 0.5 else -d, n - hi))
        lo, hi = lo + d, hi + d
    else:
        lo, hi = (max(0, lo - d), hi) if rng.random() < 0.5 else (lo, min(n, hi + d))
    if (lo, hi) == _range(t) or lo >= hi:
        return None
    p.tasks[t.id] = _retile(p, t, lo, hi)
    return p


@_unsafe
def second_writer(p: Program, rng: random.Random) -> Program | None:
    """A copy of a writer, signalling nothing, placed anywhere."""
    if (t := _pick(rng, [t for t in p.tasks if t.writes])) is None:
        return None
    c = Task(0, t.op, rng.randrange(_num_sms(p)), list(t.reads), list(t.writes), list(t.waits), None,
             dict(t.params))
    lo = t.id + 1 if rng.random() < 0.5 else 0
    p.tasks.insert(rng.randint(lo, len(p.tasks)), c)
    return _renumber(p)


@_unsafe
def delete_signal(p: Program, rng: random.Random) -> Program | None:
    if (t := _pick(rng, [t for t in p.tasks if t.signal is not None])) is None:
        return None
    t.signal = None
    return p


@_unsafe
def drop_signaller(p: Program, rng: random.Random) -> Program | None:
    """Delete a task's signal and lower every threshold on that counter to match."""
    if (t := _pick(rng, [t for t in p.tasks if t.signal is not None])) is None:
        return None
    c, t.signal = t.signal, None
    for u in p.tasks:
        u.waits = [Wait(w.counter, w.threshold - 1) if w.counter == c else w for w in u.waits]
        u.waits = [w for w in u.waits if w.threshold >= 1]
    return p


@_unsafe
def make_cycle(p: Program, rng: random.Random) -> Program | None:
    """A producer waits for (a counter signalled by) one of its consumers."""
    sig = _signallers(p)
    cands = [(t, w) for t in p.tasks for w in t.waits if t.signal is not None and w.counter in sig]
    if not cands:
        return None
    t, w = rng.choice(cands)
    prod = p.tasks[rng.choice(sig[w.counter])]
    assert t.signal is not None
    if not _set_wait(prod, t.signal, len(sig[t.signal])):
        prod.waits[rng.randrange(len(prod.waits))] = Wait(t.signal, len(sig[t.signal]))
    return p


@_unsafe
def consumer_first(p: Program, rng: random.Random) -> Program | None:
    """Move a consumer (an ATTN_COMBINE when there is one) just before one of its
    producers in that producer's SM queue."""
    sig = _signallers(p)
    cands = [(t, w) for t in p.tasks for w in t.waits if w.counter in sig]
    combines = [(t, w) for t, w in cands if t.op == "ATTN_COMBINE"]
    if combines and rng.random() < 0.5:
        cands = combines
    if not cands:
        return None
    t, w = rng.choice(cands)
    others = [i for i in sig[w.counter] if i != t.id]
    if not others:
        return None
    prod = p.tasks[rng.choice(others)]
    del p.tasks[t.id]
    t.sm = prod.sm
    p.tasks.insert(next(k for k, u in enumerate(p.tasks) if u is prod), t)
    return _renumber(p)


@_unsafe
def merge_counters(p: Program, rng: random.Random) -> Program | None:
    """Signallers of one counter signal another; waits keep their own thresholds."""
    sig = _signallers(p)
    if len(sig) < 2:
        return None
    c1, c2 = rng.sample(sorted(sig), 2)
    return _resignal(p, c2, c1, lambda w: w.threshold)


# -- safe transformations -------------------------------------------------------------

@_safe
def renumber_counters(p: Program, rng: random.Random) -> Program | None:
    perm = rng.sample(range(len(p.counters)), len(p.counters))
    p.counters = sorted((Counter(perm[c.id], c.name) for c in p.counters), key=lambda c: c.id)
    for t in p.tasks:
        t.waits = [Wait(perm[w.counter], w.threshold) for w in t.waits]
        t.signal = None if t.signal is None else perm[t.signal]
    return p


@_safe
def renumber_buffers(p: Program, rng: random.Random) -> Program | None:
    perm = rng.sample(range(len(p.buffers)), len(p.buffers))
    p.buffers = sorted((Buffer(perm[b.id], b.name, b.kind, b.dtype, b.shape) for b in p.buffers), key=lambda b: b.id)
    for t in p.tasks:
        t.reads = [Region(perm[r.buffer], r.lo, r.hi, r.mode) for r in t.reads]
        t.writes = [Region(perm[r.buffer], r.lo, r.hi, r.mode) for r in t.writes]
        for name in OPS_BY_NAME[t.op].buffer_params:
            v = t.params.get(name, -1)
            if isinstance(v, int) and v >= 0:
                t.params[name] = perm[v]
    return p


@_safe
def interleave(p: Program, rng: random.Random) -> Program | None:
    """A random merge of the SM queues: every queue keeps its order."""
    qs = [list(q) for q in p.queues() if q]
    out: list[Task] = []
    while qs:
        q = rng.choice(qs)
        out.append(q.pop(0))
        if not q:
            qs.remove(q)
    p.tasks = out
    return _renumber(p)


@_safe
def swap_independent(p: Program, rng: random.Random) -> Program | None:
    """Swap two adjacent tasks of one queue that belong to the same stage (same waits
    and signal, disjoint writes)."""
    cands = []
    for q in p.queues():
        for a, b in zip(q, q[1:], strict=False):
            if a.waits == b.waits and a.signal == b.signal and a.signal is not None:
                cands.append((a.id, b.id))
    if not cands:
        return None
    i, j = rng.choice(cands)
    p.tasks[i], p.tasks[j] = p.tasks[j], p.tasks[i]
    return _renumber(p)


@_safe
def split_tile(p: Program, rng: random.Random) -> Program | None:
    """Split a tile in two that signal the same counter; thresholds on it go up by one."""
    cands = [t for t in p.tasks if t.op in RANGE_OPS and t.signal is not None and _range(t)[1] - _range(t)[0] >= 2]
    if (t := _pick(rng, cands)) is None:
        return None
    lo, hi = _range(t)
    mid = rng.randint(lo + 1, hi - 1)
    first, second = _retile(p, t, lo, mid), _retile(p, t, mid, hi)
    if rng.random() < 0.5:
        second.sm = rng.randrange(_num_sms(p))
    p.tasks[t.id : t.id + 1] = [first, second]
    for u in p.tasks:
        u.waits = [Wait(w.counter, w.threshold + 1) if w.counter == t.signal else w for w in u.waits]
    return _renumber(p)


@_safe
def move_sm_ordered(p: Program, rng: random.Random) -> Program | None:
    """Move a task to another SM at the same place in program order (lowered programs
    order every producer by full-count waits, so the task stays ordered)."""
    n = _num_sms(p)
    if n < 2 or not p.tasks:
        return None
    t = rng.choice(p.tasks)
    t.sm = rng.choice([s for s in range(n) if s != t.sm])
    return p


@_safe
def redundant_wait(p: Program, rng: random.Random) -> Program | None:
    """Add a wait that is already implied: one that a producer of the task waits for."""
    sig = _signallers(p)
    cands = [(t, p.tasks[s]) for t in p.tasks if len(t.waits) < MAX_WAITS
             for w in t.waits if w.counter in sig and w.threshold == len(sig[w.counter])
             for s in sig[w.counter][:1]]
    cands = [(t, s) for t, s in cands if any(all(v.counter != x.counter for v in t.waits) for x in s.waits)]
    if not cands:
        return None
    t, s = rng.choice(cands)
    x = rng.choice([x for x in s.waits if all(v.counter != x.counter for v in t.waits)])
    t.waits.append(Wait(x.counter, rng.randint(1, x.threshold)))
    return p


@_safe
def ordered_partial_wait(p: Program, rng: random.Random) -> Program | None:
    """Put every ATTN_PARTIAL tile of a layer on one SM (queue order = program order),
    then let each ATTN_COMBINE wait only for the tiles up to the last one it reads:
    precise because signallers on one queue finish in order."""
    sig = _signallers(p)
    stages = [c for c, ts in sig.items() if p.tasks[ts[0]].op == "ATTN_PARTIAL"]
    if not stages:
        return None
    c = rng.choice(stages)
    tiles = [p.tasks[i] for i in sig[c]]
    sm = tiles[0].sm
    for t in tiles:
        t.sm = sm
    for u in p.tasks:
        if u.op != "ATTN_COMBINE" or all(w.counter != c for w in u.waits):
            continue
        last = max(k for k, t in enumerate(tiles) for r in t.writes for q in u.reads
                   if r.buffer == q.buffer and r.lo < q.hi and q.lo < r.hi)
        u.waits = [Wait(c, last + 1) if w.counter == c else w for w in u.waits]
    return p


@_safe
def cumulative_counter(p: Program, rng: random.Random) -> Program | None:
    """Let a stage signal its predecessor's counter when every one of its tiles waits for
    that counter's full count (a cumulative barrier): waits on the stage's own counter
    become waits for the predecessor's count plus theirs. An exact equivalence."""
    sig = _signallers(p)
    cands = []
    for c2, ids in sig.items():
        for w in p.tasks[ids[0]].waits:
            c1, n1 = w.counter, w.threshold
            if c1 != c2 and c1 in sig and n1 == len(sig[c1]) and all(Wait(c1, n1) in p.tasks[i].waits for i in ids):
                cands.append((c1, c2, n1))
    if not cands:
        return None
    c1, c2, n1 = rng.choice(cands)
    return _resignal(p, c2, c1, lambda w: n1 + w.threshold)


@_safe
def drop_implied_wait(p: Program, rng: random.Random) -> Program | None:
    """Drop a wait that another wait of the task implies: every signaller of the other
    (full-count) wait itself waits for it."""
    sig = _signallers(p)
    cands = []
    for t in p.tasks:
        for w in t.waits:
            for v in t.waits:
                if (v.counter != w.counter and v.counter in sig and v.threshold == len(sig[v.counter])
                        and all(any(x.counter == w.counter and x.threshold >= w.threshold for x in p.tasks[i].waits)
                                for i in sig[v.counter])):
                    cands.append((t, w))
                    break
    if not cands:
        return None
    t, w = rng.choice(cands)
    t.waits.remove(w)
    return p


def compound(p: Program, rng: random.Random) -> Program | None:
    """Two to four edits of any classes (safe or unsafe) in a row."""
    edits = [f for f in {**UNSAFE_EDITS, **SAFE}.values()]
    done = 0
    for _ in range(rng.randint(2, 4)):
        q = rng.choice(edits)(clone(p), rng)
        if q is not None:
            p, done = q, done + 1
    return p if done else None


# -- the corpus ------------------------------------------------------------------------------

UNSAFE: dict[str, Mutation] = {
    **UNSAFE_EDITS,
    "compound": compound,
    "random_small": lambda p, rng: random_program(rng),
    "random_sync": lambda p, rng: random_sync_program(rng),
}
CLASSES: dict[str, tuple[str, Mutation]] = {
    **{k: ("unsafe", f) for k, f in UNSAFE.items()},
    **{k: ("safe", f) for k, f in SAFE.items()},
}
# Safe edits that keep program order a topological order (so later edits that rely on
# it, e.g. move_sm_ordered, stay safe); used as pre-edits under any class.
PRE_EDITS: tuple[Mutation, ...] = (renumber_counters, renumber_buffers, swap_independent, split_tile,
                                   redundant_wait)
# The random classes count three times: they are the only source of unstructured programs.
_SCHEDULE = [c for c in CLASSES for _ in range(3 if c in RANDOM else 1)]


def make_case(index: int, seed: int = 0, cls: str | None = None) -> Case:
    """Case ``index`` of the corpus for ``seed`` (deterministic). Classes take turns;
    a safe class is applied on top of 0-2 other safe edits, an unsafe one on top of
    0-1 safe edits, so the edits compose. One unsafe edit in five is applied to a random
    program instead of a lowered one (``Case.base`` names the generator)."""
    rng = random.Random(f"{seed}:{index}")
    cls = cls or _SCHEDULE[index % len(_SCHEDULE)]
    intent, fn = CLASSES[cls]
    for _ in range(50):
        base = rng.choice(BASE_NAMES)
        if cls in RANDOM:
            return Case(index, cls, intent, "random", RANDOM[cls](rng))
        if cls in UNSAFE_EDITS and rng.random() < 0.2:  # unsafe edits of random programs too
            rnd = rng.choice(sorted(RANDOM))
            q = fn(RANDOM[rnd](rng), rng)
            if q is not None:
                return Case(index, cls, intent, rnd, q)
            continue
        p: Program | None = base_program(base)
        for _ in range(rng.randint(0, 2 if intent == "safe" else 1)):
            assert p is not None
            p = rng.choice(PRE_EDITS)(clone(p), rng) or p
        assert p is not None
        if rng.random() < 0.25 and intent == "unsafe":
            p = fn(p, rng) or p  # a second unsafe edit of the same class now and then
        q = fn(clone(p), rng)
        if q is not None:
            return Case(index, cls, intent, base, q)
    raise RuntimeError(f"class {cls} produced no program after 50 tries")


def corpus(n: int, seed: int = 0) -> Iterator[Case]:
    for i in range(n):
        yield make_case(i, seed)
