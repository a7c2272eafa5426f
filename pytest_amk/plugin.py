"""The pytest plugin (entry point ``amk = pytest_amk.plugin``): hooks only.

Options and ini keys, the collection hook, report status and summary. The work
lives in ``items.py`` (collector and items), ``outcomes.py`` (how outcomes are
reported) and the plain-Python pipeline; nothing heavy (torch) is imported here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_amk import outcomes, search_session
from pytest_amk.items import AMK_STATE, DEVICES, RESULT, AmkState, ScheduleFile, ScheduleFileError, ScheduleItem

if TYPE_CHECKING:
    from collections.abc import Generator


@pytest.hookimpl
def pytest_addoption(parser: pytest.Parser) -> None:
    from pytest_amk.pipeline import DEFAULT_STEPS  # plain Python, no torch

    group = parser.getgroup("amk", "pytest-amk (GPU megakernel schedules)")
    group.addoption("--amk-gpu", dest="amk_gpu", metavar="NAME", default=None,
                    help="GPU target for every schedule file, overriding [target].gpu "
                         "(h100, h200, a100, rtx5090, l4). ini: amk_gpu")
    group.addoption("--amk-device", dest="amk_device", choices=DEVICES, default=None,
                    help="where to run: auto (GPU stages when a CUDA device is usable), cpu (never), "
                         "cuda (required). Default auto. ini: amk_device")
    group.addoption("--amk-steps", dest="amk_steps", metavar="N", type=int, default=None,
                    help=f"decode steps (positions 0..N-1) checked against eager; default "
                         f"{DEFAULT_STEPS}. ini: amk_steps")
    parser.addini("amk_gpu", "GPU target overriding [target].gpu (like --amk-gpu)", default="")
    parser.addini("amk_device", "auto | cpu | cuda (like --amk-device)", default="auto")
    parser.addini("amk_steps", "decode steps checked against eager (like --amk-steps)", default="")
    parser.addini("amk_schedule_dirs", "directories (relative to rootdir) whose *.toml files are "
                  "collected as schedule files", type="linelist", default=["schedules"])
    search_session.add_options(parser)


@pytest.hookimpl
def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from pytest_amk import hookspec

    pluginmanager.add_hookspecs(hookspec)


def _state(config: pytest.Config) -> AmkState:
    from pytest_amk.pipeline import DEFAULT_STEPS

    gpu = config.getoption("amk_gpu") or config.getini("amk_gpu") or None
    device = config.getoption("amk_device") or config.getini("amk_device") or "auto"
    if device not in DEVICES:
        raise pytest.UsageError(f"amk_device = {device!r}: expected one of {', '.join(DEVICES)}")
    steps: Any = config.getoption("amk_steps")
    if steps is None:
        raw = str(config.getini("amk_steps")).strip()
        try:
            steps = int(raw) if raw else DEFAULT_STEPS
        except ValueError:
            raise pytest.UsageError(f"amk_steps = {raw!r}: expected an integer") from None
    if steps < 1:
        raise pytest.UsageError(f"--amk-steps/amk_steps = {steps}: must be at least 1")
    root = config.rootpath
    dirs = tuple((root / d).resolve() for d in config.getini("amk_schedule_dirs"))
    here = config.invocation_params.dir
    files = set()
    for arg in config.args:
        path = (here / str(arg).split("::")[0]).resolve()
        if path.is_file():
            files.add(path)
    # Items request pytest-benchmark's fixture, except under --benchmark-skip (which would
    # skip every item that requests it: the CPU stages must still run).
    bench = config.pluginmanager.hasplugin("benchmark") and not config.getoption("benchmark_skip", False)
    return AmkState(gpu=gpu, device=device, steps=steps, schedule_dirs=dirs, cli_files=frozenset(files),
                    benchmark_fixture=bench)


@pytest.hookimpl
def pytest_configure(config: pytest.Config) -> None:
    config.stash[AMK_STATE] = _state(config)
    if config.pluginmanager.hasplugin("xdist"):  # pin each worker to one GPU
        from pytest_amk import xdist_hooks

        config.pluginmanager.register(xdist_hooks, "amk-xdist")
    search_session.configure(config)  # registers the search plugin when --amk-search > 0
    from pytest_amk import benchmarking  # no torch

    # Before pytest-benchmark's (trylast) configure: storage per GPU model, the compare-fail gate.
    benchmarking.configure(config, config.stash[AMK_STATE])


@pytest.hookimpl
def pytest_report_header(config: pytest.Config) -> str | None:
    state = config.stash.get(AMK_STATE, None)
    if state is None:
        return None
    root = config.rootpath
    dirs = ", ".join(str(d.relative_to(root)) if d.is_relative_to(root) else str(d) for d in state.schedule_dirs)
    return (f"amk: gpu={state.gpu or '[target].gpu of each file'}, device={state.device}, "
            f"steps={state.steps}, schedule dirs: {dirs or '-'}")


@pytest.hookimpl
def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if file_path.suffix != ".toml":
        return None
    if not parent.config.stash[AMK_STATE].wants(file_path):
        return None
    return ScheduleFile.from_parent(parent, path=file_path)


def _phase_outcome(item: ScheduleItem | ScheduleFileError, call: pytest.CallInfo[None]) -> str | None:
    """The amk outcome this phase decides: any phase that raised, and every call phase."""
    if call.excinfo is not None and call.excinfo.errisinstance(pytest.skip.Exception):
        return outcomes.SKIPPED
    if call.when == "setup" and call.excinfo is not None:
        return outcomes.ERROR
    if call.when != "call":
        return None
    result = item.stash.get(RESULT, None)
    if result is not None:
        if call.excinfo is not None and result.outcome in (outcomes.PASSED, outcomes.XREJECTED):
            return outcomes.FAILED  # a pytest_amk_schedule_result hook raised
        return result.outcome
    return outcomes.FAILED if call.excinfo is not None else outcomes.PASSED


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Record the outcome as JUnit properties on the item before the report is built
    (the report copies them), and as attributes on the report (they travel from xdist
    workers to the controller)."""
    if not isinstance(item, ScheduleItem | ScheduleFileError):
        return (yield)
    outcome = _phase_outcome(item, call)
    result = item.stash.get(RESULT, None)
    if outcome is not None and not any(name == "amk_outcome" for name, _ in item.user_properties):
        verdict = result.verdict.to_json() if result is not None else None
        item.user_properties.extend(outcomes.junit_properties(outcome, item.schedule_id(), verdict))
    report = yield
    if outcome is not None:
        reason = str(call.excinfo.value) if call.excinfo is not None else ""
        outcomes.set_report_attributes(report, result if call.when == "call" else None, outcome, reason)
    bench = getattr(item, "funcargs", {}).get("benchmark")
    if bench is not None and getattr(bench, "stats", None) is None:
        bench.skipped = True  # not timed (no GPU stage): no "fixture was not used" warning
    return report


@pytest.hookimpl(tryfirst=True)
def pytest_report_teststatus(report: pytest.TestReport, config: pytest.Config) -> Any:
    return outcomes.teststatus(report)


@pytest.hookimpl
def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    outcomes.write_summary(terminalreporter, config)


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    """pytest-benchmark's machine info gets an "amk" entry, extended by pytest_amk_machine_info.
    The same when a baseline is loaded (configure) and when results are saved: nothing in it
    depends on what the run imported."""
    from pytest_amk import __version__, benchmarking

    state = config.stash[AMK_STATE]
    info: dict[str, Any] = {"version": __version__, "gpu_target": state.gpu, "device": state.device}
    info.update(benchmarking.machine_info(state.device))  # torch version; GPU name, SMs, driver, CUDA, clocks
    config.hook.pytest_amk_machine_info(config=config, info=info)
    machine_info["amk"] = info
