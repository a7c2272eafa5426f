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
"""

from __future__ import annotations

import fcntl
import json
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_amk.schedule import KNOBS, Schedule, ScheduleFile

TSV_COLUMNS = ("experiment", "trial", "tag", "model", "gpu", "outcome", "latency_us", "latency_kind",
               "pct_of_roofline", "schedule_id", "kept", "knobs", "description")
MIN_GAIN = 0.01
FUSION_CHOICES = ([], [["rmsnorm", "gemv"]], [["rmsnorm", "gemv"], ["gemv", "residual_add"]],
                  [["rmsnorm", "gemv"], ["gemv", "residual_add"], ["gemv", "silu_mul"]])


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


@dataclass
class Search:
    sf: ScheduleFile
    start: Schedule
    evaluate: Evaluator
    log: SearchLog
    seed: int = 0
    experiment: str = ""
    trials: list[Trial] = field(default_factory=list)
    incumbent: Trial | None = None

    def __post_init__(self) -> None:
        if not self.experiment:
            self.experiment = f"{Path(self.sf.path).stem}::{self.start.name}@{self.sf.gpu}"
        self.log.directory.mkdir(parents=True, exist_ok=True)
        self._resume()

    def _resume(self) -> None:
        for row in read_rows(self.log.results):
            if row["experiment"] != self.experiment:
                continue
            t = Trial(int(row["trial"]), row["tag"], json.loads(row["knobs"]), row["outcome"],
                      _float(row["latency_us"]), row["latency_kind"] or None, _float(row["pct_of_roofline"]),
                      row["kept"] == "1", row["description"])
            self.trials.append(t)
            if t.kept:
                self.incumbent = t

    def _rng(self, index: int) -> random.Random:
        return random.Random(f"{self.seed}:{self.experiment}:{index}")

    def propose(self, index: int) -> Trial:
        if index == 0:
            return Trial(0, "start", dict(self.start.knobs), description="the file's schedule")
        rng = self._rng(index)
        if self.incumbent is None or index % 2 == 1:
            knobs = {name: rng.choice(knob_choices(name)) for name in KNOBS}
            return Trial(index, "explore", knobs, description="random point")
        knobs = dict(self.incumbent.knobs)
        name = rng.choice([n for n in KNOBS if len(knob_choices(n)) > 1])
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
            trial.kept = better(trial, self.incumbent)
            if trial.kept:
                self.incumbent = trial
            self._record(trial)
            self.trials.append(trial)
            yield trial

    def _evaluate(self, trial: Trial) -> None:
        sched = Schedule(f"{self.start.name}.trial{trial.index}", trial.knobs)
        try:
            result = self.evaluate(sched)
        except Exception as e:  # a crashing candidate is logged as failed, never kept
            trial.outcome, trial.description = "failed", f"{trial.description}: {type(e).__name__}: {e}"
            return
        v = result.verdict
        trial.outcome = result.outcome
        trial.latency_us, trial.latency_kind, trial.pct_of_roofline = v.latency_us, v.latency_kind, v.pct_of_roofline
        if result.outcome != "passed":
            trial.description += f": {result.message[:200]}"

    def _record(self, t: Trial) -> None:
        cells = [self.experiment, str(t.index), t.tag, f"{self.sf.model.id}/{self.sf.model.dtype}", self.sf.gpu,
                 t.outcome, _fmt(t.latency_us), t.latency_kind or "", _fmt(t.pct_of_roofline),
                 f"{Path(self.sf.path).name}::{self.start.name}.trial{t.index}", "1" if t.kept else "0",
                 json.dumps(t.knobs, sort_keys=True), t.description]
        append_line(self.log.results, "\t".join(c.replace("\t", " ").replace("\n", " ") for c in cells))
        if t.kept:
            append_line(self.log.corpus, json.dumps({
                "experiment": self.experiment, "trial": t.index, "model": self.sf.model.id,
                "dtype": self.sf.model.dtype, "gpu": self.sf.gpu, "latency_us": t.latency_us,
                "latency_kind": t.latency_kind, "knobs": t.knobs}, sort_keys=True))


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
