"""The pytest side of the keep/revert search (DESIGN §9): ``--amk-search=N``.

With a budget, every schedule file gets one more item, ``<file>::search``, that
requests the session fixture ``amk_search`` (a ``SearchRegistry``) and drives the
file's loop through ``pytest_amk.search.run_loop``: trial 0 is the file's first
schedule expected to pass, the fitness is the measured latency where the GPU stage
runs and the cost model's prediction otherwise. The item passes when the loop ends
with a valid, correct incumbent, and says start vs best latency.

One process per loop: the fixture runs once per xdist worker, but it only hands out
the registry; each loop runs under its experiment's lock in the search directory, so
a second process that reaches the same loop (``--dist each``, a parallel job) waits,
then reads the trials from the log instead of running them again.

Progress lines go through the terminal reporter (not from xdist workers, whose output
is not shown, nor with ``-q``). The results travel on the item's report (attribute
``amk_search``, JSON) to the controller, which writes a trajectory chart per loop, the
trials as a JUnit suite (``search-junit.xml``) and the summary table.

Nothing assumes one host: the controller tells each xdist worker its hostname, search
directory and log rows (``workerinput["amk_search"]``). A worker on the same host with the
same directory appends to the logs itself, as above; any other (``AMK_SEARCH_REMOTE=1``
forces it) runs its loops in a private staging directory seeded with those rows and sends
the new rows on the report, which the controller alone appends (``search_merge``), each
(experiment, trial) once.

Registered as a plugin (``SearchPlugin``) only when the budget is above 0; nothing
heavy is imported until an item runs.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_amk.items import AMK_STATE, ScheduleFile, ScheduleItem

if TYPE_CHECKING:
    from collections.abc import Callable, Generator, Iterable

    from pytest_amk.schedule import Schedule
    from pytest_amk.schedule import ScheduleFile as ParsedFile
    from pytest_amk.search import LoopResult, Trial

DEFAULT_DIR = ".amk/search"
JUNIT_FILE = "search-junit.xml"
ITEM_NAME = "search"
PLUGIN_NAME = "amk-search"
NO_START = "no schedule to start a search from: every [[schedule]] expects REJECTED"


@dataclass(frozen=True)
class SearchSettings:
    budget: int  # trials per loop, counting those already in the log; 0 = no search
    directory: Path  # results.tsv, corpus.jsonl, calibration.json, charts, JUnit suite
    write: bool  # write the best schedule back to its file
    seed: int = 0
    workers: int = 1  # evaluator processes per loop (one per GPU, capped at the GPU count); 1 = in-process


SETTINGS = pytest.StashKey[SearchSettings]()
START = pytest.StashKey["tuple[ParsedFile, Schedule | None]"]()
LOOP = pytest.StashKey["LoopResult"]()
SENT = pytest.StashKey["dict[str, list[dict[str, Any]]]"]()  # a remote worker's new log rows
WORKERINPUT_KEY = "amk_search"
REMOTE_ENV = "AMK_SEARCH_REMOTE"


# -- options --------------------------------------------------------------------------

def add_options(parser: pytest.Parser) -> None:
    """Called from plugin.pytest_addoption."""
    group = parser.getgroup("amk")
    group.addoption("--amk-search", dest="amk_search", metavar="N", type=int, default=None,
                    help="run a keep/revert schedule search of N trials per schedule file, as one more "
                         "item <file>::search (resumes from the log). Default 0 (off). ini: amk_search")
    group.addoption("--amk-search-dir", dest="amk_search_dir", metavar="DIR", default=None,
                    help=f"search logs, charts and JUnit suite; default {DEFAULT_DIR} under the rootdir. "
                         "ini: amk_search_dir")
    group.addoption("--amk-search-write", dest="amk_search_write", action="store_true", default=None,
                    help="write each search's best schedule back to its file as a new [[schedule]]. "
                         "ini: amk_search_write")
    group.addoption("--amk-search-workers", dest="amk_search_workers", metavar="N", type=int, default=1,
                    help="spread each loop's trials over N evaluator processes, one per visible GPU (capped "
                         "at the GPU count; CPU processes without GPUs); one process still decides and writes "
                         "the log. Default 1 (in-process)")
    parser.addini("amk_search", "trials per schedule file of the keep/revert search (like --amk-search)",
                  default="")
    parser.addini("amk_search_dir", f"search log directory, relative to the rootdir (default {DEFAULT_DIR})",
                  default="")
    parser.addini("amk_search_write", "write the best schedule back (like --amk-search-write)", type="bool",
                  default=False)


def settings(config: pytest.Config) -> SearchSettings:
    budget: Any = config.getoption("amk_search", None)
    if budget is None:
        raw = str(config.getini("amk_search")).strip()
        try:
            budget = int(raw) if raw else 0
        except ValueError:
            raise pytest.UsageError(f"amk_search = {raw!r}: expected an integer") from None
    if budget < 0:
        raise pytest.UsageError(f"--amk-search/amk_search = {budget}: must be 0 or more")
    option_dir = config.getoption("amk_search_dir", None)
    if option_dir:
        directory = (config.invocation_params.dir / option_dir).resolve()
    else:
        directory = (config.rootpath / (str(config.getini("amk_search_dir")).strip() or DEFAULT_DIR)).resolve()
    write = config.getoption("amk_search_write", None)
    if write is None:
        write = bool(config.getini("amk_search_write"))
    workers = config.getoption("amk_search_workers", None)
    workers = 1 if workers is None else int(workers)
    if workers < 1:
        raise pytest.UsageError(f"--amk-search-workers = {workers}: must be 1 or more")
    return SearchSettings(budget, directory, bool(write), workers=workers)


def configure(config: pytest.Config) -> None:
    """Called from plugin.pytest_configure: stash the settings; register the plugin when searching."""
    s = settings(config)
    config.stash[SETTINGS] = s
    if s.budget > 0 and not config.pluginmanager.has_plugin(PLUGIN_NAME):
        config.pluginmanager.register(SearchPlugin(config, s), PLUGIN_NAME)
        # This module holds the amk_search fixture (pytest 9.2 deprecates fixtures that are
        # methods of a plugin instance).
        config.pluginmanager.register(sys.modules[__name__], PLUGIN_NAME + "-fixtures")


@pytest.fixture(scope="session")
def amk_search(pytestconfig: pytest.Config) -> SearchRegistry:
    """The search registry: ``amk_search.run(schedule_file, start)`` -> LoopResult."""
    return SearchRegistry(pytestconfig, pytestconfig.stash[SETTINGS])


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


# -- the fixture's value -----------------------------------------------------------------

class SearchRegistry:
    """What ``amk_search`` gives: ``run(schedule_file, start)`` drives (or reads) the loop
    of one file, once per process."""

    def __init__(self, config: pytest.Config, settings: SearchSettings) -> None:
        self.config = config
        self.settings = settings
        self.results: dict[str, LoopResult] = {}
        self.sent: dict[str, dict[str, list[dict[str, Any]]]] = {}  # key -> new rows (remote workers)
        self._staging: Path | None = None

    def run(self, sf: ParsedFile, start: Schedule) -> LoopResult:
        from pytest_amk.search import run_loop

        key = f"{sf.path}::{start.name}"
        if key not in self.results:
            state = self.config.stash[AMK_STATE]
            s = self.settings
            staging = self.staging()
            result = run_loop(sf, start, s.budget, staging or s.directory, device=state.device, steps=state.steps,
                              write=s.write, seed=s.seed, progress=progress_writer(self.config), workers=s.workers)
            if staging is not None:
                from pytest_amk.search_merge import new_rows

                self.sent[key] = new_rows(staging, result.experiment, len(result.trials) - result.new_trials)
            self.results[key] = result
        return self.results[key]

    def rows_to_send(self, sf: ParsedFile, start: Schedule) -> dict[str, list[dict[str, Any]]] | None:
        return self.sent.get(f"{sf.path}::{start.name}")

    def staging(self) -> Path | None:
        """A remote worker's private search directory (made and seeded once), or None where
        this process writes the search directory itself."""
        info = getattr(self.config, "workerinput", {}).get(WORKERINPUT_KEY)
        if info is None or not is_remote(info, self.settings.directory):
            return None
        if self._staging is None:
            import shutil
            import tempfile

            from pytest_amk.search_merge import seed_staging

            staging = self._staging = Path(tempfile.mkdtemp(prefix="amk-search-stage-"))
            seed_staging(staging, info["results"], info["calibration"])
            self.config.add_cleanup(lambda: shutil.rmtree(staging, ignore_errors=True))
        return self._staging


def is_remote(info: dict[str, Any], directory: Path) -> bool:
    """Whether a worker must not write the controller's search directory: another host, or
    another directory (a remote gateway's rsynced rootdir); AMK_SEARCH_REMOTE=1 forces it."""
    return (bool(info.get("remote")) or os.environ.get(REMOTE_ENV) == "1" or info["host"] != socket.gethostname()
            or info["directory"] != str(directory))


def progress_writer(config: pytest.Config) -> Callable[[str], None] | None:
    """Lines to the terminal while an item runs (capture suspended); None on xdist workers,
    with -q, or without a terminal reporter."""
    if _is_worker(config) or config.get_verbosity() < 0:
        return None
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if tr is None:
        return None
    capman = config.pluginmanager.get_plugin("capturemanager")

    def write(line: str) -> None:
        if capman is not None:
            with capman.global_and_fixture_disabled():
                tr.write_line(f"amk search {line}")
        else:
            tr.write_line(f"amk search {line}")

    return write


# -- the item -----------------------------------------------------------------------------

def _search(amk_search: Any) -> None:
    """The keep/revert search of a schedule file (see pytest_amk.search_session.SearchItem)."""


class SearchItem(pytest.Function):
    """``<file>::search``: the keep/revert loop of one schedule file."""

    @classmethod
    def from_parent(cls, parent: pytest.Collector, *, name: str,  # type: ignore[override]
                    schedule_file: ParsedFile, start: Schedule | None, **kw: Any) -> SearchItem:
        item: SearchItem = super().from_parent(parent, name=name, callobj=_search, **kw)
        item.stash[START] = (schedule_file, start)
        if start is None:
            item.add_marker(pytest.mark.skip(reason=NO_START))
        return item

    def runtest(self) -> None:
        sf, start = self.stash[START]
        if start is None:
            pytest.skip(NO_START)
        registry: SearchRegistry = self.funcargs["amk_search"]
        try:
            result = registry.run(sf, start)
        except RuntimeError as e:  # --amk-device=cuda without a GPU
            pytest.fail(str(e), pytrace=False)
        self.stash[LOOP] = result
        sent = registry.rows_to_send(sf, start)
        if sent is not None:
            self.stash[SENT] = sent
        summary = result.summary()
        for key in ("trials", "new_trials", "kept", "start_us", "best_us", "best_kind", "gain_pct", "experiment",
                    "driven_elsewhere", "written"):
            value = summary[key]
            self.user_properties.append((f"amk_search_{key}", "" if value is None else str(value)))
        if not result.ok:
            pytest.fail(f"search {result.label}: {result.headline()}", pytrace=False)

    def reportinfo(self) -> tuple[Path, int, str]:
        return self.path, 0, f"amk search of {self.path.name}"


def trial_table(trials: Iterable[Trial]) -> str:
    rows = [("trial", "tag", "outcome", "latency_us", "kind", "kept", "description")]
    for t in trials:
        rows.append((str(t.index), t.tag, t.outcome, "" if t.latency_us is None else f"{t.latency_us:.1f}",
                     t.latency_kind or "", "yes" if t.kept else "", t.description[:90]))
    return _table(rows)


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


# -- the plugin (registered only with a budget) -----------------------------------------------

class SearchPlugin:
    def __init__(self, config: pytest.Config, settings: SearchSettings) -> None:
        self.config = config
        self.settings = settings
        self.summaries: dict[str, dict[str, Any]] = {}  # experiment -> summary (controller)
        self.notes: list[str] = []  # artifact lines for the terminal summary

    @pytest.hookimpl(wrapper=True)
    def pytest_make_collect_report(self, collector: pytest.Collector) -> Generator[None, Any, Any]:
        """A schedule file's collect report gets the ``search`` item (so ``<file>::search``
        selects it, and ``<file>::<schedule>`` does not)."""
        rep = yield
        if not isinstance(collector, ScheduleFile) or not rep.passed:
            return rep
        items = [n for n in rep.result if isinstance(n, ScheduleItem)]
        if not items:
            return rep  # a malformed file: its error item says why
        start = next((i.schedule for i in items if i.schedule.expect.outcome != "rejected"), None)
        names = {n.name for n in rep.result}
        name = ITEM_NAME if ITEM_NAME not in names else f"amk-{ITEM_NAME}"
        rep.result.append(SearchItem.from_parent(collector, name=name, schedule_file=items[0].schedule_file,
                                                 start=start))
        return rep

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        """xdist (controller), per worker: what a remote worker needs to resume its loops
        (the results.tsv rows, not the corpus, which no loop reads) and to name their
        experiments as here (calibration.json)."""
        from pytest_amk.search_merge import CALIBRATION_FILE, resume_rows

        directory = self.settings.directory
        try:
            calibration = (directory / CALIBRATION_FILE).read_text(encoding="utf-8")
        except OSError:
            calibration = ""
        node.workerinput[WORKERINPUT_KEY] = {
            "host": socket.gethostname(), "directory": str(directory), "remote": os.environ.get(REMOTE_ENV) == "1",
            "results": resume_rows(directory), "calibration": calibration}

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]
                                  ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        if isinstance(item, SearchItem) and call.when == "call" and LOOP in item.stash:
            result = item.stash[LOOP]
            report.amk_search = json.dumps(result.summary())  # type: ignore[attr-defined]
            if SENT in item.stash:
                report.amk_search_rows = json.dumps(item.stash[SENT])  # type: ignore[attr-defined]
            report.sections.append(("amk search", f"{result.label}: {result.headline()}\n\n"
                                    f"{trial_table(result.trials)}"))
        return report

    @pytest.hookimpl
    def pytest_report_teststatus(self, report: pytest.TestReport, config: pytest.Config) -> Any:
        text = getattr(report, "amk_search", "")
        if report.when == "call" and report.passed and text:
            summary = json.loads(text)
            return "passed", ".", (f"PASSED ({summary['headline']})", {"green": True})
        return None

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        text = getattr(report, "amk_search", "")
        if report.when != "call" or not text or _is_worker(self.config):
            return
        summary = json.loads(text)
        summary["nodeid"] = report.nodeid
        rows = getattr(report, "amk_search_rows", "")
        if rows:
            self.gather(summary, json.loads(rows))
        seen = self.summaries.get(summary["experiment"])
        if seen is None or (seen["driven_elsewhere"] and not summary["driven_elsewhere"]):
            self.summaries[summary["experiment"]] = summary

    def gather(self, summary: dict[str, Any], rows: dict[str, list[dict[str, Any]]]) -> None:
        """A remote worker's new rows into this directory (this process the only writer);
        the summary then points at this directory's log, where the charts are drawn from."""
        from pytest_amk.search_merge import LOGS, append_new

        directory = self.settings.directory
        added = {name: append_new(directory / name, rows.get(name, [])).added for name in LOGS}
        summary["log_dir"], summary["results"] = str(directory), str(directory / "results.tsv")
        if added.get("measured.jsonl"):  # calibration stays here, fitted on every host's measurements
            from pytest_amk.search import recalibrate

            note = recalibrate(directory, summary["gpu"])
            if note:
                self.notes.append(f"calibration {summary['label']}: {note}")

    @pytest.hookimpl
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if _is_worker(self.config) or not self.summaries:
            return
        self.notes += write_artifacts(list(self.summaries.values()), self.settings.directory)

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.summaries or self.config.get_verbosity() < -1:
            return
        tr = terminalreporter
        tr.write_sep("=", f"amk search ({self.settings.budget} trials per file)", bold=True)
        for line in summary_table(list(self.summaries.values())).splitlines():
            tr.write_line(line)
        for line in self.notes:
            tr.write_line(line)


def summary_table(summaries: list[dict[str, Any]]) -> str:
    rows = [("file", "trials", "kept", "start", "best", "kind", "gain")]
    for s in summaries:
        where = s.get("nodeid", "").rsplit("::", 1)[0] or s["file"]
        gain = "" if s["gain_pct"] is None else f"{s['gain_pct']:.1f}%"
        rows.append((f"{where}::{s['schedule']}", str(s["trials"]), str(s["kept"]), _us(s["start_us"]),
                     _us(s["best_us"]), s["best_kind"] or s["kind"], gain))
    return _table(rows)


def _us(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} us"


# -- artifacts: charts and the JUnit suite ---------------------------------------------------------

def write_artifacts(summaries: list[dict[str, Any]], directory: Path) -> list[str]:
    """A trajectory chart per loop and the JUnit suite of all their trials, from the log;
    returns the lines that say where they are (and what was written back)."""
    from pytest_amk import chart
    from pytest_amk.search import SearchLog, read_trials, slug

    notes: list[str] = []
    suites: list[tuple[dict[str, Any], list[Trial]]] = []
    for s in summaries:
        trials = read_trials(SearchLog(Path(s["log_dir"])).results, s["experiment"])
        suites.append((s, trials))
        png = chart.write_chart(Path(s["log_dir"]) / f"{slug(s['experiment'])}.png", trials, s["floor_us"],
                                f"{s['label']} on {s['gpu']} ({s['model']}): {s['headline']}",
                                "measured" if s["kind"] == "measured-gpu" else "predicted")
        notes.append(f"chart {s['label']}: {_rel(png)}" if png else f"chart {s['label']}: {chart.MISSING}")
        if s.get("written"):
            notes.append(f"wrote {s['label']}'s best schedule to {_rel(Path(s['file']))} as {s['written']!r}")
    junit = write_junit(directory / JUNIT_FILE, suites)
    notes.append(f"trials as JUnit XML: {_rel(junit)}; log: {_rel(directory / 'results.tsv')}")
    return notes


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def write_junit(path: Path, suites: list[tuple[dict[str, Any], list[Trial]]]) -> Path:
    """One testsuite per loop, one testcase per trial: REJECTED and duplicate trials are
    skipped, FAIL trials failures; system-out holds the latency and knobs."""
    from junit_xml import TestCase, TestSuite, to_xml_report_string

    out = []
    for s, trials in suites:
        cases = []
        for t in trials:
            lat = "no latency" if t.latency_us is None else f"{t.latency_us:.3f} us {t.latency_kind}"
            case = TestCase(f"trial{t.index:03d}", classname=f"amk.search.{s['label']}", status=t.outcome,
                            stdout=f"{t.tag}: {t.outcome}, {lat}{', kept' if t.kept else ''}\n"
                                   f"{t.description}\nknobs: {json.dumps(t.knobs, sort_keys=True)}")
            if t.outcome == "failed":
                case.add_failure_info(message=t.description or "failed", failure_type="failed")
            elif t.outcome != "passed":
                case.add_skipped_info(message=f"{t.outcome.upper()}: {t.description}")
            cases.append(case)
        props = {k: "" if s.get(k) is None else str(s.get(k))
                 for k in ("file", "gpu", "model", "kind", "start_us", "best_us", "gain_pct", "best_trial")}
        out.append(TestSuite(s["experiment"], cases, properties=props))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(to_xml_report_string(out, prettyprint=True), encoding="utf-8")
    os.replace(tmp, path)
    return path
