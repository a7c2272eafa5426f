"""The search as pytest runs it (``--amk-search``) and as ``amk loop`` runs it, on CPU
with the cost model: the search item, the log, progress, summary, chart, JUnit suite,
write-back, one driver per loop under xdist, and the CLI's JSON.

Inner runs use the 2-layer ``toy`` model with ``max_seq = 16`` and one decode step. The
search file targets an L4 (58 SMs), so that random points with ``sm_count = 64`` are
REJECTED: the loop meets invalid candidates and must never keep one.
"""

from __future__ import annotations

import json
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

# Imported before any in-process inner run (see test_plugin.py): C extensions cannot be
# imported twice in one process.
import torch  # noqa: F401

from pytest_amk import cli, pipeline, refvm  # noqa: F401
from pytest_amk.models import llama  # noqa: F401
from pytest_amk.schedule import parse_file
from pytest_amk.search import Search, SearchLog, exclusive, experiment_for, read_rows, run_loop, slug

try:
    import matplotlib.figure  # noqa: F401

    HAVE_MPL = True
except ImportError:
    HAVE_MPL = False

try:
    pipeline.gpu_status("auto")
except Exception:
    pass

SEARCHED = """\
# a user's comment that must survive write-back
[model]
id = "toy"
dtype = "fp32"
max_seq = 16

[target]
gpu = "l4"

[[schedule]]
name = "start"   # a trailing comment
fusion = []
tiling.gemv.n_tile = 8
"""

H100 = SEARCHED.replace('"l4"', '"h100"')

ALL_REJECTED = SEARCHED.replace("fusion = []", 'threads_per_block = 2048\nexpect.outcome = "rejected"')

INNER = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest", "--amk-steps=1", "--amk-device=cpu")



def write(pytester: pytest.Pytester, relpath: str, text: str) -> Path:
    path = pytester.path / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    result = pytester.runpytest(*INNER, *args)
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    return result


def rows_by_experiment(results: Path) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {}
    for row in read_rows(results):
        out.setdefault(row["experiment"], []).append(row)
    return out


# -- the search item ------------------------------------------------------------------------

def test_search_keeps_only_valid_improvements_and_reports(amk: pytest.Pytester) -> None:
    write(amk, "schedules/toy.toml", SEARCHED)
    xml = amk.path / "junit.xml"
    result = run(amk, "--amk-search=8", "-v", f"--junitxml={xml}")
    assert result.ret == 0
    assert result.parseoutcomes() == {"passed": 2}
    result.stdout.fnmatch_lines([
        "amk search toy.toml::start: 8 trials; fitness: cost model: default constants *",
        "amk search toy.toml::start: trial 1/8 start: passed * us (kept) | incumbent * us predicted",
        "amk search toy.toml::start: trial 8/8 *",
        "schedules/toy.toml::search PASSED (start * us -> best * us predicted (-*%) in 8 trials, * kept*",
        "*= amk search (8 trials per file) =*",
        "file * trials * kept * start * best * kind * gain",
        "schedules/toy.toml::start * 8 * predicted *%",
        "trials as JUnit XML: *search-junit.xml; log: *results.tsv",
    ])
    log = amk.path / ".amk" / "search"
    rows = read_rows(log / "results.tsv")
    assert [int(r["trial"]) for r in rows] == list(range(8))
    kept = [r for r in rows if r["kept"] == "1"]
    assert kept[0]["trial"] == "0" and len(kept) >= 2  # the start, and at least one improvement
    assert all(r["outcome"] == "passed" and r["latency_kind"] == "predicted" for r in kept)
    latencies = [float(r["latency_us"]) for r in kept]
    assert all(b <= a * 0.99 for a, b in zip(latencies, latencies[1:], strict=False))
    invalid = [r for r in rows if r["outcome"] != "passed"]
    assert any(r["outcome"] == "rejected" for r in invalid) and not any(r["kept"] == "1" for r in invalid)
    corpus = [json.loads(line) for line in (log / "corpus.jsonl").read_text().splitlines()]
    assert [c["trial"] for c in corpus] == [int(r["trial"]) for r in kept]

    # The trials as a JUnit suite: one testcase per trial, REJECTED ones skipped.
    suite = ET.parse(log / "search-junit.xml").getroot().find("testsuite")
    assert suite is not None and suite.get("name") == rows[0]["experiment"]
    cases = suite.findall("testcase")
    assert len(cases) == 8
    assert sum(c.find("skipped") is not None for c in cases) == sum(r["outcome"] == "rejected" for r in rows)

    # The chart, next to the logs.
    png = log / f"{slug(rows[0]['experiment'])}.png"
    if HAVE_MPL:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        result.stdout.fnmatch_lines(["chart toy.toml::start: *.png"])
    else:
        result.stdout.fnmatch_lines(["chart toy.toml::start: matplotlib is not installed*"])

    # The search item's JUnit properties (pytest's own --junitxml).
    case = next(c for c in ET.parse(xml).getroot().iter("testcase") if c.get("name") == "search")
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert props["amk_search_trials"] == "8" and props["amk_search_best_kind"] == "predicted"
    assert float(props["amk_search_best_us"]) == pytest.approx(latencies[-1], abs=1e-3)

    # Run again: the loop is in the log, so nothing is run twice.
    again = run(amk, "--amk-search=8", "-v")
    again.stdout.fnmatch_lines(["amk search toy.toml::start: 8 trials already in *results.tsv (budget 8): nothing "
                                "to run", "*toy.toml::search PASSED (*; all from the log)*"])
    assert len(read_rows(log / "results.tsv")) == 8


def test_quiet_run_shows_no_progress_but_the_summary(amk: pytest.Pytester) -> None:
    write(amk, "schedules/toy.toml", H100)
    result = run(amk, "--amk-search=2", "-q")
    assert result.ret == 0
    out = result.stdout.str()
    assert "trial 1/2" not in out
    result.stdout.fnmatch_lines(["*amk search (2 trials per file)*", "schedules/toy.toml::start * 2 *predicted*",
                                 "2 passed*"])


def test_write_back_collects_and_passes(amk: pytest.Pytester) -> None:
    path = write(amk, "schedules/toy.toml", SEARCHED)
    result = run(amk, "--amk-search=8", "--amk-search-write")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["wrote toy.toml::start's best schedule to *toy.toml as 'start-searched'"])
    text = path.read_text()
    assert text.startswith(SEARCHED.rstrip("\n"))  # the user's text and comments, byte for byte
    assert "# found by amk search (trial " in text and " us predicted" in text
    names = [s.name for s in parse_file(path).schedules]
    assert names == ["start", "start-searched"]
    plain = run(amk, "-v")
    assert plain.ret == 0 and plain.parseoutcomes() == {"passed": 2}
    plain.stdout.fnmatch_lines(["schedules/toy.toml::start-searched PASSED*"])
    assert "::search" not in plain.stdout.str()  # no search item without a budget
    again = run(amk, "--amk-search=8", "--amk-search-write")  # the best is in the file already
    assert again.ret == 0 and path.read_text() == text


def test_a_file_without_a_valid_schedule(amk: pytest.Pytester) -> None:
    write(amk, "schedules/limits.toml", ALL_REJECTED)
    write(amk, "schedules/broken.toml", SEARCHED.replace("fusion = []", "threads_per_block = 2048"))
    result = run(amk, "--amk-search=1", "-rfs")
    assert result.ret == 1
    assert result.parseoutcomes() == {"passed": 1, "failed": 1, "rejected": 1, "skipped": 1}
    result.stdout.fnmatch_lines_random([
        "search broken.toml::start: no valid schedule in 1 trials (1 rejected)",
        "FAILED schedules/broken.toml::search - *",
        "SKIPPED [1] schedules/limits.toml: no schedule to start a search from: every [[schedule]] expects REJECTED",
    ])


def test_collection_and_selection(amk: pytest.Pytester) -> None:
    write(amk, "schedules/toy.toml", H100)
    assert "::search" not in run(amk, "--collect-only", "-q").stdout.str()
    listed = run(amk, "--collect-only", "-q", "--amk-search=3")
    listed.stdout.fnmatch_lines(["schedules/toy.toml::start", "schedules/toy.toml::search"])
    one = run(amk, "--collect-only", "-q", "--amk-search=3", "schedules/toy.toml::start")
    assert "::search" not in one.stdout.str()
    only = run(amk, "--collect-only", "-q", "--amk-search=3", "schedules/toy.toml::search")
    only.stdout.fnmatch_lines(["schedules/toy.toml::search", "1 test collected*"])


def test_ini_keys(amk: pytest.Pytester) -> None:
    amk.makeini("[pytest]\namk_search = 2\namk_search_dir = logs/search\n")
    write(amk, "schedules/toy.toml", H100)
    result = run(amk, "schedules/toy.toml::search")
    assert result.ret == 0
    assert len(read_rows(amk.path / "logs" / "search" / "results.tsv")) == 2
    assert run(amk, "--amk-search=-1").ret == pytest.ExitCode.USAGE_ERROR


# -- one driver per loop -------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Benchmarks are automatically disabled")
def test_xdist_runs_each_loop_once(amk: pytest.Pytester) -> None:
    # -n 2 --dist each: both workers run every item, each search item included; the
    # loop's lock leaves exactly one driver per file, so each loop has its budget of rows.
    write(amk, "schedules/toy.toml", H100)
    write(amk, "schedules/other.toml", SEARCHED)
    result = run(amk, "--amk-search=4", "-n", "2", "--dist", "each")
    assert result.ret == 0
    assert result.parseoutcomes()["passed"] == 8  # 2 workers x 2 files x (schedule + search)
    result.stdout.fnmatch_lines_random(["schedules/toy.toml::start * 4 *", "schedules/other.toml::start * 4 *"])
    by_exp = rows_by_experiment(amk.path / ".amk" / "search" / "results.tsv")
    assert len(by_exp) == 2
    for rows in by_exp.values():
        assert [int(r["trial"]) for r in rows] == list(range(4))  # exactly the budget, not 2x


def test_a_second_process_waits_and_reads_the_log(tmp_path: Path) -> None:
    f = tmp_path / "toy.toml"
    f.write_text(H100)
    sf = parse_file(f)
    start = sf.schedules[0]
    log = tmp_path / "log"
    experiment = experiment_for(sf, start, "predicted")
    results: list = []
    with exclusive(log / "locks" / f"{slug(experiment)}.lock"):  # "another process" drives the loop
        waiter = threading.Thread(target=lambda: results.append(run_loop(sf, start, 3, log, device="cpu", steps=1)))
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive()  # waiting for the lock

        def evaluate(s):  # type: ignore[no-untyped-def]
            return pipeline.run_schedule(sf, s, device="cpu", steps=1)

        Search(sf, start, evaluate, SearchLog(log), experiment=experiment).run(3)
    waiter.join(60)
    (res,) = results
    assert res.driven_elsewhere and res.new_trials == 0 and len(res.trials) == 3 and res.ok
    assert "run by another process" in res.headline()
    assert len(read_rows(log / "results.tsv")) == 3


# -- amk loop ----------------------------------------------------------------------------------

def test_amk_loop_json_and_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "toy.toml"
    f.write_text(SEARCHED)
    args = ["loop", str(f), "--budget", "8", "--device", "cpu", "--steps", "1", "--dir", str(tmp_path / "log")]
    assert cli.main([*args, "--json"]) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert {"trials", "kept", "best_knobs", "best_us", "best_kind", "start_us", "gain_pct", "experiment",
            "artifacts"} <= set(data)
    assert data["trials"] == 8 and data["kept"] >= 2 and data["best_kind"] == "predicted"
    assert data["best_us"] < data["start_us"] and data["written"] is None
    assert set(data["best_knobs"]) == set(parse_file(f).schedules[0].knobs)
    assert "amk loop toy.toml::start: trial 8/8" in err
    assert cli.main([*args, "--write"]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith("PASS toy.toml::start: start ") and "as 'start-searched'" in out
    assert [s.name for s in parse_file(f).schedules] == ["start", "start-searched"]
    f.write_text(ALL_REJECTED)
    assert cli.main(args) == 2
    assert "every schedule expects REJECTED" in capsys.readouterr().err
