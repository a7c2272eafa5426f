"""The keep/revert search on CPU with the cost model: keep rule, logs, resume, write-back."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import toy_search, toy_toml

from pytest_amk import pipeline
from pytest_amk.schedule import parse_file
from pytest_amk.search import Trial, append_line, better, read_rows, write_back

TOY = "# my comment stays\n" + toy_toml('name = "default"   # trailing comment stays too', dtype="fp32", max_seq=16)


def test_keeps_only_valid_correct_improvements(tmp_path: Path) -> None:
    search = toy_search(tmp_path, TOY)
    best = search.run(10)
    assert best is not None and best.outcome == "passed"
    kept = [t for t in search.trials if t.kept]
    assert kept[0].index == 0
    for prev, cur in zip(kept, kept[1:], strict=False):
        assert cur.outcome == "passed" and cur.latency_kind == "predicted"
        assert cur.latency_us <= prev.latency_us * 1.01
    for t in search.trials:
        if t.outcome != "passed":
            assert not t.kept
    rows = read_rows(search.log.results)
    assert [int(r["trial"]) for r in rows] == list(range(10))
    corpus = [json.loads(line) for line in search.log.corpus.read_text().splitlines()]
    assert [c["trial"] for c in corpus] == [t.index for t in kept]


def test_rejected_candidate_is_logged_never_kept(tmp_path: Path) -> None:
    search = toy_search(tmp_path, TOY)
    search.run(1)
    bad = Trial(1, "explore", dict(search.start.knobs, threads_per_block=2048))
    search._evaluate(bad)
    assert bad.outcome == "rejected" and not better(bad, search.incumbent)


def test_launch_knobs_move_only_under_measured_fitness(tmp_path: Path) -> None:
    """The cost model cannot see launch knobs (prefetch sizes): a search on predicted fitness
    keeps the start's values in every proposal; one on measured latency varies them."""
    from pytest_amk.schedule import KNOBS

    launch = [n for n, k in KNOBS.items() if k.launch]
    assert launch
    search = toy_search(tmp_path, TOY)
    search.incumbent = Trial(0, "start", dict(search.start.knobs))
    start = {n: search.start.knobs[n] for n in launch}
    for measured, want_change in ((False, False), (True, True)):
        search.measured = measured
        changed = [any(search.propose(i).knobs[n] != start[n] for n in launch) for i in range(1, 60)]
        assert any(changed) == want_change, measured


def test_keep_rule() -> None:
    def t(lat: float | None, kind: str = "predicted", outcome: str = "passed", **knobs: object) -> Trial:
        from pytest_amk.schedule import default_knobs

        k = default_knobs()
        k.update(knobs)
        return Trial(0, "x", k, outcome, lat, kind)

    assert better(t(98.0), t(100.0))
    assert not better(t(99.5), t(100.0))  # under 1% is not an improvement
    assert better(t(100.5), t(100.0, threads_per_block=512))  # a tie goes to the simpler schedule
    assert better(t(200.0, "measured-gpu"), t(100.0))  # measured beats predicted
    assert not better(t(50.0), t(100.0, "measured-gpu"))
    assert not better(t(1.0, outcome="failed"), t(100.0))


def _append_many(path: str, who: int) -> None:
    for i in range(200):
        append_line(Path(path), "\t".join([f"exp{who}", str(i)] + ["x" * 50] * 11))


def test_concurrent_appenders_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "results.tsv"
    procs = [multiprocessing.Process(target=_append_many, args=(str(path), w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    rows = read_rows(path)
    assert len(rows) == 800
    for w in range(4):
        assert sorted(int(r["trial"]) for r in rows if r["experiment"] == f"exp{w}") == list(range(200))


def test_torn_line_is_skipped_and_next_row_stays_whole(tmp_path: Path) -> None:
    path = tmp_path / "results.tsv"
    append_line(path, "\t".join(["e", "0"] + ["a"] * 11))
    with open(path, "a") as f:
        f.write("e\t1\tpartial row cut by a ki")
    append_line(path, "\t".join(["e", "2"] + ["b"] * 11))
    assert [r["trial"] for r in read_rows(path)] == ["0", "2"]


def test_kill_mid_run_then_resume(tmp_path: Path) -> None:
    (tmp_path / "toy.toml").write_text(TOY)
    script = f"""
import time
from pathlib import Path
from pytest_amk import pipeline
from pytest_amk.schedule import parse_file
from pytest_amk.search import Search, SearchLog
sf = parse_file({str(tmp_path / "toy.toml")!r})
def ev(s):
    r = pipeline.run_schedule(sf, s, device="cpu", steps=1)
    time.sleep(0.3)
    return r
Search(sf, sf.schedules[0], ev, SearchLog(Path({str(tmp_path / "log")!r})), seed=1).run(1000)
"""
    proc = subprocess.Popen([sys.executable, "-c", script])
    results = tmp_path / "log" / "results.tsv"
    deadline = time.time() + 120
    while time.time() < deadline and len(read_rows(results)) < 3:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(read_rows(results))
    assert done >= 3
    search = toy_search(tmp_path, TOY)
    assert len(search.trials) == done
    search.run(done + 3)
    assert [int(r["trial"]) for r in read_rows(results)] == list(range(done + 3))


def test_write_back_collects_and_passes(tmp_path: Path) -> None:
    search = toy_search(tmp_path, TOY)
    best = search.run(6)
    assert best is not None
    best.knobs["tiling.gemv.n_tile"] = 8  # make sure a dotted knob is written
    path = tmp_path / "toy.toml"
    name = write_back(path, best, "default")
    text = path.read_text()
    assert text.startswith(TOY.rstrip("\n"))  # the user's text, comments included, is untouched
    sf = parse_file(path)
    new = [s for s in sf.schedules if s.name == name][0]
    assert new.knobs["tiling.gemv.n_tile"] == 8
    assert pipeline.run_schedule(sf, new, device="cpu", steps=1).outcome == "passed"
    assert write_back(path, best, "default") == "default-searched-2"
