"""One keep/revert loop with its trials spread over several evaluator processes (CPU)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

# In-process pytester runs drop the modules a run imported; torch cannot be imported twice.
import torch  # noqa: F401
from helpers import toy_search, toy_toml

from pytest_amk import devices
from pytest_amk.schedule import Schedule
from pytest_amk.search import Search, better, read_jsonl, read_rows
from pytest_amk.search_parallel import EvaluatorPool, LoopEvaluatorFactory, pin, plan_workers

TOY = toy_toml('name = "default"', dtype="fp32", max_seq=16)


def make(tmp_path: Path) -> tuple[Search, LoopEvaluatorFactory]:
    search = toy_search(tmp_path, TOY)
    return search, LoopEvaluatorFactory(search.sf, "cpu", 1)


def check_log(search: Search, budget: int) -> None:
    rows = read_rows(search.log.results)
    assert [int(r["trial"]) for r in rows] == list(range(budget))
    inc = None
    for t in search.trials:
        assert t.kept == better(t, inc)  # the keep rule, applied in index order
        if t.kept:
            assert t.outcome == "passed"
            inc = t
    kept = [int(r["trial"]) for r in rows if r["kept"] == "1"]
    assert kept and kept[0] == 0
    assert [c["trial"] for c in read_jsonl(search.log.corpus)] == kept


def test_two_workers_write_the_budget_in_order_and_resume(tmp_path: Path) -> None:
    search, factory = make(tmp_path)
    search.run_parallel(4, [None, None], factory)
    check_log(search, 4)
    # resume: a fresh Search reads the 4 trials and runs only the rest
    again, factory = make(tmp_path)
    assert len(again.trials) == 4
    best = again.run_parallel(8, [None, None], factory)
    check_log(again, 8)
    assert best is not None and best.outcome == "passed"
    assert [(t.index, t.knobs, t.kept) for t in again.trials[:4]] == [(t.index, t.knobs, t.kept) for t in search.trials]


def test_one_worker_equals_the_serial_loop(tmp_path: Path) -> None:
    serial, _ = make(tmp_path / "a")
    serial.run(5)
    par, factory = make(tmp_path / "b")
    par.run_parallel(5, [None], factory)
    strip = [(t.index, t.tag, t.knobs, t.outcome, t.latency_us, t.kept) for t in serial.trials]
    assert strip == [(t.index, t.tag, t.knobs, t.outcome, t.latency_us, t.kept) for t in par.trials]


def test_amk_loop_workers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pytest_amk import cli

    f = tmp_path / "toy.toml"
    f.write_text(TOY)
    args = ["loop", str(f), "--budget", "3", "--device", "cpu", "--steps", "1", "--dir", str(tmp_path / "log"),
            "--workers", "2", "--json"]
    assert cli.main(args) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert data["trials"] == 3 and data["new_trials"] == 3 and data["ok"]
    assert "2 evaluator processes (CPU)" in err
    assert [int(r["trial"]) for r in read_rows(tmp_path / "log" / "results.tsv")] == [0, 1, 2]


@pytest.mark.usefixtures("amk")  # tests/conftest.py: an ini file, schedules/, top-level inner runs
def test_pytest_option(pytester: pytest.Pytester) -> None:
    (pytester.path / "schedules" / "toy.toml").write_text(TOY)
    result = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:hypothesispytest", "--amk-steps=1",
                                "--amk-device=cpu", "--amk-search=3", "--amk-search-workers=2")
    assert result.ret == 0, result.stdout.str()
    rows = read_rows(pytester.path / ".amk" / "search" / "results.tsv")
    assert [int(r["trial"]) for r in rows] == [0, 1, 2]
    assert pytester.runpytest("--amk-search=3", "--amk-search-workers=0").ret == pytest.ExitCode.USAGE_ERROR


def test_plan_workers_with_fake_device_lists() -> None:
    assert plan_workers(2, []) == [None, None]  # CPU: N processes, no pinning
    assert plan_workers(0, []) == [None]
    assert plan_workers(4, ["0", "1"]) == ["0", "1"]  # capped at the GPU count
    assert plan_workers(2, ["3", "5", "7"]) == ["3", "5"]
    env = {devices.ENV: "GPU-aaa,GPU-bbb"}
    assert plan_workers(8, devices.visible_devices(env, lambda: 0)) == ["GPU-aaa", "GPU-bbb"]
    assert plan_workers(8, devices.visible_devices({}, lambda: 3)) == ["0", "1", "2"]
    pinned: dict[str, str] = {}
    pin("1", pinned)
    assert pinned == {devices.ENV: "1", devices.PINNED_ENV: "1"}
    untouched = {devices.ENV: "0,1"}
    pin(None, untouched)
    assert untouched == {devices.ENV: "0,1"}


class EnvEvaluatorFactory:
    """An evaluator that reports the CUDA_VISIBLE_DEVICES its worker process sees."""

    def __call__(self) -> Any:
        seen = os.environ.get(devices.ENV, "")

        def evaluate(sched: Schedule) -> Any:
            verdict = SimpleNamespace(latency_us=1.0, latency_kind="predicted", pct_of_roofline=None)
            return SimpleNamespace(outcome="failed", message=json.dumps([seen, os.getpid()]), verdict=verdict)

        return evaluate


@pytest.mark.parametrize("fake", [["7", "9"]])
def test_each_worker_is_pinned_to_its_own_device(fake: list[str]) -> None:
    # Fake device names on CPU: the workers only set the variable, nothing touches CUDA.
    with EvaluatorPool(list(fake), EnvEvaluatorFactory()) as pool:
        found: dict[int, str] = {}
        for _ in range(20):
            futures = [pool.submit(Schedule("s", {})) for _ in range(4)]
            for fut in futures:
                seen, pid = json.loads(fut.result()["message"])
                assert found.setdefault(pid, seen) == seen
            if len(found) == len(fake):
                break
    assert sorted(found.values()) == fake or set(found.values()) <= set(fake)
    assert len(set(found.values())) == len(found)  # never two workers on one device
