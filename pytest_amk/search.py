"""Keep/revert schedule search (DESIGN §9), without pytest.

Trial 0 is the file's schedule; later trials alternate between exploring a
random point of the space and mutating one knob of the incumbent. A candidate
is kept only when it is valid, correct and at least 1% faster than the
incumbent; a measured latency beats a predicted one; within 1% the simpler
schedule (fewer knobs away from the defaults) wins. Every trial is appended to
``results.tsv``; kept points go to ``corpus.jsonl``. Appends are single
``os.write`` calls under an exclusive lock, so concurrent writers never
interleave and a kill leaves at most one torn last line, which readers skip.
A loop that finds its experiment in the log resumes after the last trial.

``run_loop`` drives one loop for pytest's search items and ``amk loop``: one process
per experiment (a lock in the log directory), fitness measured on the GPU or
predicted by the (calibrated) cost model, optional write-back of the best schedule.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pytest_amk.schedule import FUSIONS, KNOBS, Schedule, ScheduleFile

TSV_COLUMNS = ("experiment", "trial", "tag", "model", "gpu", "outcome", "latency_us", "latency_kind",
               "pct_of_roofline", "schedule_id", "kept", "knobs", "description")
MIN_GAIN = 0.01
# The fusion sets the search visits: every prefix of FUSIONS (the default is one of them).
FUSION_CHOICES = tuple([list(f) for f in FUSIONS[:i]] for i in range(len(FUSIONS) + 1))


def knob_choices(name: str) -> tuple[Any, ...]:
    return FUSION_CHOICES if name == "fusion" else KNOBS[name].choices


# -- atomic logs --------------------------------------------------------------------

def append_line(path: Path, line: str) -> None:
    """Append one line atomically: one write, under an exclusive lock."""
    data = (line.rstrip("\n") + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size == 0 and path.suffix == ".tsv":
            data = ("\t".join(TSV_COLUMNS) + "\n").encode() + data
        elif size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data  # end a line torn by a kill, so this row stays whole
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_rows(path: Path) -> list[dict[str, str]]:
    """Complete rows of a results.tsv (a torn last line is skipped)."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    complete = lines[:-1]  # the part after the last newline is torn or empty
    rows = []
    for line in complete:
        cells = line.split("\t")
        if len(cells) != len(TSV_COLUMNS) or cells[0] == "experiment":
            continue
        rows.append(dict(zip(TSV_COLUMNS, cells, strict=True)))
    return rows


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Complete records of a JSONL log (a torn last line is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").split("\n")[:-1]:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


# -- trials -------------------------------------------------------------------------

@dataclass
class Trial:
    index: int
    tag: str  # "start", "explore" or "exploit"
    knobs: dict[str, Any]
    outcome: str = ""
    latency_us: float | None = None
    latency_kind: str | None = None
    pct_of_roofline: float | None = None
    kept: bool = False
    description: str = ""

    def complexity(self) -> int:
        return sum(1 for k, v in self.knobs.items() if v != KNOBS[k].default)


def better(cand: Trial, inc: Trial | None) -> bool:
    """The keep rule."""
    if cand.outcome != "passed" or cand.latency_us is None:
        return False
    if inc is None or inc.latency_us is None:
        return True
    if cand.latency_kind == "measured-gpu" and inc.latency_kind != "measured-gpu":
        return True
    if inc.latency_kind == "measured-gpu" and cand.latency_kind != "measured-gpu":
        return False
    if cand.latency_us <= inc.latency_us * (1 - MIN_GAIN):
        return True
    tie = cand.latency_us <= inc.latency_us * (1 + MIN_GAIN)
    return tie and cand.complexity() < inc.complexity()


def trial_of_row(row: dict[str, str]) -> Trial:
    return Trial(int(row["trial"]), row["tag"], json.loads(row["knobs"]), row["outcome"],
                 _float(row["latency_us"]), row["latency_kind"] or None, _float(row["pct_of_roofline"]),
                 row["kept"] == "1", row["description"])


def read_trials(results: Path, experiment: str) -> list[Trial]:
    """The trials of one experiment in a results.tsv, in log order."""
    return [trial_of_row(r) for r in read_rows(results) if r["experiment"] == experiment]


Evaluator = Callable[[Schedule], Any]  # returns a pipeline.ItemResult


@dataclass
class SearchLog:
    directory: Path

    @property
    def results(self) -> Path:
        return self.directory / "results.tsv"

    @property
    def corpus(self) -> Path:
        return self.directory / "corpus.jsonl"

    @property
    def measured(self) -> Path:
        """Every trial with a measured latency (kept or not): what calibration fits."""
        return self.directory / "measured.jsonl"


@dataclass
class Search:
    sf: ScheduleFile
    start: Schedule
    evaluate: Evaluator
    log: SearchLog
    seed: int = 0
    experiment: str = ""
    # False: the fitness is the cost model's prediction, blind to launch knobs (Knob.launch),
    # which then keep the start's values.
    measured: bool = True
    trials: list[Trial] = field(default_factory=list)
    incumbent: Trial | None = None

    def __post_init__(self) -> None:
        if not self.experiment:
            self.experiment = f"{Path(self.sf.path).stem}::{self.start.name}@{self.sf.gpu}"
        self.log.directory.mkdir(parents=True, exist_ok=True)
        self._resume()

    def _resume(self) -> None:
        for t in read_trials(self.log.results, self.experiment):
            self.trials.append(t)
            if t.kept:
                self.incumbent = t

    def _rng(self, index: int) -> random.Random:
        return random.Random(f"{self.seed}:{self.experiment}:{index}")

    def propose(self, index: int) -> Trial:
        if index == 0:
            return Trial(0, "start", dict(self.start.knobs), description="the file's schedule")
        rng = self._rng(index)
        space = [n for n in KNOBS if self.measured or not KNOBS[n].launch]
        if self.incumbent is None or index % 2 == 1:
            knobs = dict(self.start.knobs) | {name: rng.choice(knob_choices(name)) for name in space}
            return Trial(index, "explore", knobs, description="random point")
        knobs = dict(self.incumbent.knobs)
        name = rng.choice([n for n in space if len(knob_choices(n)) > 1])
        options = [c for c in knob_choices(name) if c != knobs[name]]
        knobs[name] = rng.choice(options)
        return Trial(index, "exploit", knobs, description=f"{name} = {json.dumps(knobs[name])}")

    def run(self, budget: int, progress: Callable[[Trial, Trial | None], None] | None = None) -> Trial | None:
        """Run trials until ``budget`` trials exist in the log (resuming counts earlier ones)."""
        for trial in self.iterate(budget):
            if progress:
                progress(trial, self.incumbent)
        return self.incumbent

    def iterate(self, budget: int) -> Iterator[Trial]:
        seen = {json.dumps(t.knobs, sort_keys=True) for t in self.trials}
        for index in range(len(self.trials), budget):
            trial = self.propose(index)
            key = json.dumps(trial.knobs, sort_keys=True)
            if key in seen and index > 0:
                trial.outcome, trial.description = "duplicate", trial.description + " (already tried)"
            else:
                seen.add(key)
                self._evaluate(trial)
            self._decide(trial)
            yield trial

    def _decide(self, trial: Trial) -> None:
        """The keep rule against the incumbent, then the log: the one place trials are decided."""
        trial.kept = better(trial, self.incumbent)
        if trial.kept:
            self.incumbent = trial
        self._record(trial)
        self.trials.append(trial)

    def _evaluate(self, trial: Trial) -> None:
        apply_evaluation(trial, evaluation(self.evaluate, self._schedule_of(trial)))

    def _schedule_of(self, trial: Trial) -> Schedule:
        return Schedule(f"{self.start.name}.trial{trial.index}", trial.knobs)

    def run_parallel(self, budget: int, workers: list[str | None], evaluate_factory: Callable[[], Evaluator],
                     progress: Callable[[Trial, Trial | None], None] | None = None) -> Trial | None:
        """``run`` with the evaluations spread over one process per entry of ``workers``
        (a device each, None = CPU); see ``iterate_parallel``."""
        for trial in self.iterate_parallel(budget, workers, evaluate_factory):
            if progress:
                progress(trial, self.incumbent)
        return self.incumbent

    def iterate_parallel(self, budget: int, workers: list[str | None],
                         evaluate_factory: Callable[[], Evaluator]) -> Iterator[Trial]:
        """``iterate`` with one evaluator process per entry of ``workers``, pinned to that
        device (``search_parallel``); this process stays the only decision maker and writer.

        Trial i is proposed from the incumbent known when it is proposed; with W workers up
        to W trials are in flight, so an exploit proposal may build on an incumbent up to
        W-1 trials old. Keep decisions and log appends still happen in trial-index order, so
        the log is the same for a fixed W whenever the evaluations are deterministic; W = 1
        gives exactly ``iterate``'s trials. ``evaluate_factory`` must pickle; each worker
        calls it once, after pinning, to get its evaluator."""
        from pytest_amk.search_parallel import EvaluatorPool

        if len(self.trials) >= budget:
            return
        seen = {json.dumps(t.knobs, sort_keys=True) for t in self.trials}
        width = max(1, len(workers))
        pending: dict[int, tuple[Trial, Any]] = {}
        index = len(self.trials)
        with EvaluatorPool(workers or [None], evaluate_factory) as pool:
            while index < budget or pending:
                while index < budget and len(pending) < width:
                    trial = self.propose(index)
                    key = json.dumps(trial.knobs, sort_keys=True)
                    if key in seen and index > 0:
                        trial.outcome, trial.description = "duplicate", trial.description + " (already tried)"
                        pending[index] = (trial, None)
                    else:
                        seen.add(key)
                        pending[index] = (trial, pool.submit(self._schedule_of(trial)))
                    index += 1
                first = min(pending)
                trial, future = pending.pop(first)
                if future is not None:
                    apply_evaluation(trial, future.result())
                self._decide(trial)
                yield trial

    def _record(self, t: Trial) -> None:
        cells = [self.experiment, str(t.index), t.tag, f"{self.sf.model.id}/{self.sf.model.dtype}", self.sf.gpu,
                 t.outcome, _fmt(t.latency_us), t.latency_kind or "", _fmt(t.pct_of_roofline),
                 f"{Path(self.sf.path).name}::{self.start.name}.trial{t.index}", "1" if t.kept else "0",
                 json.dumps(t.knobs, sort_keys=True), t.description]
        append_line(self.log.results, "\t".join(c.replace("\t", " ").replace("\n", " ") for c in cells))
        record = json.dumps({
            "experiment": self.experiment, "trial": t.index, "model": self.sf.model.id,
            "dtype": self.sf.model.dtype, "max_seq": self.sf.model.max_seq, "seed": self.sf.model.seed,
            "gpu": self.sf.gpu, "latency_us": t.latency_us, "latency_kind": t.latency_kind,
            "knobs": t.knobs}, sort_keys=True)
        if t.kept:
            append_line(self.log.corpus, record)
        if t.latency_kind == "measured-gpu":
            append_line(self.log.measured, record)


def evaluation(evaluate: Evaluator, sched: Schedule) -> dict[str, Any]:
    """What a trial's evaluation found, as plain data (it crosses process boundaries)."""
    try:
        result = evaluate(sched)
    except Exception as e:  # a crashing candidate is logged as failed, never kept
        return {"outcome": "failed", "error": f"{type(e).__name__}: {e}"}
    v = result.verdict
    return {"outcome": result.outcome, "latency_us": v.latency_us, "latency_kind": v.latency_kind,
            "pct_of_roofline": v.pct_of_roofline, "message": result.message}


def apply_evaluation(trial: Trial, found: dict[str, Any]) -> None:
    trial.outcome = found["outcome"]
    if "error" in found:
        trial.description = f"{trial.description}: {found['error']}"
        return
    trial.latency_us, trial.latency_kind = found["latency_us"], found["latency_kind"]
    trial.pct_of_roofline = found["pct_of_roofline"]
    if trial.outcome != "passed":
        trial.description += f": {found['message'][:200]}"


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.3f}"


def _float(s: str) -> float | None:
    return float(s) if s else None


# -- write-back -------------------------------------------------------------------------

def write_back(path: str | Path, best: Trial, base_name: str) -> str:
    """Append the best schedule to its TOML file as a new [[schedule]], keeping the
    user's comments and formatting. Returns the new schedule's name."""
    import tomlkit

    p = Path(path)
    original = p.read_text(encoding="utf-8")
    names = {s.get("name") for s in tomlkit.parse(original).get("schedule", [])}
    name, n = f"{base_name}-searched", 2
    while name in names:
        name, n = f"{base_name}-searched-{n}", n + 1
    table = tomlkit.table()
    kind = "measured" if best.latency_kind == "measured-gpu" else "predicted"
    table.add(tomlkit.comment(f"found by amk search (trial {best.index}): {best.latency_us:.1f} us {kind}"))
    table.add("name", name)
    for key, value in best.knobs.items():
        if value != KNOBS[key].default:
            table.add(tomlkit.key(key.split(".")) if "." in key else key, value)
    aot = tomlkit.aot()
    aot.append(table)
    # Appended as text so the user's comments and layout above stay byte for byte.
    text = original.rstrip("\n") + "\n\n" + tomlkit.dumps({"schedule": aot})
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, p)
    return name


# -- the loop driver (pytest's search items and `amk loop`) --------------------------------

Progress = Callable[[str], None]


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` for the block. Yields True when another process
    held it first and this one waited. The lock dies with its process (flock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            waited = False
        except BlockingIOError:
            fcntl.flock(fd, fcntl.LOCK_EX)
            waited = True
        yield waited
    finally:
        os.close(fd)


def slug(text: str) -> str:
    """A file-name-safe form of an experiment name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def experiment_for(sf: ScheduleFile, start: Schedule, kind: str, calibration: Any = None, seed: int = 0) -> str:
    """The experiment a loop appends to: file, start schedule, target and fitness, plus a
    digest of everything that makes its trials comparable (model, start knobs, seed,
    cost-model constants), so the same loop run again resumes it and proposes the same
    candidates wherever the file lives."""
    consts = None
    if calibration is not None:
        consts = [calibration.task_overhead_us, calibration.stage_sync_us, calibration.bw_fraction,
                  calibration.launch_us]
    # Launch knobs at their defaults are left out: experiments logged before they existed resume.
    knobs = {k: v for k, v in start.knobs.items() if not (KNOBS[k].launch and v == KNOBS[k].default)}
    ident = json.dumps({"model": asdict(sf.model), "knobs": knobs,
                        "seed": seed, "kind": kind, "cost": consts}, sort_keys=True)
    digest = hashlib.sha256(ident.encode()).hexdigest()[:8]
    fitness = "gpu" if kind == "measured-gpu" else ("model-cal" if calibration is not None else "model")
    return f"{Path(sf.path).stem}::{start.name}@{sf.gpu}:{fitness}:{digest}"


def floor_of(trials: list[Trial]) -> float | None:
    """The roofline floor, from a passed trial's latency and percent of roofline."""
    for t in trials:
        if t.outcome == "passed" and t.latency_us and t.pct_of_roofline:
            return t.latency_us * t.pct_of_roofline / 100.0
    return None


def _lat(t: Trial | None) -> str:
    return "-" if t is None or t.latency_us is None else f"{t.latency_us:.1f} us"


@dataclass
class LoopResult:
    """What one loop did, or found in the log."""

    file: str
    schedule: str
    experiment: str
    gpu: str
    model: str
    budget: int
    kind: str  # the fitness: "measured-gpu" or "predicted"
    log_dir: Path
    trials: list[Trial]
    incumbent: Trial | None
    new_trials: int
    driven_elsewhere: bool  # another process held the loop's lock and ran it: this one only read the log
    calibration: str = ""
    written: str | None = None  # the schedule written back to the file

    @property
    def label(self) -> str:
        return f"{Path(self.file).name}::{self.schedule}"

    @property
    def start(self) -> Trial | None:
        return self.trials[0] if self.trials else None

    @property
    def ok(self) -> bool:
        """A valid, correct incumbent with a latency."""
        inc = self.incumbent
        return inc is not None and inc.outcome == "passed" and inc.latency_us is not None

    @property
    def gain_pct(self) -> float | None:
        s, b = self.start, self.incumbent
        if s is None or b is None or not s.latency_us or b.latency_us is None or s.latency_kind != b.latency_kind:
            return None
        return 100.0 * (s.latency_us - b.latency_us) / s.latency_us

    def headline(self) -> str:
        if not self.ok:
            counts = ", ".join(f"{n} {o}" for o, n in sorted(Counter(t.outcome for t in self.trials).items()))
            return f"no valid schedule in {len(self.trials)} trials ({counts})"
        kind = "measured" if self.kind == "measured-gpu" else "predicted"
        gain = self.gain_pct
        change = f" ({(-gain if gain else 0.0):+.1f}%)" if gain is not None else ""
        kept = sum(t.kept for t in self.trials)
        where = ""
        if self.driven_elsewhere:
            where = "; run by another process"
        elif not self.new_trials:
            where = "; all from the log"
        return (f"start {_lat(self.start)} -> best {_lat(self.incumbent)} {kind}{change} in {len(self.trials)} "
                f"trials, {kept} kept (best: trial {self.incumbent.index if self.incumbent else '-'}){where}")

    def summary(self) -> dict[str, Any]:
        """Plain JSON (``amk loop --json``; travels from xdist workers on the report)."""
        s, b = self.start, self.incumbent
        return {
            "file": self.file, "schedule": self.schedule, "label": self.label, "experiment": self.experiment,
            "gpu": self.gpu, "model": self.model, "budget": self.budget, "kind": self.kind,
            "trials": len(self.trials), "new_trials": self.new_trials, "kept": sum(t.kept for t in self.trials),
            "outcomes": dict(Counter(t.outcome for t in self.trials)),
            "start_us": s.latency_us if s else None, "start_kind": s.latency_kind if s else None,
            "start_outcome": s.outcome if s else None,
            "best_us": b.latency_us if b else None, "best_kind": b.latency_kind if b else None,
            "best_trial": b.index if b else None, "best_knobs": b.knobs if b else None,
            "best_changed_knobs": {k: v for k, v in b.knobs.items() if v != KNOBS[k].default} if b else None,
            "gain_pct": self.gain_pct, "floor_us": floor_of(self.trials), "ok": self.ok,
            "written": self.written, "driven_elsewhere": self.driven_elsewhere,
            "log_dir": str(self.log_dir), "results": str(SearchLog(self.log_dir).results),
            "calibration": self.calibration, "headline": self.headline(),
        }


def run_loop(sf: ScheduleFile, start: Schedule, budget: int, log_dir: str | Path, *, device: str = "auto",
             steps: int | None = None, write: bool = False, seed: int = 0,
             progress: Progress | None = None, workers: int = 1) -> LoopResult:
    """Drive one keep/revert loop to ``budget`` trials (counting those already in the log).

    Exactly one process drives an experiment: it holds the experiment's lock in
    ``log_dir/locks`` while it runs; another process that asks for the same loop waits for
    the lock, then finds the trials in the log and runs none (``driven_elsewhere``). The
    fitness is the measured latency where the GPU stage runs, else the cost model's
    prediction (calibrated when ``log_dir/calibration.json`` has the file's target).
    With ``write``, a best schedule that differs from the start and is not in the file
    yet is written back to it. Raises RuntimeError for device "cuda" without a GPU.

    With ``workers`` > 1 the trials are evaluated by that many spawned processes, one per
    visible GPU when the GPU stage runs (capped at the GPU count), else CPU processes; this
    process still decides and writes (``Search.iterate_parallel``)."""
    from pytest_amk import cost, pipeline

    log_dir = Path(log_dir)
    measured, why = pipeline.gpu_status(device)
    kind = "measured-gpu" if measured else "predicted"
    cal = None if measured else cost.load_calibration(log_dir, sf.gpu)
    experiment = experiment_for(sf, start, kind, cal, seed)
    label = f"{Path(sf.path).name}::{start.name}"
    say = progress or (lambda line: None)
    n_steps = pipeline.DEFAULT_STEPS if steps is None else steps

    def evaluate(sched: Schedule) -> pipeline.ItemResult:
        return pipeline.run_schedule(sf, sched, device, n_steps)

    with exclusive(log_dir / "locks" / f"{slug(experiment)}.lock") as waited:
        search = Search(sf, start, evaluate, SearchLog(log_dir), seed=seed, experiment=experiment,
                        measured=measured)
        before = len(search.trials)
        fitness = "measured GPU latency" if measured else f"{(cal or cost.DEFAULT).describe()} ({why})"
        if waited:
            say(f"{label}: driven by another process; {before} trials read from {search.log.results}")
        elif before >= budget:
            say(f"{label}: {before} trials already in {search.log.results} (budget {budget}): nothing to run")
        else:
            verb = f"resuming at trial {before + 1}/{budget}" if before else f"{budget} trials"
            say(f"{label}: {verb}; fitness: {fitness}; log {search.log.results}")
        if workers > 1:
            from pytest_amk import devices
            from pytest_amk.search_parallel import LoopEvaluatorFactory, plan_workers

            visible = devices.visible_devices(os.environ) if measured else []
            plan = plan_workers(workers, visible)
            if before < budget:
                say(f"{label}: {len(plan)} evaluator processes"
                    + (f" on GPUs {', '.join(str(d) for d in plan)}" if visible else " (CPU)"))
            trials = search.iterate_parallel(budget, plan, LoopEvaluatorFactory(sf, device, n_steps, cal))
        else:
            trials = search.iterate(budget)
        with cost.using(cal):
            for t in trials:
                mark = " (kept)" if t.kept else ""
                lat = f" {_lat(t)}" if t.latency_us is not None else ""
                inc = search.incumbent
                say(f"{label}: trial {t.index + 1}/{budget} {t.tag}: {t.outcome}{lat}{mark} | incumbent "
                    f"{_lat(inc)}{' ' + inc.latency_kind if inc and inc.latency_kind else ''}")
        result = LoopResult(sf.path, start.name, experiment, sf.gpu, f"{sf.model.id}/{sf.model.dtype}", budget,
                            kind, log_dir, list(search.trials), search.incumbent, len(search.trials) - before,
                            waited and len(search.trials) == before,
                            "measured" if measured else (cal or cost.DEFAULT).describe())
        if write:
            result.written = write_best(sf, start, search.incumbent)
            if result.written:
                say(f"{label}: wrote the best schedule to {sf.path} as {result.written!r}")
    if measured and result.new_trials:
        note = recalibrate(log_dir, sf.gpu)
        if note:
            say(f"{label}: {note}")
    return result


def write_best(sf: ScheduleFile, start: Schedule, best: Trial | None) -> str | None:
    """Write ``best`` back to the file unless it is the start or the file already has it;
    the file must still parse afterwards (else it is restored and ScheduleError raised)."""
    from pytest_amk.schedule import ScheduleError, parse_file

    if best is None or best.outcome != "passed" or best.index == 0 or best.knobs == start.knobs:
        return None
    path = Path(sf.path)
    if any(s.knobs == best.knobs for s in parse_file(path, sf.gpu).schedules):
        return None
    original = path.read_text(encoding="utf-8")
    name = write_back(path, best, start.name)
    try:
        parse_file(path, sf.gpu)
    except ScheduleError:
        path.write_text(original, encoding="utf-8")
        raise
    return name


MIN_CALIBRATION_POINTS = 6


def recalibrate(log_dir: Path, gpu: str) -> str:
    """Refit the cost model to every measured trial for ``gpu`` in the log and store it in
    ``calibration.json`` (with enough points). Returns a note, "" when nothing was done."""
    from pytest_amk import cost

    rows = [r for r in read_jsonl(SearchLog(log_dir).measured) if r.get("gpu") == gpu]
    if len(rows) < MIN_CALIBRATION_POINTS:
        return ""
    try:
        cal = cost.calibrate(rows)
    except Exception as e:  # calibration is a by-product: never fail the loop for it
        return f"calibration skipped: {type(e).__name__}: {e}"
    path = cost.save_calibration(log_dir, cal)
    return f"{cal.describe()} -> {path}"
