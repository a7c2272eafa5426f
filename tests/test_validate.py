"""The validator (DESIGN §6): each guarantee has a rejected example and an accepted twin."""

from __future__ import annotations

import itertools
import json
import random
import time
from collections import Counter
from typing import Any

from pytest_amk import ir
from pytest_amk.ir import (
    Buffer,
    BufferKind,
    DType,
    Program,
    Region,
    Task,
    Wait,
)
from pytest_amk.validate import Result, validate, validate_json

N = 16  # elements of the small test buffers


class Builder:
    """Hand-built programs. Buffer 0 is the input 'x' of N fp32 elements."""

    def __init__(self, target: str | None = "h100", **meta: Any) -> None:
        self.buffers: list[Buffer] = []
        self.counters: list[ir.Counter] = []
        self.tasks: list[Task] = []
        self.meta: dict[str, Any] = dict(meta)
        if target is not None:
            self.meta["target"] = target
        self.x = self.buf("x", "input")

    def buf(self, name: str, kind: str = "activation", n: int = N, dtype: str = "fp32") -> int:
        self.buffers.append(Buffer(len(self.buffers), name, BufferKind(kind), DType(dtype), (n,)))
        return len(self.buffers) - 1

    def ctr(self, name: str) -> int:
        self.counters.append(ir.Counter(len(self.counters), name))
        return len(self.counters) - 1

    def task(self, op: str, sm: int, params: dict[str, Any], reads: list[Region], writes: list[Region],
             waits: tuple[tuple[int, int], ...] = (), signal: int | None = None) -> int:
        self.tasks.append(Task(len(self.tasks), op, sm, reads, writes, [Wait(c, t) for c, t in waits],
                               signal, params))
        return len(self.tasks) - 1

    def add(self, sm: int, out: int, lo: int = 0, hi: int = N, a: int | None = None, b: int | None = None,
            waits: tuple[tuple[int, int], ...] = (), signal: int | None = None, mode: str = "write") -> int:
        """ADD: out[lo:hi] = a[lo:hi] + b[lo:hi] (a and b default to the input x)."""
        a = self.x if a is None else a
        b = self.x if b is None else b
        return self.task("ADD", sm, dict(a=a, b=b, out=out, lo=lo, hi=hi),
                         [Region(a, lo, hi), Region(b, lo, hi)], [Region(out, lo, hi, mode)], waits, signal)

    def gemv(self, sm: int, inp: int, weight: int, out: int, n_lo: int, n_hi: int, k: int,
             residual: int = -1, waits: tuple[tuple[int, int], ...] = (), signal: int | None = None) -> int:
        reads = [Region(inp, 0, k), Region(weight, n_lo * k, n_hi * k)]
        if residual >= 0:
            reads.append(Region(residual, n_lo, n_hi))
        params = dict(inp=inp, weight=weight, out=out, n_lo=n_lo, n_hi=n_hi, k=k, norm_weight=-1, eps=1e-5,
                      residual=residual, act=0, up_row=0, inp_blocks=0, head_dim=0)
        return self.task("GEMV", sm, params, reads, [Region(out, n_lo, n_hi)], waits, signal)

    def program(self) -> Program:
        return Program(self.buffers, self.counters, self.tasks, self.meta)


def ok(p: Program) -> Result:
    r = validate(p)
    assert r.ok, [str(e) for e in r.errors]
    return r


def rejected(p: Program, code: str, *needles: str) -> Result:
    r = validate(p)
    assert not r.ok
    assert not any("could not be analysed" in e.message for e in r.errors), r.errors  # no internal error
    msgs = [e.message for e in r.errors if e.code == code]
    assert msgs, f"no {code} error in {[str(e) for e in r.errors]}"
    assert any(all(n in m for n in needles) for m in msgs), (needles, msgs)
    return r


# -- deadlock -------------------------------------------------------------------

def test_unreachable_threshold() -> None:
    for threshold, good in ((2, False), (1, True)):
        b = Builder()
        h, g, c = b.buf("h"), b.buf("g"), b.ctr("h_done")
        b.add(0, h, signal=c)
        b.add(1, g, a=h, waits=((c, threshold),))
        if good:
            ok(b.program())
        else:
            rejected(b.program(), "unreachable-threshold", "task 1 (ADD, sm 1)", "counter 0 'h_done' >= 2",
                     "only 1 task(s)", "task 0 (ADD, sm 0)")


def test_deadlock_cycle_across_two_sms() -> None:
    for good in (False, True):
        b = Builder()
        h, g, c0, c1 = b.buf("h"), b.buf("g"), b.ctr("c0"), b.ctr("c1")
        b.add(0, h, waits=() if good else ((c1, 1),), signal=c0)
        b.add(1, g, waits=((c0, 1),), signal=c1)
        if good:
            ok(b.program())
        else:
            r = rejected(b.program(), "deadlock", "cycle", "task 0 (ADD, sm 0) waits for counter 1 'c1' >= 1",
                         "task 1 (ADD, sm 1) waits for counter 0 'c0' >= 1")
            assert "race" not in r.codes()  # later checks are skipped, not run on a stuck program


def test_deadlock_cycle_within_one_queue() -> None:
    for good in (False, True):
        b = Builder()
        h, g, c = b.buf("h"), b.buf("g"), b.ctr("late")
        if good:
            b.add(0, h, signal=c)
            b.add(0, g, waits=((c, 1),))
            ok(b.program())
        else:  # task 0 waits for a counter only task 1, behind it in the same queue, signals
            b.add(0, g, waits=((c, 1),))
            b.add(0, h, signal=c)
            rejected(b.program(), "deadlock", "task 0 (ADD, sm 0) waits for counter 0 'late' >= 1 (reached 0)",
                     "signalled by task 1 (ADD, sm 0) queued behind task 0")


# -- races ------------------------------------------------------------------------

def test_raw_race_reader_not_waiting() -> None:
    for good in (False, True):
        b = Builder()
        h, g, c = b.buf("h"), b.buf("g"), b.ctr("h_done")
        b.add(0, h, 0, 8, signal=c)
        b.add(1, g, 0, 8, a=h, waits=((c, 1),) if good else ())
        if good:
            ok(b.program())
        else:
            rejected(b.program(), "race", "RAW", "activation 'h'[0:8)", "task 0 (ADD, sm 0) writes [0:8)",
                     "task 1 (ADD, sm 1) reads [0:8)", "does not wait on counter 0 'h_done'")


def test_threshold_below_signaller_count_does_not_order_a_writer() -> None:
    b = Builder()
    h, g, c = b.buf("h"), b.buf("g"), b.ctr("h_tiles")
    b.add(0, h, 0, 8, signal=c)
    b.add(1, h, 8, 16, signal=c)
    b.add(2, g, a=h, waits=((c, 1),))  # one finished tile says nothing about which one
    rejected(b.program(), "race", "RAW", "task 2 (ADD, sm 2) reads", "waits for counter 0 'h_tiles' >= 1 but 2 tasks")
    b.tasks[2].waits = [Wait(c, 2)]
    ok(b.program())


def test_chained_signallers_on_one_sm_are_ordered() -> None:
    """Signallers in one queue finish in order: threshold t guarantees the first t of them."""
    for waiter_first in (False, True):
        for read_second, good in ((False, True), (True, False)):
            b = Builder()
            h, g, o, c = b.buf("h"), b.buf("g"), b.buf("o"), b.ctr("chain")
            if waiter_first:  # the waiter is listed before its signallers (needs a second HB pass)
                b.add(1, o, a=g if read_second else h, waits=((c, 1),))
            b.add(0, h, signal=c)
            b.add(0, g, signal=c)
            if not waiter_first:
                b.add(1, o, a=g if read_second else h, waits=((c, 1),))
            if good:
                ok(b.program())
            else:
                rejected(b.program(), "race", "RAW", "'g'[0:16)")


def test_war_race() -> None:
    for good in (False, True):
        b = Builder()
        h, g, c0, c1 = b.buf("h"), b.buf("g"), b.ctr("h_done"), b.ctr("g_done")
        b.add(0, h, signal=c0)
        b.add(1, g, a=h, waits=((c0, 1),), signal=c1)  # reads h
        b.add(2, h, waits=((c0, 1), (c1, 1)) if good else ((c0, 1),))  # overwrites h
        if good:
            ok(b.program())
        else:
            rejected(b.program(), "race", "WAR", "task 1 (ADD, sm 1) reads [0:16)",
                     "task 2 (ADD, sm 2) writes [0:16)", "activation 'h'[0:16)")


def test_waw_race() -> None:
    for good in (False, True):
        b = Builder()
        h, c = b.buf("h"), b.ctr("first")
        b.add(0, h, 0, 8, signal=c)
        b.add(1, h, 4, 12, waits=((c, 1),) if good else ())
        b.add(1, h, 12, 16)
        if good:
            ok(b.program())
        else:
            rejected(b.program(), "race", "WAW", "activation 'h'[4:8)", "task 0 (ADD, sm 0) writes [0:8)",
                     "task 1 (ADD, sm 1) writes [4:12)")


def test_accumulates_commute_but_race_with_an_unordered_read() -> None:
    for threshold in (2, 1):
        b = Builder()
        h, g, c = b.buf("h"), b.buf("g"), b.ctr("partials")
        b.add(0, h, mode="accumulate", signal=c)
        b.add(1, h, mode="accumulate", signal=c)
        b.add(2, g, a=h, waits=((c, threshold),))
        if threshold == 2:
            ok(b.program())
        else:
            rejected(b.program(), "race", "RAW", "accumulates into [0:16)", "task 2 (ADD, sm 2) reads [0:16)")


def test_accumulate_races_with_plain_write() -> None:
    b = Builder()
    h = b.buf("h")
    b.add(0, h, mode="accumulate")
    b.add(1, h, 0, 4)
    rejected(b.program(), "race", "WAW", "'h'[0:4)", "accumulates into [0:16)")


# -- well-formedness and resources ---------------------------------------------------

def test_region_out_of_bounds() -> None:
    b = Builder()
    h = b.buf("h")
    b.task("ADD", 0, dict(a=0, b=0, out=h, lo=0, hi=N), [Region(0, 0, N)], [Region(h, 0, N + 4)])
    rejected(b.program(), "bad-region", "task 0 (ADD, sm 0)", "activation 'h'[0:20)", "inside its 16 elements")
    b.tasks[0].writes = [Region(h, 0, N)]
    ok(b.program())


def test_region_must_cover_what_params_touch() -> None:
    b = Builder()
    h, g = b.buf("h"), b.buf("g")
    b.add(0, h)
    t = b.add(0, g, a=h)
    b.tasks[t].reads = [Region(h, 0, 8), Region(0, 0, N)]  # ADD reads a[0:16), declares [0:8)
    rejected(b.program(), "bad-region", "task 1 (ADD, sm 0)", "do not cover [8:16)")


def test_write_to_weight_rejected() -> None:
    for kind, good in (("weight", False), ("activation", True)):
        b = Builder()
        w = b.buf("w", kind)
        b.add(0, w)
        if good:
            ok(b.program())
        else:
            rejected(b.program(), "bad-region", "task 0 (ADD, sm 0)", "weight 'w'[0:16)", "read-only")


def test_sm_out_of_range() -> None:
    for sm, good in ((132, False), (131, True)):
        b = Builder()
        b.add(sm, b.buf("h"))
        if good:
            ok(b.program())
        else:
            rejected(b.program(), "resource", "task 0 (ADD, sm 132)", "h100's 132 SMs")
    b = Builder(num_sms=4)
    b.add(5, b.buf("h"))
    rejected(b.program(), "resource", "SM 5", "meta.num_sms = 4")


def test_smem_over_target_limit() -> None:
    for k, good in ((32768, False), (16384, True)):
        b = Builder("l4")
        inp, w, out = b.buf("inp", "input", k), b.buf("w", "weight", 4 * k), b.buf("out", "output", 4)
        b.gemv(0, inp, w, out, 0, 4, k)
        if good:
            ok(b.program())
        else:
            rejected(b.program(), "resource", "131360 bytes", "task 0 (GEMV, sm 0) needs 131072",
                 "32 for the buffer table", "l4 allows 101376")


def test_threads_per_block_limits() -> None:
    for tpb, good in ((2048, False), (1024, True), (100, False)):
        b = Builder(threads_per_block=tpb)
        b.add(0, b.buf("h"))
        if good:
            ok(b.program())
        else:
            rejected(b.program(), "resource", f"threads_per_block = {tpb}")


def test_malformed_params_and_ids() -> None:
    b = Builder()
    h = b.buf("h")
    b.add(0, h)
    b.tasks[0].params["lo"] = 1.5
    del b.tasks[0].params["b"]
    rejected(b.program(), "malformed", "param 'lo' must be an int32")
    rejected(b.program(), "malformed", "missing param 'b'")
    b = Builder()
    b.add(0, b.buf("h"), signal=3)
    rejected(b.program(), "malformed", "signal 3 is not None or a counter id")


def test_unknown_target_in_meta() -> None:
    b = Builder("no-such-gpu")
    b.add(0, b.buf("h"))
    rejected(b.program(), "malformed", "'no-such-gpu'")


# -- initialisation -------------------------------------------------------------------

def test_unwritten_output_element() -> None:
    for hi, good in ((12, False), (N, True)):
        b = Builder()
        b.add(0, b.buf("logits", "output"), 0, hi)
        if good:
            ok(b.program())
        else:
            rejected(b.program(), "unwritten-output", "output 'logits' elements [12:16) of [0:16)")


def test_uninitialised_activation_read() -> None:
    for hi, good in ((8, False), (N, True)):
        b = Builder()
        h, g, c = b.buf("h"), b.buf("g"), b.ctr("h_done")
        b.add(0, h, 0, hi, signal=c)
        b.add(1, g, a=h, waits=((c, 1),))
        if good:
            ok(b.program())
        else:
            rejected(b.program(), "uninitialised-read", "task 1 (ADD, sm 1) reads activation 'h'[0:16)",
                     "'h'[8:16) is not written", "no task writes it")


def test_kv_and_input_reads_are_exempt() -> None:
    b = Builder()
    kv, g = b.buf("kv", "kv"), b.buf("g")
    b.add(0, g, a=kv)
    ok(b.program())


# -- JSON ------------------------------------------------------------------------------

def _program_json() -> dict[str, Any]:
    b = Builder()
    h, c = b.buf("h"), b.ctr("h_done")
    b.add(0, h, signal=c)
    b.add(1, b.buf("o", "output"), a=h, waits=((c, 1),))
    return b.program().to_json()


def test_validate_json_round_trip() -> None:
    r = validate_json(json.dumps(_program_json()))
    assert r.ok, r.errors


def test_validate_json_malformed_never_raises() -> None:
    good = _program_json()
    cases: list[tuple[str, str]] = [("{not json", "not JSON"), ("[1, 2]", "must be a JSON object"), ("", "not JSON")]

    def mutate(f: Any, needle: str) -> None:
        d = json.loads(json.dumps(good))
        f(d)
        cases.append((json.dumps(d), needle))

    mutate(lambda d: d.pop("tasks"), "tasks: expected a list")
    mutate(lambda d: d["tasks"][0].pop("sm"), "tasks[0]: missing field 'sm'")
    mutate(lambda d: d["tasks"][0].update(sm="zero"), "tasks[0].sm: expected int")
    mutate(lambda d: d["tasks"][1]["reads"][0].update(lo=None), "tasks[1].reads")
    mutate(lambda d: d["buffers"][1].update(kind="scratch"), "buffers[1].kind")
    mutate(lambda d: d["tasks"][0].update(op="MATMUL"), "unknown op 'MATMUL'")
    mutate(lambda d: d["tasks"][0].update(params=[1, 2]), "tasks[0].params")
    mutate(lambda d: d["tasks"][0]["params"].update(out="h"), "param 'out' must be an int32")
    mutate(lambda d: d.update(version=99), "version")
    mutate(lambda d: d["tasks"][1].update(waits=[{"counter": 7, "threshold": 1}]), "wait")
    for text, needle in cases:
        r = validate_json(text)
        assert not r.ok and r.errors[0].code == "malformed", (text[:80], r.errors)
        assert any(needle in e.message for e in r.errors), (needle, [e.message for e in r.errors])


# -- scale ------------------------------------------------------------------------------

def build_layers(layers: int = 16, tiles: int = 132, rows: int = 16) -> Program:
    """layers x 4 stages of ``tiles`` tasks: GEMV (whole x -> a), ADD (a + x -> b), GEMV (b -> c),
    GEMV (c -> x' with residual b). Every stage waits for the full count of the stage it reads."""
    n = tiles * rows
    b = Builder(num_sms=tiles, threads_per_block=256)
    x = b.buf("x.0", n=n)
    w = b.buf("w", "weight", n=n * n)
    tok = b.buf("tok", "input", n=n)
    c0 = b.ctr("embed")
    for t in range(tiles):
        b.add(t, x, t * rows, (t + 1) * rows, a=tok, b=tok, signal=c0)

    def stage(name: str) -> tuple[int, int]:
        return b.buf(name, n=n), b.ctr(name)

    for layer in range(layers):
        (a, ca), (bb, cb), (c, cc), (x2, cx) = (stage(f"{s}.{layer + (s == 'x')}") for s in "abcx")
        for t in range(tiles):
            b.gemv(t, x, w, a, t * rows, (t + 1) * rows, n, waits=((c0, tiles),), signal=ca)
        for t in range(tiles):
            b.add(t, bb, t * rows, (t + 1) * rows, a=a, b=x, waits=((ca, tiles),), signal=cb)
        for t in range(tiles):
            b.gemv(t, bb, w, c, t * rows, (t + 1) * rows, n, waits=((cb, tiles),), signal=cc)
        for t in range(tiles):
            b.gemv(t, c, w, x2, t * rows, (t + 1) * rows, n, residual=bb, waits=((cc, tiles),), signal=cx)
        x, c0 = x2, cx
    out = b.buf("out", "output", n=n)
    for t in range(tiles):
        b.add(t, out, t * rows, (t + 1) * rows, a=x, b=x, waits=((c0, tiles),))
    return b.program()


def test_scale_16_layers() -> None:
    p = build_layers()
    assert len(p.tasks) > 8000
    t0 = time.perf_counter()
    r = validate(p)
    print(f"validate: {len(p.tasks)} tasks in {time.perf_counter() - t0:.3f} s; {r.stats}")
    assert r.ok, r.errors[:3]
    # An ADD tile reads only tiles its own SM wrote before it: dropping its wait stays safe.
    add = next(t for t in p.tasks[4000:] if t.op == "ADD")
    add.waits = []
    assert validate(p).ok
    # A GEMV tile reads the whole vector that the other SMs write: dropping its wait races.
    victim = next(t for t in p.tasks[add.id:] if t.op == "GEMV")
    victim.waits = []
    t0 = time.perf_counter()
    r = validate(p)
    print(f"mutated: {time.perf_counter() - t0:.3f} s; {[str(e) for e in r.errors[:2]]}")
    assert not r.ok and "race" in r.codes()
    assert any(f"task {victim.id} (GEMV" in e.message and "RAW" in e.message for e in r.errors)


# -- differential check against brute-force exploration --------------------------------

def _random_program(rng: random.Random) -> Program:
    """Up to 8 ADD tasks on 4 SMs over two 8-element activations; waits mostly on earlier signallers."""
    b = Builder()
    bufs = [b.buf("h", n=8), b.buf("g", n=8)]
    ctrs = [b.ctr(f"c{i}") for i in range(rng.randint(1, 3))]
    n = rng.randint(2, 8)
    sig = [rng.choice([None, *ctrs]) for _ in range(n)]
    for i in range(n):
        lo = rng.choice((0, 4))
        hi = rng.choice([v for v in (4, 8) if v > lo])
        count = Counter(s for s in (sig if rng.random() < 0.25 else sig[:i]) if s is not None)
        picked = rng.sample(sorted(count), min(len(count), rng.randint(0, 2)))
        waits = tuple((c, rng.randint(1, count[c])) for c in picked)
        b.add(rng.randint(0, 3), rng.choice(bufs), lo, hi, a=rng.choice([b.x, b.x, *bufs]), waits=waits,
              signal=sig[i], mode="accumulate" if rng.random() < 0.15 else "write")
    return b.program()


def _explore(p: Program) -> set[str]:
    """Every interleaving of task starts and finishes: which guarantees fail."""
    queues: dict[int, list[Task]] = {}
    for t in p.tasks:
        queues.setdefault(t.sm, []).append(t)
    qs = list(queues.values())
    bad: set[str] = set()

    def acc(t: Task) -> list[tuple[str, int, int, int]]:
        return [("r", r.buffer, r.lo, r.hi) for r in t.reads if r.buffer != 0] + [
            ("a" if r.mode == "accumulate" else "w", r.buffer, r.lo, r.hi) for r in t.writes]

    seen: set[tuple[tuple[int, int], ...]] = set()
    stack = [tuple((0, 0) for _ in qs)]
    while stack:
        state = stack.pop()
        if state in seen:
            continue
        seen.add(state)
        finished = [t for q, (i, _) in zip(qs, state, strict=True) for t in q[:i]]
        running = [q[i] for q, (i, run) in zip(qs, state, strict=True) if run]
        value = [sum(1 for t in finished if t.signal == c.id) for c in p.counters]
        for x, y in itertools.combinations(running, 2):
            for (rx, bx, lx, hx), (ry, by, ly, hy) in itertools.product(acc(x), acc(y)):
                if bx == by and max(lx, ly) < min(hx, hy) and {rx, ry} not in ({"r"}, {"a"}):
                    bad.add("race")
        moves = []
        for k, (q, (i, run)) in enumerate(zip(qs, state, strict=True)):
            if run:
                moves.append(state[:k] + ((i + 1, 0),) + state[k + 1:])
            elif i < len(q) and all(value[w.counter] >= w.threshold for w in q[i].waits):
                written = {(r.buffer, e) for t in finished for r in t.writes for e in range(r.lo, r.hi)}
                if any((r.buffer, e) not in written for r in q[i].reads if r.buffer != 0 for e in range(r.lo, r.hi)):
                    bad.add("uninitialised-read")
                moves.append(state[:k] + ((i, 1),) + state[k + 1:])
        if not moves and len(finished) < len(p.tasks):
            bad.add("deadlock")
        stack.extend(moves)
    return bad


def test_differential_against_exhaustive_exploration() -> None:
    rng = random.Random(1234)
    safe = accepted = 0
    for _ in range(600):
        p = _random_program(rng)
        truth = _explore(p)
        r = validate(p)
        codes = r.codes() | ({"deadlock"} if "unreachable-threshold" in r.codes() else set())
        if "deadlock" in truth:
            assert "deadlock" in codes, (p.to_json(), r.errors)
        else:
            assert "deadlock" not in codes, (p.to_json(), r.errors)
            assert truth <= codes, (truth, p.to_json(), r.errors)  # sound: every unsafe program rejected
            safe += not truth
            accepted += not truth and r.ok
    print(f"precision: {accepted}/{safe} safe random programs accepted")
    assert accepted >= 0.95 * safe


def test_pipelining_depth_over_register_budget_is_rejected() -> None:
    from pytest_amk.ir import TARGETS, max_pipelining_depth
    from pytest_amk.lower import lower
    from pytest_amk.models import config_for
    from pytest_amk.schedule import default_knobs

    assert max_pipelining_depth(1024, "bf16") == 1 and max_pipelining_depth(256, "bf16") == 8
    knobs = default_knobs()
    knobs.update(threads_per_block=1024, pipelining_depth=4)
    program = lower(config_for("toy"), TARGETS["h100"], knobs, "bf16", 16)
    result = validate(program)
    assert not result.ok and "pipelining_depth = 4" in result.errors[0].message
    knobs["pipelining_depth"] = 1
    assert validate(lower(config_for("toy"), TARGETS["h100"], knobs, "bf16", 16)).ok
