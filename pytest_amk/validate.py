"""Static proof that a task Program is safe (DESIGN §6).

``validate(program)`` checks, in order:

1. Well-formedness (in ``wellformed.py``): ids, ops and their params, regions
   inside their buffers and consistent with what the op's params make it touch
   (``ir.footprint``), dtypes the ops require, SM ids, threads and shared memory
   inside the target's limits.
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
import time
from typing import Any

from pytest_amk import ir
from pytest_amk.ir import Buffer, BufferKind, GpuTarget, Program, Wait
from pytest_amk.wellformed import (
    MUTABLE,
    Result,
    ValidationError,
    _check_wellformed,
    _cl,
    _Errors,
    _gaps,
    _json_problems,
    _rl,
    _tl,
)

__all__ = ["Result", "ValidationError", "validate", "validate_json"]

MAX_HB_PASSES = 8  # refinement passes of the HB fixpoint (each pass is sound on its own)


def _bits(mask: int) -> list[int]:
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


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
