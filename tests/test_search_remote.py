"""Search logs gathered by the controller: xdist workers that do not share its search
directory (``AMK_SEARCH_REMOTE=1`` makes local workers behave as remote ones) and the
merge of CI shards' directories (``amk search-merge``).

Inner runs use the 2-layer ``toy`` model on CPU with the cost model (as in
test_search_session.py). Their conftest makes a worker fail its search item if it
appends to any log under the rootdir, where the controller's search directory is.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

# Imported before any in-process inner run (see test_plugin.py): C extensions cannot be
# imported twice in one process.
import torch  # noqa: F401

from pytest_amk import cli, cost, pipeline, refvm  # noqa: F401
from pytest_amk.models import llama  # noqa: F401
from pytest_amk.search import TSV_COLUMNS, read_jsonl, read_rows
from pytest_amk.search_merge import append_new, merge

try:
    pipeline.gpu_status("auto")
except Exception:
    pass

TOY = """\
[model]
id = "toy"
dtype = "fp32"
max_seq = 16

[target]
gpu = "{gpu}"

[[schedule]]
name = "start"
fusion = []
tiling.gemv.n_tile = 8
"""

INNER = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest", "--amk-steps=1", "--amk-device=cpu")

# Workers must not write the controller's directory (anything under the rootdir) themselves.
GUARD = """\
from pathlib import Path


def pytest_configure(config):
    if not hasattr(config, "workerinput"):
        return
    import pytest_amk.search as search

    append_line, root = search.append_line, config.rootpath.resolve()

    def guarded(path, line):
        if Path(path).resolve().is_relative_to(root):
            raise AssertionError(f"worker appended to {path}")
        append_line(path, line)

    search.append_line = guarded
"""


@pytest.fixture
def remote(amk: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    amk.makeconftest(GUARD)
    (amk.path / "schedules" / "toy.toml").write_text(TOY.format(gpu="h100"))
    (amk.path / "schedules" / "other.toml").write_text(TOY.format(gpu="l4"))
    monkeypatch.setenv("AMK_SEARCH_REMOTE", "1")
    return amk


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    result = pytester.runpytest(*INNER, *args)
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    return result


def by_experiment(directory: Path, name: str = "results.tsv") -> dict[str, list[dict]]:
    path = directory / name
    out: dict[str, list[dict]] = {}
    for row in read_rows(path) if name.endswith(".tsv") else read_jsonl(path):
        out.setdefault(row["experiment"], []).append(row)
    return out


def search_props(xml: Path) -> dict[str, dict[str, str]]:
    """nodeid-ish name -> the search item's amk_search_* JUnit properties."""
    out = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        if case.get("name") == "search":
            out[case.get("classname", "")] = {p.get("name", ""): p.get("value", "") for p in case.iter("property")}
    return out


# -- remote workers --------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Benchmarks are automatically disabled")
def test_remote_workers_rows_land_once_as_in_a_serial_run(remote: pytest.Pytester) -> None:
    serial = run(remote, "--amk-search=6", "--amk-search-dir=serial")
    assert serial.ret == 0
    # --dist each: both workers run both loops and send their rows; the controller keeps each once.
    result = run(remote, "--amk-search=6", "-n", "2", "--dist", "each")
    assert result.ret == 0, result.stdout.str()
    assert result.parseoutcomes()["passed"] == 8
    log = remote.path / ".amk" / "search"
    assert not (log / "locks").exists()  # no loop ran against this directory
    got, want = by_experiment(log), by_experiment(remote.path / "serial")
    assert len(got) == 2 and got == want  # same rows, in trial order, each once
    for rows in got.values():
        assert [int(r["trial"]) for r in rows] == list(range(6))
    assert by_experiment(log, "corpus.jsonl") == by_experiment(remote.path / "serial", "corpus.jsonl")
    # Charts and the JUnit suite come from the controller's log.
    suites = ET.parse(log / "search-junit.xml").getroot().findall("testsuite")
    assert sorted(len(s.findall("testcase")) for s in suites) == [6, 6]
    result.stdout.fnmatch_lines_random(["schedules/toy.toml::start * 6 *", "schedules/other.toml::start * 6 *"])


@pytest.mark.filterwarnings("ignore:Benchmarks are automatically disabled")
def test_remote_workers_resume_from_the_controllers_rows(remote: pytest.Pytester) -> None:
    # A calibration in the controller's directory names the experiments (model-cal): the
    # workers must get it too, or they would start other experiments from trial 0.
    cal = cost.Calibration(task_overhead_us=0.7, stage_sync_us=1.3, gpu="h100")
    for d in ("serial", ".amk/search"):
        cost.save_calibration(remote.path / d, cal)
    assert run(remote, "--amk-search=6", "--amk-search-dir=serial").ret == 0
    log, xml = remote.path / ".amk" / "search", remote.path / "junit.xml"
    for budget, new in ((3, 3), (6, 3), (6, 0)):
        result = run(remote, f"--amk-search={budget}", "-n", "2", f"--junitxml={xml}")
        assert result.ret == 0, result.stdout.str()
        props = search_props(xml)
        assert sorted(p["amk_search_new_trials"] for p in props.values()) == [str(new)] * 2
        assert all(p["amk_search_trials"] == str(budget) for p in props.values())
    got = by_experiment(log)
    assert got == by_experiment(remote.path / "serial")
    assert sum(":model-cal:" in e for e in got) == 1  # the h100 file's loop is calibrated
    assert not (log / "locks").exists()


@pytest.mark.filterwarnings("ignore:Benchmarks are automatically disabled")
def test_the_guard_catches_a_worker_writing_the_controllers_directory(remote: pytest.Pytester,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # The control for the tests above: a worker on the controller's host and directory
    # appends itself (today's behaviour), which the inner conftest turns into a failure.
    monkeypatch.delenv("AMK_SEARCH_REMOTE")
    result = run(remote, "--amk-search=2", "-n", "2", "schedules/toy.toml")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*AssertionError: worker appended to *results.tsv*"])


# -- search-merge ------------------------------------------------------------------------------------

def row(experiment: str, trial: int, latency: str = "10.000") -> dict[str, str]:
    cells = dict.fromkeys(TSV_COLUMNS, "")
    cells.update(experiment=experiment, trial=str(trial), tag="explore", outcome="passed", latency_us=latency,
                 latency_kind="predicted", kept="0", knobs="{}", description="random point")
    return cells


def tsv(*rows: dict[str, str], torn: str = "") -> str:
    lines = ["\t".join(TSV_COLUMNS)] + ["\t".join(r[c] for c in TSV_COLUMNS) for r in rows]
    return "\n".join(lines) + "\n" + torn


def record(experiment: str, trial: int) -> str:
    return json.dumps({"experiment": experiment, "trial": trial, "latency_us": 1.0 + trial}, sort_keys=True)


def shard(path: Path, results: str, corpus: str = "") -> Path:
    path.mkdir(parents=True)
    (path / "results.tsv").write_text(results)
    if corpus:
        (path / "corpus.jsonl").write_text(corpus)
    return path


def keys(directory: Path, name: str = "results.tsv") -> list[tuple[str, int]]:
    path = directory / name
    recs = read_rows(path) if name.endswith(".tsv") else read_jsonl(path)
    return [(r["experiment"], int(r["trial"])) for r in recs]


def test_merge_dedups_keeps_order_and_skips_torn_lines(tmp_path: Path) -> None:
    torn_row = "\t".join(row("a", 9)[c] for c in TSV_COLUMNS[:5])  # a kill mid-write: no newline, few cells
    s1 = shard(tmp_path / "s1", tsv(row("a", 0), row("a", 1), row("b", 0), torn=torn_row),
               record("a", 0) + "\n" + record("b", 0) + "\n" + '{"experiment": "a", "tri')
    s2 = shard(tmp_path / "s2", tsv(row("b", 0), row("b", 1), row("a", 1), row("a", 2), row("c", 0)),
               record("b", 0) + "\n" + record("b", 1) + "\n")
    out = tmp_path / "out"
    report = merge(out, [s1, s2])
    assert keys(out) == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("a", 2), ("c", 0)]
    assert keys(out, "corpus.jsonl") == [("a", 0), ("b", 0), ("b", 1)]
    assert report["results.tsv"].added == 6 and report["results.tsv"].duplicates == 2
    assert report["corpus.jsonl"].added == 3 and report["corpus.jsonl"].duplicates == 1
    assert (out / "results.tsv").read_text().count("experiment\t") == 1  # one header
    assert read_rows(out / "results.tsv")[0] == row("a", 0)  # rows byte for byte
    before = (out / "results.tsv").read_text()
    again = merge(out, [s2, s1, out])  # idempotent; out among the inputs is harmless
    assert (out / "results.tsv").read_text() == before and again["results.tsv"].added == 0


def test_merge_into_an_existing_directory_keeps_its_rows_first(tmp_path: Path) -> None:
    out = shard(tmp_path / "out", tsv(row("a", 1, "5.000")))
    s1 = shard(tmp_path / "s1", tsv(row("a", 0), row("a", 1, "7.000")))
    cost.save_calibration(s1, cost.Calibration(gpu="h100"))
    report = merge(out, [s1])
    assert keys(out) == [("a", 1), ("a", 0)]
    assert read_rows(out / "results.tsv")[0]["latency_us"] == "5.000"  # the first one wins
    assert report["results.tsv"].conflicts == [("a", 1)]
    assert cost.load_calibration(out, "h100") == cost.load_calibration(s1, "h100")


def test_append_new_is_one_append_of_only_new_identities(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text(record("a", 0) + "\n")
    recs = [json.loads(record("a", 0)), json.loads(record("a", 1)), json.loads(record("a", 1)), {"no": "key"}]
    got = append_new(path, recs)
    assert (got.added, got.duplicates) == (1, 2)
    assert path.read_text() == record("a", 0) + "\n" + record("a", 1) + "\n"


def test_amk_search_merge_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s1 = shard(tmp_path / "s1", tsv(row("a", 0)))
    s2 = shard(tmp_path / "s2", tsv(row("a", 0), row("a", 1)))
    assert cli.main(["search-merge", str(tmp_path / "out"), str(s1), str(s2)]) == 0
    out = capsys.readouterr().out
    assert "results.tsv: 2 added, 1 already there" in out
    assert keys(tmp_path / "out") == [("a", 0), ("a", 1)]
    assert cli.main(["search-merge", str(tmp_path / "out"), str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err
