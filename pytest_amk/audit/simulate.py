"""An independent safety oracle: explores executions of a Program (DESIGN §5).

This module shares no code with ``pytest_amk.validate`` (it only reads the IR
data classes). It models every task as two events, *start* and *finish*:

* counters start at 0 and only increase; a task may start when it is the head
  of its SM's queue (its queue predecessor has finished) and every wait has
  ``value(counter) >= threshold``; a started task may finish at any later
  point; on finish its ``signal`` counter gains 1.

Verdicts, per execution:

* **deadlock**: an execution reaches a state where nothing can start or
  finish but some task has not finished;
* **race**: two tasks whose regions overlap (same buffer, intersecting
  ``[lo, hi)``), at least one writing, not both accumulating, are not ordered
  in every execution: some execution starts B before A finished and some
  execution starts A before B finished (they can run concurrently or their
  order can flip);
* **uninit**: a task reads an ACTIVATION (or OUTPUT) element while no task
  that writes that element has finished (INPUT, WEIGHT and KV are exempt);
* **unwritten**: an OUTPUT element that no task writes.

Three exploration methods:

``exhaustive``
    every interleaving of start/finish events, states ``(started, finished)``
    memoised; for small programs (``exhaustive_limit`` tasks, ``state_limit``).
``random``
    many randomised interleavings (random per-run task priorities plus uniform
    picks, so that signallers finish in many different orders), with
    happens-before tracked by vector clocks. Each task has one finish event,
    so a vector clock is a bitset of the tasks whose finish happens-before an
    event. A task's start happens after its queue predecessor's finish and,
    for a wait ``(c, t)``, after the finishes of the *first t signallers of c
    in that execution* (those are what released it; later ones did not). Two
    conflicting tasks neither of which happens-before the other in one run
    race (the run can be reordered, keeping each start's causal past, so that
    both run at once).
``delay``
    adversarial schedules: for each task A, run every task as far as possible
    while A is never allowed to finish. Enabled events stay enabled (counters
    and queue positions only grow), so this greatest run contains every
    execution prefix in which A has not finished: B can start before A
    finishes iff B starts in it. Exact, and polynomial: races, uninitialised
    reads (freeze all writers of an element) and deadlock (freeze nothing) are
    decided for programs of any size. The tests cross-check it against the
    exhaustive explorer on random small programs.

``simulate(method="auto")`` is exhaustive for small programs and delay plus
random runs otherwise. ``SimResult.complete`` is True when the verdict is
exact (exhaustive or delay), False for random runs alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from pytest_amk.ir import BufferKind, Program

INIT_CHECKED = (BufferKind.ACTIVATION, BufferKind.OUTPUT)
METHODS = ("auto", "exhaustive", "random", "delay")


@dataclass(frozen=True)
class Race:
    kind: str  # RAW | WAR | WAW, named in program (task id) order
    first: int  # task ids, first < second
    second: int
    buffer: int
    lo: int
    hi: int

    def __str__(self) -> str:
        return f"{self.kind} race: tasks {self.first} and {self.second} on buffer {self.buffer}[{self.lo}:{self.hi})"


@dataclass(frozen=True)
class Uninit:
    task: int
    buffer: int
    lo: int
    hi: int

    def __str__(self) -> str:
        return f"task {self.task} may read buffer {self.buffer}[{self.lo}:{self.hi}) before any writer finished"


@dataclass(frozen=True)
class Unwritten:
    buffer: int
    lo: int
    hi: int

    def __str__(self) -> str:
        return f"output buffer {self.buffer}[{self.lo}:{self.hi}) is never written"


@dataclass
class SimResult:
    safe: bool
    deadlock: bool
    races: list[Race]
    uninit: list[Uninit]
    unwritten: list[Unwritten]
    exhaustive: bool  # every interleaving was explored
    complete: bool  # the verdict is exact (exhaustive or delay analysis)
    method: str
    runs: int = 0  # random interleavings run
    states: int = 0  # states explored (exhaustive)
    stuck: list[int] = field(default_factory=list)  # tasks that never finish in a deadlocked run

    def kinds(self) -> set[str]:
        out = set()
        if self.deadlock:
            out.add("deadlock")
        if self.races:
            out.add("race")
        if self.uninit:
            out.add("uninit")
        if self.unwritten:
            out.add("unwritten")
        return out

    def summary(self) -> str:
        head = f"{'safe' if self.safe else 'UNSAFE'} ({self.method}{', exact' if self.complete else ''})"
        parts = [f"deadlock: tasks {self.stuck[:8]} never finish"] if self.deadlock else []
        parts += [str(x) for x in (self.races[:3] + self.uninit[:3] + self.unwritten[:3])]  # type: ignore[operator]
        return head + (": " + "; ".join(parts) if parts else "")


def _bits(mask: int) -> list[int]:
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


class _Model:
    """The program compiled to indices and bitmasks (task index = list position)."""

    def __init__(self, program: Program) -> None:
        tasks = program.tasks
        self.n = n = len(tasks)
        self.ids = [t.id for t in tasks]
        by_sm: dict[int, list[int]] = {}
        for i, t in enumerate(tasks):
            by_sm.setdefault(t.sm, []).append(i)
        self.queues = [by_sm[s] for s in sorted(by_sm)]
        self.qpred = [-1] * n
        self.queue_of = [0] * n
        for k, q in enumerate(self.queues):
            for i in q:
                self.queue_of[i] = k
        for q in self.queues:
            for a, b in zip(q, q[1:], strict=False):
                self.qpred[b] = a
        ncnt = 1 + max([len(program.counters) - 1] + [w.counter for t in tasks for w in t.waits]
                       + [t.signal for t in tasks if t.signal is not None])
        self.ncnt = ncnt
        self.waits = [tuple((w.counter, w.threshold) for w in t.waits) for t in tasks]
        self.signal = [-1 if t.signal is None else t.signal for t in tasks]
        self.signallers = [0] * ncnt
        for i, c in enumerate(self.signal):
            if c >= 0:
                self.signallers[c] |= 1 << i
        kinds = {b.id: b.kind for b in program.buffers}
        numel = {b.id: b.numel for b in program.buffers}
        # accesses per buffer: (task, role, lo, hi); role r = read, w = write, a = accumulate
        acc: dict[int, list[tuple[int, str, int, int]]] = {}
        for i, t in enumerate(tasks):
            for r in t.reads:
                if r.lo < r.hi:
                    acc.setdefault(r.buffer, []).append((i, "r", r.lo, r.hi))
            for r in t.writes:
                if r.lo < r.hi:
                    acc.setdefault(r.buffer, []).append((i, "a" if r.mode == "accumulate" else "w", r.lo, r.hi))
        self.conflicts = self._conflicts(acc)
        self.read_segs = self._read_segments(acc, kinds)
        self.unwritten = []
        for bid in sorted(numel):
            if kinds[bid] is not BufferKind.OUTPUT:
                continue
            at = 0
            for _, _role, lo, hi in sorted((x for x in acc.get(bid, []) if x[1] != "r"), key=lambda x: x[2]):
                if lo > at:
                    self.unwritten.append(Unwritten(bid, at, lo))
                at = max(at, hi)
            if at < numel[bid]:
                self.unwritten.append(Unwritten(bid, at, numel[bid]))

    def _conflicts(self, acc: dict[int, list[tuple[int, str, int, int]]]) -> dict[tuple[int, int], Race]:
        """Every pair of tasks with conflicting overlapping accesses -> one witness (program order)."""
        out: dict[tuple[int, int], Race] = {}
        for bid, lst in acc.items():
            lst = sorted(lst, key=lambda x: x[2])
            active: list[tuple[int, str, int, int]] = []
            for cur in lst:
                i, role, lo, hi = cur
                active = [x for x in active if x[3] > lo]
                for j, rj, lj, hj in active:
                    if j == i or (role == "r" and rj == "r") or (role == "a" and rj == "a"):
                        continue
                    a, b, ra, rb = (j, i, rj, role) if j < i else (i, j, role, rj)
                    if (a, b) in out:
                        continue
                    kind = "WAW" if "r" not in (ra, rb) else ("RAW" if rb == "r" else "WAR")
                    out[(a, b)] = Race(kind, self.ids[a], self.ids[b], bid, max(lo, lj), min(hi, hj))
                active.append(cur)
        return out

    def _read_segments(self, acc: dict[int, list[tuple[int, str, int, int]]],
                       kinds: dict[int, BufferKind]) -> list[list[tuple[int, int, int, int]]]:
        """Per task: (buffer, lo, hi, writer mask) pieces of its checked reads, the writer
        mask being the other tasks that write every element of the piece."""
        segs: list[list[tuple[int, int, int, int]]] = [[] for _ in range(self.n)]
        for bid, lst in acc.items():
            if kinds.get(bid) not in INIT_CHECKED:
                continue
            writes = [(i, lo, hi) for i, role, lo, hi in lst if role != "r"]
            for i, role, lo, hi in lst:
                if role != "r":
                    continue
                pts = sorted({lo, hi} | {p for _, wl, wh in writes for p in (wl, wh) if lo < p < hi})
                pieces: list[tuple[int, int, int]] = []
                for a, b in zip(pts, pts[1:], strict=False):
                    wm = 0
                    for w, wl, wh in writes:
                        if w != i and wl < b and wh > a:
                            wm |= 1 << w
                    if pieces and pieces[-1][2] == wm and pieces[-1][1] == a:
                        pieces[-1] = (pieces[-1][0], b, wm)
                    else:
                        pieces.append((a, b, wm))
                segs[i] += [(bid, a, b, wm) for a, b, wm in pieces]
        return segs

    # -- enabling --------------------------------------------------------------
    def ready(self, i: int, finished: int) -> bool:
        """Waits of task i hold given the finished set (queue position checked by the caller)."""
        for c, th in self.waits[i]:
            if (finished & self.signallers[c]).bit_count() < th:
                return False
        return True

    # -- delay analysis ----------------------------------------------------------
    def reach(self, frozen: int) -> tuple[int, int]:
        """Greatest run in which no task of ``frozen`` finishes: (started, finished) masks."""
        value = [0] * self.ncnt
        started = finished = 0
        pos = [0] * len(self.queues)
        blocked = [False] * len(self.queues)
        progress = True
        while progress:
            progress = False
            for s, q in enumerate(self.queues):
                if blocked[s]:
                    continue
                k = pos[s]
                while k < len(q):
                    i = q[k]
                    if any(value[c] < th for c, th in self.waits[i]):
                        break
                    started |= 1 << i
                    progress = True
                    if (frozen >> i) & 1:
                        blocked[s] = True
                        break
                    finished |= 1 << i
                    if self.signal[i] >= 0:
                        value[self.signal[i]] += 1
                    k += 1
                pos[s] = k
        return started, finished


def _explore(m: _Model, state_limit: int) -> tuple[list[int], set[Uninit], bool, list[int], int] | None:
    """Every interleaving: (not-finished-at-start masks, uninit, deadlock, stuck, states), or None
    when there are more than ``state_limit`` states."""
    n, full = m.n, (1 << m.n) - 1
    nf = [0] * n
    uninit: set[Uninit] = set()
    deadlock, stuck = False, 0
    seen: set[tuple[int, int]] = set()
    stack = [(0, 0)]
    while stack:
        key = stack.pop()
        if key in seen:
            continue
        seen.add(key)
        if len(seen) > state_limit:
            return None
        started, finished = key
        moved = False
        for q in m.queues:
            for i in q:
                if not (started >> i) & 1:
                    p = m.qpred[i]
                    if (p < 0 or (finished >> p) & 1) and m.ready(i, finished):
                        moved = True
                        nf[i] |= full & ~finished
                        for bid, lo, hi, wm in m.read_segs[i]:
                            if not wm & finished:
                                uninit.add(Uninit(m.ids[i], bid, lo, hi))
                        nxt = (started | 1 << i, finished)
                        if nxt not in seen:
                            stack.append(nxt)
                    break
        for i in _bits(started & ~finished):
            moved = True
            nxt = (started, finished | 1 << i)
            if nxt not in seen:
                stack.append(nxt)
        if not moved and finished != full:
            deadlock = True
            stuck |= full & ~finished
    return nf, uninit, deadlock, _bits(stuck), len(seen)


def _random_run(m: _Model, rng: random.Random) -> tuple[set[tuple[int, int]], set[Uninit], bool, int]:
    """One randomised interleaving with causal (vector-clock) happens-before.

    Returns conflicting pairs left unordered, uninitialised reads, deadlock and the
    mask of unfinished tasks."""
    n = m.n
    prio = list(range(n))
    rng.shuffle(prio)
    eps = rng.choice((0.0, 0.2, 0.5, 1.0))
    hb = [0] * n  # tasks whose finish happens-before this task's start
    past: list[list[int]] = [[0] for _ in range(m.ncnt)]  # prefix-ORs of signallers' causal pasts
    pos = [0] * len(m.queues)
    running: list[int] = []
    started = finished = 0
    while True:
        events: list[tuple[int, int, int]] = []  # (priority, kind 0=start/1=finish, task)
        for s, q in enumerate(m.queues):  # a queue head whose predecessor finished
            if pos[s] < len(q):
                i = q[pos[s]]
                if not (started >> i) & 1 and m.ready(i, finished):
                    events.append((prio[i], 0, i))
        events += [(prio[i], 1, i) for i in running]
        if not events:
            break
        _, kind, i = rng.choice(events) if rng.random() < eps else max(events)
        if kind == 0:
            p = m.qpred[i]
            clock = (hb[p] | 1 << p) if p >= 0 else 0
            for c, th in m.waits[i]:
                clock |= past[c][max(th, 0)]
            hb[i] = clock
            started |= 1 << i
            running.append(i)
        else:
            running.remove(i)
            finished |= 1 << i
            c = m.signal[i]
            if c >= 0:
                past[c].append(past[c][-1] | hb[i] | 1 << i)
            pos[m.queue_of[i]] += 1
    unordered = {pr for pr in m.conflicts if (started >> pr[0]) & 1 and (started >> pr[1]) & 1
                 and not (hb[pr[1]] >> pr[0]) & 1 and not (hb[pr[0]] >> pr[1]) & 1}
    uninit = {Uninit(m.ids[i], bid, lo, hi) for i in _bits(started) for bid, lo, hi, wm in m.read_segs[i]
              if not wm & hb[i]}
    full = (1 << n) - 1
    return unordered, uninit, finished != full, full & ~finished


def simulate(program: Program, runs: int = 200, exhaustive_limit: int = 10, seed: int = 0,
             method: str = "auto", state_limit: int = 200_000) -> SimResult:
    """Explore executions of ``program`` and report deadlocks, races and bad reads.

    ``method``: "auto" (exhaustive up to ``exhaustive_limit`` tasks and ``state_limit``
    states, else delay analysis plus ``runs`` random interleavings), "exhaustive",
    "delay" or "random" (``runs`` random interleavings only)."""
    if method not in METHODS:
        raise ValueError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    m = _Model(program)
    races: dict[tuple[int, int], Race] = {}
    uninit: set[Uninit] = set()
    deadlock, stuck, states, nruns, exhaustive, complete = False, 0, 0, 0, False, False
    used = method
    if method == "exhaustive" or (method == "auto" and m.n <= exhaustive_limit):
        res = _explore(m, state_limit)
        if res is not None:
            nf, uninit, deadlock, stuck_list, states = res
            stuck = sum(1 << i for i in stuck_list)
            races = {pr: r for pr, r in m.conflicts.items()
                     if (nf[pr[1]] >> pr[0]) & 1 and (nf[pr[0]] >> pr[1]) & 1}
            exhaustive = complete = True
            used = "exhaustive"
        elif method == "exhaustive":
            raise ValueError(f"more than {state_limit} states: too large for exhaustive exploration")
    if not exhaustive and method in ("auto", "delay"):
        used = "delay" if method == "delay" else "delay+random"
        started, finished = m.reach(0)
        full = (1 << m.n) - 1
        if finished != full:
            deadlock, stuck = True, full & ~finished
        involved = 0
        for a, b in m.conflicts:
            involved |= 1 << a | 1 << b
        can = {a: m.reach(1 << a)[0] & ~(1 << a) for a in _bits(involved)}
        races = {pr: r for pr, r in m.conflicts.items()
                 if (can[pr[0]] >> pr[1]) & 1 and (can[pr[1]] >> pr[0]) & 1}
        cache: dict[int, int] = {}
        for i in range(m.n):
            for bid, lo, hi, wm in m.read_segs[i]:
                if wm not in cache:
                    cache[wm] = m.reach(wm)[0] if wm else started
                if (cache[wm] >> i) & 1:
                    uninit.add(Uninit(m.ids[i], bid, lo, hi))
        complete = True
        if method == "delay":
            runs = 0
    if not exhaustive and method in ("auto", "random"):
        if method == "random":
            used = "random"
        rng = random.Random(seed)
        for _ in range(runs):
            pairs, un, dl, left = _random_run(m, rng)
            nruns += 1
            for pr in pairs:
                races.setdefault(pr, m.conflicts[pr])
            uninit |= un
            if dl:
                deadlock, stuck = True, stuck | left
    race_list = sorted(races.values(), key=lambda r: (r.first, r.second))
    uninit_list = sorted(uninit, key=lambda u: (u.task, u.buffer, u.lo))
    safe = not (deadlock or race_list or uninit_list or m.unwritten)
    return SimResult(safe, deadlock, race_list, uninit_list, list(m.unwritten), exhaustive, complete, used,
                     nruns, states, [m.ids[i] for i in _bits(stuck)])
