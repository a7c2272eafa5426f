"""Random small programs for the validator audit: unstructured task graphs that the
lowering would never produce (``random_program``, ``random_sync_program``), plus the
helpers the mutation corpus shares with them.

Both generators are deterministic functions of their ``random.Random``; a program is
well formed (params consistent with the declared regions, at most ``MAX_WAITS``
waits, thresholds >= 1) so that the validator judges its safety, not its syntax.
Whether it is safe is left to the simulator.
"""

from __future__ import annotations

import random

from pytest_amk.ir import MAX_WAITS, Buffer, BufferKind, Counter, DType, Program, Region, Task, Wait


def signallers_of(p: Program) -> dict[int, list[int]]:
    """counter -> ids of the tasks that signal it, in program order."""
    out: dict[int, list[int]] = {}
    for t in p.tasks:
        if t.signal is not None:
            out.setdefault(t.signal, []).append(t.id)
    return out


def set_wait(t: Task, c: int, th: int) -> bool:
    """Add or raise a wait of ``t``; False when the instruction has no room."""
    for k, w in enumerate(t.waits):
        if w.counter == c:
            t.waits[k] = Wait(c, max(th, w.threshold))
            return True
    if len(t.waits) >= MAX_WAITS:
        return False
    t.waits.append(Wait(c, th))
    return True


def add_task(i: int, sm: int, a: int, b: int, dst: int, lo: int, hi: int, signal: int | None,
             mode: str = "write", extra: tuple[Region, ...] = ()) -> Task:
    """An ADD task writing ``dst[lo:hi)`` from ``a`` and ``b`` (plus ``extra`` declared reads)."""
    return Task(i, "ADD", sm, [Region(a, lo, hi), Region(b, lo, hi), *extra], [Region(dst, lo, hi, mode)], [],
                signal, {"a": a, "b": b, "out": dst, "lo": lo, "hi": hi})


def make_program(kinds: tuple[BufferKind, ...], size: int, tasks: list[Task], ncnt: int, nsm: int) -> Program:
    bufs = [Buffer(i, f"{k.value}{i}", k, DType.FP32, (size,)) for i, k in enumerate(kinds)]
    counters = [Counter(i, f"c{i}") for i in range(ncnt)]
    return Program(bufs, counters, tasks, {"target": "h100", "num_sms": nsm, "threads_per_block": 256})


def random_program(rng: random.Random) -> Program:
    """A few buffers, 2-8 ADD / NOP tasks with random regions, counters and waits.

    Reads mostly target data that earlier tasks wrote (or inputs), the last tasks
    mostly cover the output, counters mostly follow program order (stages), and
    waits come from the conflicts with earlier tasks (full counts mostly, with a
    share of partial thresholds, dropped and extra waits): a mix of safe and unsafe."""
    size, acts = 8, (BufferKind.ACTIVATION, BufferKind.ACTIVATION)
    kinds = (BufferKind.INPUT, BufferKind.WEIGHT, *acts, rng.choice((BufferKind.ACTIVATION, BufferKind.KV)),
             BufferKind.OUTPUT)
    const = [i for i, k in enumerate(kinds) if k in (BufferKind.INPUT, BufferKind.WEIGHT, BufferKind.KV)]
    n, nsm, out = rng.randint(2, 8), rng.randint(1, 3), len(kinds) - 1
    ncnt = rng.randint(1, n) if rng.random() < 0.2 else rng.randint((n + 1) // 2, n)
    tasks: list[Task] = []
    written: list[Region] = []  # write regions of earlier tasks
    out_at = stage = 0  # the output is covered left to right by the last tasks

    def src(lo: int, hi: int) -> int:
        cover = [r.buffer for r in written if r.lo <= lo and hi <= r.hi]
        if cover and rng.random() < 0.6:
            return rng.choice(cover)
        return rng.choice(const) if rng.random() < 0.9 else rng.randrange(len(kinds))

    for i in range(n):
        sm = rng.randrange(nsm)
        stage = min(ncnt - 1, stage + 1) if i and rng.random() < 0.6 else stage
        signal = (stage if rng.random() < 0.85 else rng.randrange(ncnt)) if rng.random() < 0.9 else None
        if rng.random() < 0.15:
            reads = [rng.choice(written) if written and rng.random() < 0.8 else Region(rng.choice(const), 0, size)
                     for _ in range(rng.randint(0, 2))]
            tasks.append(Task(i, "NOP", sm, [Region(r.buffer, r.lo, r.hi) for r in reads], [], [], signal, {}))
            continue
        if i >= n - 2 and out_at < size and rng.random() < 0.85:
            dst, lo = out, out_at
            hi = out_at = size if i == n - 1 else rng.randint(lo + 1, size)
        elif written and rng.random() < 0.5:
            dst, w = rng.choice([2, 3, 4, out]), rng.choice(written)
            lo = rng.randint(w.lo, w.hi - 1)
            hi = rng.randint(lo + 1, w.hi)
        else:
            dst, lo = rng.choice([2, 3, 4, out]), rng.randrange(size)
            hi = rng.randint(lo + 1, min(size, lo + rng.choice((1, 2, 4, 8))))
        extra = (rng.choice(written),) if written and rng.random() < 0.3 else ()
        mode = "accumulate" if rng.random() < 0.15 else "write"
        tasks.append(add_task(i, sm, src(lo, hi), src(lo, hi), dst, lo, hi, signal, mode, extra))
        written.append(Region(dst, lo, hi))
    sig = signallers_of(Program([], [], tasks))
    for t in tasks:
        for u in tasks[: t.id]:
            if u.signal is None or not touches(u, t) or (u.signal == t.signal and rng.random() < 0.9):
                continue
            full, r = len(sig[u.signal]), rng.random()
            th = full if r < 0.8 else (rng.randint(1, full) if r < 0.93 else 0)
            if th:
                set_wait(t, u.signal, th)
        earlier = [c for c, ids in sig.items() if max(ids) < t.id]
        if rng.random() < 0.1 and sig:
            c = rng.choice(sorted(earlier if earlier and rng.random() < 0.7 else sig))
            set_wait(t, c, rng.randint(1, len(sig[c])))
    return make_program(kinds, size, tasks, ncnt, nsm)


def touches(u: Task, t: Task) -> bool:
    """u and t access a common element and at least one of them writes it."""
    def hit(xs: list[Region], ys: list[Region]) -> bool:
        return any(x.buffer == y.buffer and x.lo < y.hi and y.lo < x.hi for x in xs for y in ys)
    return hit(u.writes, t.reads + t.writes) or hit(u.reads, t.writes)


def random_sync_program(rng: random.Random) -> Program:
    """A synchronisation-heavy random program: 3-9 tasks over 1-4 SMs share few counters
    with random (often partial) thresholds, mostly on counters whose signallers all come
    earlier in program order. Data lives in KV buffers (no initialisation rule) and one
    output the last task writes, so the verdict turns on races and deadlocks."""
    size = rng.choice((4, 8, 12))
    n, nsm = rng.randint(3, 9), rng.randint(1, 4)
    ncnt = rng.randint(1, max(1, n // 2))
    tasks: list[Task] = []
    for i in range(n):
        sig, sm = rng.randrange(ncnt) if rng.random() < 0.9 else None, rng.randrange(nsm)
        if i < n - 1 and rng.random() < 0.3:
            lo = rng.randrange(size)
            tasks.append(Task(i, "NOP", sm, [Region(rng.choice((0, 0, 1, 2, 3)), lo, rng.randint(lo + 1, size))],
                              [], [], sig, {}))
            continue
        lo = rng.randrange(size) if i < n - 1 else 0
        hi = rng.randint(lo + 1, min(size, lo + 3)) if i < n - 1 else size
        mode = "accumulate" if rng.random() < 0.2 else "write"
        tasks.append(add_task(i, sm, rng.choice((0, 0, 0, 1, 2)), 0, rng.choice((1, 2, 3)) if i < n - 1 else 3, lo, hi,
                          sig, mode))
    signallers = signallers_of(Program([], [], tasks))
    for t in tasks:
        pool = sorted(c for c, ids in signallers.items() if max(ids) < t.id or rng.random() < 0.1)
        for c in rng.sample(pool, min(rng.choice((0, 1, 1, 2, 2, 3)), len(pool))):
            t.waits.append(Wait(c, rng.randint(1, len(signallers[c]))))
    return make_program((BufferKind.INPUT, BufferKind.KV, BufferKind.KV, BufferKind.OUTPUT), size, tasks, ncnt, nsm)


# The random classes of the corpus: name -> generator.
RANDOM = {"random_small": random_program, "random_sync": random_sync_program}
