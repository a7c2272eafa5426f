"""The collector and items: a schedule TOML file is a ``ScheduleFile``; each of its
``[[schedule]]`` tables is a ``ScheduleItem`` with the id ``<file>::<name>``.

``ScheduleItem`` is a ``pytest.Function`` built with ``callobj=``, so fixtures work
as for any test: its signature names ``benchmark`` when pytest-benchmark is active
(so ``--benchmark-only`` keeps these items and the timing stage can feed it). The
work itself is ``pytest_amk.pipeline.run_schedule``; nothing heavy is imported until
an item runs.

A malformed file yields ``ScheduleFileError`` items instead of raising in
``collect()`` (a collection error would stop the whole run): they error at setup
with ``file: key: reason`` while other files run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_amk import outcomes

if TYPE_CHECKING:
    from collections.abc import Iterator

    from _pytest._code.code import ExceptionInfo, TerminalRepr

    from pytest_amk.pipeline import ItemResult
    from pytest_amk.schedule import Schedule, ScheduleError
    from pytest_amk.schedule import ScheduleFile as ParsedFile

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class AmkState:
    """The session's settings (config.stash[AMK_STATE]), from options and ini keys."""

    gpu: str | None  # --amk-gpu / amk_gpu: overrides [target].gpu
    device: str  # auto | cpu | cuda
    steps: int  # decode steps checked against eager
    schedule_dirs: tuple[Path, ...]  # amk_schedule_dirs, resolved against rootdir
    cli_files: frozenset[Path]  # files named on the command line, resolved
    benchmark_fixture: bool  # pytest-benchmark is active: items request `benchmark`
    cuda_error: str | None = None  # --amk-device=cuda but no GPU (checked once)
    cuda_checked: bool = False

    def wants(self, path: Path) -> bool:
        """Collect this file? A *.toml named on the command line or under a schedule dir;
        never pyproject.toml."""
        if path.suffix != ".toml" or path.name == "pyproject.toml":
            return False
        resolved = path.resolve()
        if resolved in self.cli_files:
            return True
        return any(resolved.is_relative_to(d) for d in self.schedule_dirs)


AMK_STATE = pytest.StashKey[AmkState]()
SCHEDULE = pytest.StashKey["tuple[ParsedFile, Schedule]"]()
RESULT = pytest.StashKey["ItemResult"]()
ERROR_NAME = "malformed"  # item name for a file that could not be parsed at all


class ScheduleFile(pytest.File):
    """A schedule TOML file: one item per [[schedule]] table."""

    def collect(self) -> Iterator[pytest.Item]:
        from pytest_amk.schedule import ScheduleError, parse_file

        state = self.config.stash[AMK_STATE]
        try:
            parsed = parse_file(self.path, state.gpu)
        except ScheduleError as e:
            yield from self._error_items(e, state)
            return
        for sched in parsed.schedules:
            yield ScheduleItem.from_parent(self, name=sched.name, schedule_file=parsed, schedule=sched)

    def _error_items(self, error: ScheduleError, state: AmkState) -> Iterator[pytest.Item]:
        from pytest_amk.schedule import ScheduleError, parse_file

        where = self.nodeid
        message = f"{where}: {error.key}: {error.reason}" if error.key else f"{where}: {error.reason}"
        names = [ERROR_NAME]
        if state.gpu is not None and error.key == "--amk-gpu":
            # The file itself is fine: each of its schedules errors, naming the option.
            try:
                names = [s.name for s in parse_file(self.path).schedules]
            except ScheduleError:
                pass
        for name in names:
            yield ScheduleFileError.from_parent(self, name=name, message=message)


def _schedule_benchmark(benchmark: Any) -> None:
    """A schedule item (see pytest_amk.items.ScheduleItem.runtest); requests `benchmark`."""


def _schedule() -> None:
    """A schedule item (see pytest_amk.items.ScheduleItem.runtest)."""


class ScheduleItem(pytest.Function):
    """One [[schedule]] of a file: lower, prove, check against eager, GPU, time."""

    @classmethod
    def from_parent(cls, parent: pytest.Collector, *, name: str,  # type: ignore[override]
                    schedule_file: ParsedFile, schedule: Schedule, **kw: Any) -> ScheduleItem:
        state = parent.config.stash[AMK_STATE]
        callobj = _schedule_benchmark if state.benchmark_fixture else _schedule
        item: ScheduleItem = super().from_parent(parent, name=name, callobj=callobj, **kw)
        item.stash[SCHEDULE] = (schedule_file, schedule)
        if state.benchmark_fixture:
            from pytest_amk import benchmarking

            benchmarking.prepare_item(item)  # the timer that feeds CUDA-event durations to the fixture
        return item

    @property
    def schedule_file(self) -> ParsedFile:
        return self.stash[SCHEDULE][0]

    @property
    def schedule(self) -> Schedule:
        return self.stash[SCHEDULE][1]

    @property
    def result(self) -> ItemResult | None:
        """The pipeline's result once the item ran."""
        return self.stash.get(RESULT, None)

    def schedule_id(self) -> str:
        return f"{self.path.name}::{self.name}"

    def setup(self) -> None:
        state = self.config.stash[AMK_STATE]
        if state.device == "cuda" and not state.cuda_checked:
            from pytest_amk.pipeline import gpu_status

            state.cuda_checked = True
            try:
                gpu_status("cuda")
            except RuntimeError as e:
                state.cuda_error = str(e)
        if state.cuda_error:
            pytest.fail(state.cuda_error, pytrace=False)
        super().setup()  # fixtures (benchmark) after the checks

    def runtest(self) -> None:
        from pytest_amk import pipeline

        state = self.config.stash[AMK_STATE]
        sf, sched = self.schedule_file, self.schedule
        try:
            replaced = self.ihook.pytest_amk_modify_schedule(config=self.config, schedule_file=sf,
                                                             schedule=sched)
        except pipeline.Rejected as e:
            result = _vetoed(sf, sched, str(e))
        else:
            result = pipeline.run_schedule(sf, replaced or sched, state.device, state.steps)
        self.stash[RESULT] = result
        self.ihook.pytest_amk_schedule_result(item=self, result=result)
        from pytest_amk import benchmarking

        regression = benchmarking.record(self, result)  # feeds pytest-benchmark; compares with the baseline
        if result.outcome == pipeline.REJECTED:
            raise outcomes.ScheduleRejected(result)
        if result.outcome == pipeline.FAIL:
            raise outcomes.ScheduleFailed(result)
        if regression:
            pytest.fail(regression, pytrace=False)

    def repr_failure(self, excinfo: ExceptionInfo[BaseException],  # type: ignore[override]
                     style: Any = None) -> str | TerminalRepr:
        return outcomes.repr_for(excinfo.value) or super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Path, int, str]:
        # Line 0, never None. The domain must not be a suffix of the node id: pytest's
        # verbose line would turn its dots into "::" ("toy::toml::default").
        return self.path, 0, f"schedule {self.schedule_id()}"


def _vetoed(sf: ParsedFile, sched: Schedule, reason: str) -> ItemResult:
    """A schedule vetoed by pytest_amk_modify_schedule: REJECTED, or expected REJECTED."""
    from pytest_amk import pipeline

    v = pipeline.Verdict(schedule_id=pipeline.schedule_id(sf, sched), gpu=sf.gpu,
                         model=f"{sf.model.id}/{sf.model.dtype}", rejected_reason=reason)
    stages = [pipeline.StageReport("pytest_amk_modify_schedule", "rejected", reason)]
    return pipeline._finish(sched, v, stages, pipeline.REJECTED, reason)


class ScheduleFileError(pytest.Item):
    """Stands for the items of a malformed file: errors at setup with file, key, reason."""

    def __init__(self, *, message: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.message = message

    def setup(self) -> None:
        pytest.fail(self.message, pytrace=False)

    def runtest(self) -> None:  # never reached: setup fails
        pytest.fail(self.message, pytrace=False)

    def schedule_id(self) -> str:
        return f"{self.path.name}::{self.name}"

    def reportinfo(self) -> tuple[Path, int, str]:
        return self.path, 0, f"schedule file {self.path.name}"
