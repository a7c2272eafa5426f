"""One keep/revert loop, its trials evaluated on several devices (``Search.iterate_parallel``).

One evaluator process per device, started with the ``spawn`` method (no CUDA state is
inherited) and pinned in its initializer: ``CUDA_VISIBLE_DEVICES`` narrows to its one
device before the evaluator is even unpickled, so nothing in the worker imports torch
or touches CUDA first. The parent proposes the trials, applies the keep rule in
trial-index order and is the only writer of ``results.tsv`` / ``corpus.jsonl``.

On a machine with GPUs the worker count is capped at the GPUs visible (one evaluator per
GPU, so no two trials are ever timed on one card at once; ``devices.exclusive_gpu`` still
guards each timed region against other processes). Without GPUs the workers are CPU
processes and pinning is a no-op, so CI runs the same code.

Nothing here imports torch; this module must stay importable before pinning.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
from collections.abc import Callable, MutableMapping
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from pytest_amk import devices
from pytest_amk.schedule import Schedule, ScheduleFile

_EVALUATE: Callable[[Schedule], Any] | None = None  # the worker process's evaluator


def plan_workers(n: int, visible: list[str]) -> list[str | None]:
    """The device of each evaluator for ``n`` requested workers: one per visible GPU, at
    most as many as there are GPUs; ``n`` CPU workers (None) when there is none."""
    n = max(1, n)
    if not visible:
        return [None] * n
    return list(visible[: min(n, len(visible))])


def pin(device: str | None, env: MutableMapping[str, str]) -> None:
    """Narrow ``env`` to one device (before CUDA is initialised); None leaves it alone."""
    if device is not None:
        env[devices.ENV] = device
        env[devices.PINNED_ENV] = device


def _init_worker(queue: Any, factory: bytes) -> None:
    global _EVALUATE
    pin(queue.get(), os.environ)  # each worker takes one device, before unpickling the evaluator
    _EVALUATE = pickle.loads(factory)()


def _evaluate(sched: Schedule) -> dict[str, Any]:
    from pytest_amk.search import evaluation

    assert _EVALUATE is not None, "evaluator worker not initialised"
    return evaluation(_EVALUATE, sched)


class EvaluatorPool:
    """One spawned process per entry of ``workers`` (its device, None = CPU), each with the
    evaluator that ``evaluate_factory()`` builds there; ``submit(schedule)`` -> a Future of
    ``search.evaluation``'s dict."""

    def __init__(self, workers: list[str | None], evaluate_factory: Callable[[], Any]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._queue = ctx.Queue()
        for device in workers:
            self._queue.put(device)
        self._executor = ProcessPoolExecutor(max_workers=len(workers), mp_context=ctx, initializer=_init_worker,
                                             initargs=(self._queue, pickle.dumps(evaluate_factory)))

    def submit(self, sched: Schedule) -> Future[dict[str, Any]]:
        return self._executor.submit(_evaluate, sched)

    def __enter__(self) -> EvaluatorPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._queue.close()


@dataclass(frozen=True)
class LoopEvaluatorFactory:
    """What ``run_loop`` hands its workers: run every stage of a trial on the worker's
    (pinned) device, with the loop's cost-model calibration."""

    sf: ScheduleFile
    device: str
    steps: int
    calibration: Any = None  # cost.Calibration | None

    def __call__(self) -> Callable[[Schedule], Any]:
        from pytest_amk import cost, pipeline

        def evaluate(sched: Schedule) -> Any:
            with cost.using(self.calibration):
                return pipeline.run_schedule(self.sf, sched, self.device, self.steps)

        return evaluate
