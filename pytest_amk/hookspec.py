"""Hooks that pytest-amk calls (registered by ``pytest_addhooks`` in plugin.py).

Implement them in a ``conftest.py`` or a plugin, like any pytest hook. Each
docstring has an example to copy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import pytest

    from pytest_amk.pipeline import ItemResult
    from pytest_amk.schedule import Schedule, ScheduleFile

hookspec = pluggy.HookspecMarker("pytest")


@hookspec(firstresult=True)
def pytest_amk_modify_schedule(config: pytest.Config, schedule_file: ScheduleFile,
                               schedule: Schedule) -> Schedule | None:
    """Called for each schedule item just before lowering, in the process that runs it
    (an xdist worker under ``-n``). Return a replacement ``Schedule`` to change what is
    lowered, or None to keep it (the first non-None result wins). To veto the schedule,
    raise ``pytest_amk.pipeline.Rejected(reason)``: the item is then REJECTED (or passes
    as expected REJECTED when its file says ``expect.outcome = "rejected"``). Calling
    ``pytest.skip(reason)`` skips the item.

    Example (``conftest.py``)::

        import dataclasses

        import pytest
        from pytest_amk.pipeline import Rejected

        @pytest.hookimpl
        def pytest_amk_modify_schedule(config, schedule_file, schedule):
            if schedule.knobs["threads_per_block"] > 512 and schedule_file.gpu == "l4":
                raise Rejected("this lab keeps L4 runs at 512 threads or fewer")
            if config.getoption("--amk-gpu") == "a100":
                return dataclasses.replace(schedule, knobs={**schedule.knobs, "pipelining_depth": 4})
            return None
    """


@hookspec
def pytest_amk_schedule_result(item: pytest.Item, result: ItemResult) -> None:
    """Called after each schedule item ran its stages, before its outcome is reported.
    ``result.outcome`` is one of ``pytest_amk.pipeline.PASS/FAIL/REJECTED/XREJECTED``;
    ``result.verdict.to_json()`` is the verdict (DESIGN §4); ``result.stages`` the stage
    reports. Use it to log results; raising fails the item.

    Example (``conftest.py``)::

        import json

        import pytest

        @pytest.hookimpl
        def pytest_amk_schedule_result(item, result):
            with open("verdicts.jsonl", "a") as f:
                f.write(json.dumps({"id": item.nodeid, "outcome": result.outcome,
                                    **result.verdict.to_json()}) + "\\n")
    """


@hookspec
def pytest_amk_machine_info(config: pytest.Config, info: dict[str, Any]) -> None:
    """Add to the machine information pytest-amk records: the dict that pytest-benchmark
    saves under ``machine_info["amk"]`` (``--benchmark-save``/``--benchmark-json``).
    pytest-amk fills in its version, target GPU, device mode, torch version and (unless
    ``--amk-device=cpu``) ``info["gpu"]``: name, SM count, compute capability, memory, L2,
    clocks, driver, CUDA driver API and nvcc versions, first.
    Change ``info`` in place; return nothing.

    Example (``conftest.py``)::

        import os

        import pytest

        @pytest.hookimpl
        def pytest_amk_machine_info(config, info):
            info["runner"] = os.environ.get("RUNNER_NAME", "local")
            info["gpu_clock_policy"] = "locked"
    """


@hookspec(firstresult=True)
def pytest_amk_gpu_timing(item: pytest.Item, result: ItemResult) -> list[float] | None:
    """Test only: kernel durations in microseconds to feed pytest-benchmark for a schedule
    item that passed, instead of its GPU timing (the first non-None result wins). They are
    saved with ``extra_info["latency_kind"] = "injected"`` and never change the verdict, so
    the benchmark plumbing (saving, ``--benchmark-compare``, ``--benchmark-compare-fail``)
    can be tested end to end on a machine without a GPU. Return None to keep the real timing
    (or none, without a GPU).

    Example (``conftest.py`` of a test)::

        import pytest

        @pytest.hookimpl
        def pytest_amk_gpu_timing(item, result):
            return [100.0, 101.0, 99.5] if item.name == "default" else None
    """
