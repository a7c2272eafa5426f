"""The validator audit: simulator oracle, mutation corpus and a small audit."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from pytest_amk import cli
from pytest_amk.audit.mutate import BASE_NAMES, CLASSES, SAFE, base_program, make_case
from pytest_amk.audit.randprog import random_program, random_sync_program
from pytest_amk.audit.run import AuditReport, ClassStats, audit, exit_code, format_report, main
from pytest_amk.audit.simulate import simulate
from pytest_amk.ir import Buffer, BufferKind, Counter, DType, Program, Region, Task, Wait

METHODS = ("exhaustive", "delay", "random")
IN, ACT, KV, OUT = BufferKind.INPUT, BufferKind.ACTIVATION, BufferKind.KV, BufferKind.OUTPUT


def prog(tasks: list[Task], kinds: tuple[BufferKind, ...] = (IN, ACT, OUT), counters: int = 2,
         size: int = 4) -> Program:
    bufs = [Buffer(i, f"b{i}", k, DType.FP32, (size,)) for i, k in enumerate(kinds)]
    for i, t in enumerate(tasks):
        t.id = i
    sms = 1 + max(t.sm for t in tasks)
    return Program(bufs, [Counter(i, f"c{i}") for i in range(counters)], tasks,
                   {"target": "h100", "num_sms": sms, "threads_per_block": 256})


def add(sm: int, src: int, dst: int, lo: int, hi: int, waits: list[Wait] | None = None,
        signal: int | None = None, mode: str = "write") -> Task:
    return Task(0, "ADD", sm, [Region(src, lo, hi), Region(0, lo, hi)], [Region(dst, lo, hi, mode)],
                waits or [], signal, {"a": src, "b": 0, "out": dst, "lo": lo, "hi": hi})


def nop(sm: int, reads: list[Region] | None = None, waits: list[Wait] | None = None,
        signal: int | None = None) -> Task:
    return Task(0, "NOP", sm, reads or [], [], waits or [], signal, {})


# -- simulator -------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_unordered_writers_race(method: str) -> None:
    p = prog([add(0, 0, 1, 0, 2, signal=0), add(1, 0, 1, 1, 4, signal=0), add(0, 1, 2, 0, 4, [Wait(0, 2)])],
             counters=1)
    r = simulate(p, method=method, runs=50)
    assert not r.safe and not r.deadlock and not r.uninit
    assert [(x.kind, x.first, x.second, x.buffer, x.lo, x.hi) for x in r.races] == [("WAW", 0, 1, 1, 1, 2)]


@pytest.mark.parametrize("method", METHODS)
def test_wait_cycle_deadlocks(method: str) -> None:
    p = prog([add(0, 0, 2, 0, 2, [Wait(1, 1)], signal=0), add(1, 0, 2, 2, 4, [Wait(0, 1)], signal=1)],
             kinds=(IN, KV, OUT))
    r = simulate(p, method=method, runs=20)
    assert r.deadlock and not r.safe and r.stuck == [0, 1]


def test_queue_order_deadlock() -> None:
    """A consumer queued before its only producer on the same SM never starts."""
    p = prog([nop(0, waits=[Wait(0, 1)]), add(0, 0, 2, 0, 4, signal=0)], counters=1)
    for method in METHODS:
        assert simulate(p, method=method, runs=5).deadlock


@pytest.mark.parametrize("method", METHODS)
def test_producer_consumer_is_safe(method: str) -> None:
    p = prog([add(0, 0, 1, 0, 2, signal=0), add(1, 0, 1, 2, 4, signal=0),
              add(0, 1, 2, 0, 4, [Wait(0, 2)])], counters=1)
    r = simulate(p, method=method, runs=100)
    assert r.safe, r.summary()
    assert r.complete == (method != "random") and r.exhaustive == (method == "exhaustive")


@pytest.mark.parametrize("method", METHODS)
def test_threshold_below_count_does_not_order_a_specific_writer(method: str) -> None:
    """Two producers on different SMs signal one counter; waiting for 1 of 2 orders neither."""
    producers = [add(0, 0, 1, 0, 2, signal=0), add(1, 0, 1, 2, 4, signal=0)]
    p = prog([*producers, add(2, 1, 2, 0, 4, [Wait(0, 1)])], counters=1)
    r = simulate(p, method=method, runs=100)
    assert {(x.first, x.second, x.kind) for x in r.races} == {(0, 2, "RAW"), (1, 2, "RAW")}
    assert {(u.task, u.buffer) for u in r.uninit} == {(2, 1)}
    full = prog([*producers, add(2, 1, 2, 0, 4, [Wait(0, 2)])], counters=1)
    assert simulate(full, method=method, runs=100).safe


def test_threshold_below_count_orders_queue_ordered_signallers() -> None:
    """Signallers on one queue finish in order: waiting for 1 orders the first."""
    first, second = add(0, 0, 1, 0, 2, signal=0), add(0, 0, 1, 2, 4, signal=0)
    reads_first = prog([first, second, nop(1, [Region(1, 0, 2)], [Wait(0, 1)]), add(1, 0, 2, 0, 4)], counters=1)
    for method in METHODS:
        assert simulate(reads_first, method=method, runs=50).safe
    reads_second = prog([first, second, nop(1, [Region(1, 2, 4)], [Wait(0, 1)]), add(1, 0, 2, 0, 4)], counters=1)
    r = simulate(reads_second, method="exhaustive")
    assert [(x.first, x.second) for x in r.races] == [(1, 2)] and r.uninit


def test_random_runs_track_the_releasing_signals_only() -> None:
    """A consumer that usually starts after both producers finished is still caught: in
    every run only the first signal released it, so the other producer is unordered."""
    p = prog([add(0, 0, 1, 0, 2, signal=0), add(1, 0, 1, 2, 4, signal=0),
              add(2, 1, 2, 0, 4, [Wait(0, 1)])], kinds=(IN, KV, OUT), counters=1)
    seen = set()
    for seed in range(20):
        r = simulate(p, method="random", runs=1, seed=seed)
        assert len(r.races) == 1  # every run: the producer that signalled second is unordered
        seen |= {(x.first, x.second) for x in r.races}
    assert seen == {(0, 2), (1, 2)}


def test_accumulates_commute_but_race_with_reads() -> None:
    acc = [add(0, 0, 1, 0, 4, signal=0, mode="accumulate"), add(1, 0, 1, 0, 4, signal=0, mode="accumulate")]
    ok = prog([*acc, add(2, 1, 2, 0, 4, [Wait(0, 2)])], counters=1)
    assert simulate(ok, method="exhaustive").safe
    bad = prog([*acc, add(2, 1, 2, 0, 4, [Wait(0, 1)])], counters=1)
    r = simulate(bad, method="exhaustive")
    assert {(x.first, x.second) for x in r.races} == {(0, 2), (1, 2)}
    mixed = prog([acc[0], add(1, 0, 1, 0, 4, signal=0), add(2, 1, 2, 0, 4, [Wait(0, 2)])], counters=1)
    assert [(x.kind, x.first, x.second) for x in simulate(mixed, method="exhaustive").races] == [("WAW", 0, 1)]


def test_uninitialised_reads_and_unwritten_outputs() -> None:
    p = prog([add(0, 1, 2, 0, 3)])  # reads activation b1 nobody writes; output [3:4) never written
    r = simulate(p, method="exhaustive")
    assert [(u.task, u.buffer, u.lo, u.hi) for u in r.uninit] == [(0, 1, 0, 3)]
    assert [(u.buffer, u.lo, u.hi) for u in r.unwritten] == [(2, 3, 4)]
    kv = prog([add(0, 1, 2, 0, 4)], kinds=(IN, KV, OUT))  # KV data persists across steps: exempt
    assert simulate(kv, method="exhaustive").safe


def test_lowered_programs_are_safe() -> None:
    for name in BASE_NAMES[:4]:
        r = simulate(base_program(name), runs=10)
        assert r.safe and r.complete and not r.exhaustive, (name, r.summary())


def test_methods_agree_on_random_programs() -> None:
    """The delay analysis is exact: it matches exhaustive exploration; random runs never
    report more than either."""
    for i in range(300):
        rng = random.Random(i)
        p = random_program(rng) if i % 2 else random_sync_program(rng)
        ex = simulate(p, method="exhaustive")
        de = simulate(p, method="delay")
        ra = simulate(p, method="random", runs=20, seed=i)
        key = lambda r: (r.deadlock, {(x.first, x.second) for x in r.races}, set(r.uninit))  # noqa: E731
        assert key(ex) == key(de), (i, ex.summary(), de.summary())
        kr = key(ra)
        assert kr[0] <= ex.deadlock and kr[1] <= key(ex)[1] and kr[2] <= key(ex)[2], i


# -- mutation corpus -------------------------------------------------------------------------

WELLFORMED = {"malformed", "bad-region", "resource"}


@pytest.mark.parametrize("cls", sorted(CLASSES))
def test_every_class_produces_well_formed_programs(cls: str) -> None:
    from pytest_amk.validate import validate

    digests, changed = set(), 0
    for i in range(6):
        case = make_case(i, seed=1, cls=cls)
        assert case.cls == cls and case.program.tasks
        assert [t.id for t in case.program.tasks] == list(range(len(case.program.tasks)))
        changed += case.base not in BASE_NAMES or case.program.digest() != base_program(case.base).digest()
        digests.add(case.program.digest())
        codes = validate(case.program).codes()
        assert not codes & WELLFORMED, (cls, i, validate(case.program).summary())
    assert len(digests) > 1 and changed >= 4


@pytest.mark.parametrize("cls", sorted(SAFE))
def test_safe_classes_stay_safe(cls: str) -> None:
    for i in range(4):
        case = make_case(i, seed=2, cls=cls)
        r = simulate(case.program, runs=8)
        assert r.safe, (cls, i, r.summary())


def test_corpus_is_deterministic() -> None:
    assert make_case(17, seed=3).program.digest() == make_case(17, seed=3).program.digest()


# -- the audit --------------------------------------------------------------------------------

def test_small_audit_has_no_false_accepts() -> None:
    t0 = time.perf_counter()
    report = audit(200, seed=0, time_1b=False)
    assert time.perf_counter() - t0 < 30
    assert report.total("n") == 200
    assert report.false_accepts == 0, format_report(report)
    assert report.false_reject_rate < 0.05, format_report(report)
    assert report.total("sim_safe") >= 50 and report.total("sim_unsafe") >= 50
    text = format_report(report)
    assert "false accepts: 0" in text and "TOTAL" in text


def test_main_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--programs", "24", "--no-1b"]) == 0
    assert "false accepts: 0" in capsys.readouterr().out


def test_amk_validator_audit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`amk validator-audit`: the table, the validator's time on the 1B program, the JSON report."""
    out = tmp_path / "audit.json"
    assert cli.main(["validator-audit", "--programs", "40", "--seed", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "false accepts: 0" in text and "FR rate" in text and "TOTAL" in text
    assert "validator on llama-3.2-1b-shape" in text
    report = json.loads(out.read_text())
    assert report["n_programs"] == 40 and report["false_accepts"] == 0 and report["seed"] == 1
    assert report["validator_1b"]["ok"] and report["validator_1b"]["tasks"] > 5000


def test_amk_validator_audit_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "missing-dir" / "audit.json"
    assert cli.main(["validator-audit", "--programs", "2", "--no-1b", "--json", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        cli.main(["validator-audit", "--programs", "0"])
    assert e.value.code == 2


def test_exit_code_targets() -> None:
    """1 on any false accept, or on a false-reject rate of 5% or more."""
    def report(fa: int, fr: int, safe: int) -> AuditReport:
        s = ClassStats("x", "unsafe", n=100, sim_safe=safe, false_accept=fa, false_reject=fr)
        return AuditReport(100, 0, 0.0, 1, {"x": s})

    assert exit_code(report(0, 0, 50)) == 0
    assert exit_code(report(0, 2, 50)) == 0  # 4%
    assert exit_code(report(0, 5, 100)) == 1  # 5%
    assert exit_code(report(1, 0, 50)) == 1
