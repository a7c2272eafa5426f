"""Analytic cost model: a predicted latency for a program on its target, and its
calibration against measured latencies.

Each SM streams its tasks' weight bytes at its share of HBM bandwidth (a fraction
of the target's spec), each task pays a fixed dispatch overhead, each stage
boundary (counter) on the critical path pays one cross-SM synchronisation, and a
launch pays a fixed cost:

    predicted = max over SMs (bytes_sm / (bw * fraction / num_sms) + tasks_sm * overhead)
                + counters * sync + launch

The prediction is never below the roofline floor (weight plus KV bytes over the
spec bandwidth). The defaults are first guesses; ``calibrate`` fits the four
constants to measured latencies by least squares (the critical SM is re-chosen
until it is stable) and reports the mean absolute percentage error. A search
directory's ``calibration.json`` holds one calibration per GPU target; ``using``
makes a calibration the one ``predict_us`` uses (the pipeline calls it without one).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from pytest_amk.ir import BufferKind, GpuTarget, Program, Task

TASK_OVERHEAD_US = 0.4
STAGE_SYNC_US = 1.0
ACHIEVABLE_BW_FRACTION = 0.9
LAUNCH_US = 0.0
CALIBRATION_FILE = "calibration.json"
MIN_FRACTION = 0.05  # a fitted bandwidth fraction is kept within [MIN_FRACTION, 1]


@dataclass(frozen=True)
class Calibration:
    """The cost model's constants, and how well they fit the points they came from."""

    task_overhead_us: float = TASK_OVERHEAD_US
    stage_sync_us: float = STAGE_SYNC_US
    bw_fraction: float = ACHIEVABLE_BW_FRACTION
    launch_us: float = LAUNCH_US
    gpu: str = ""  # target the measurements were taken for ("" = any)
    points: int = 0  # measurements fitted (0: the defaults)
    mape: float | None = None  # mean abs % error of these constants over the points
    default_mape: float | None = None  # the defaults' error over the same points

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Calibration:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def describe(self) -> str:
        if not self.points:
            return "cost model: default constants"
        return (f"cost model calibrated on {self.points} measurements ({self.gpu or 'any gpu'}): "
                f"mean abs error {self.mape:.1f}% (defaults {self.default_mape:.1f}%); overhead "
                f"{self.task_overhead_us:.3f} us/task, sync {self.stage_sync_us:.3f} us/stage, "
                f"bandwidth {100 * self.bw_fraction:.0f}%, launch {self.launch_us:.2f} us")


DEFAULT = Calibration()
_ACTIVE: ContextVar[Calibration | None] = ContextVar("amk_cost_calibration", default=None)


@contextlib.contextmanager
def using(calibration: Calibration | None) -> Iterator[None]:
    """Within the block, ``predict_us`` without an explicit calibration uses this one."""
    token = _ACTIVE.set(calibration)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def floor_us(program: Program, bandwidth_gbps: float, seq_len: int = 1) -> float:
    """Roofline floor: weight bytes plus the KV bytes read at ``seq_len``, over bandwidth."""
    kv = 0
    max_seq = int(program.meta.get("max_seq", 1))
    for b in program.buffers:
        if b.kind is BufferKind.KV:
            kv += b.nbytes * min(seq_len, max_seq) // max_seq
    return (program.weight_bytes() + kv) / (bandwidth_gbps * 1e3)


@dataclass(frozen=True)
class Features:
    """What the model reads from a program: per SM, the microseconds its weight bytes take
    at the full spec bandwidth share and its task count; the counters; the floor."""

    stream_us: tuple[float, ...]
    tasks: tuple[int, ...]
    counters: int
    floor_us: float

    def terms(self, cal: Calibration) -> tuple[int, float]:
        """The critical SM and the model's latency before the floor."""
        loads = [s / cal.bw_fraction + n * cal.task_overhead_us for s, n in zip(self.stream_us, self.tasks,
                                                                              strict=True)]
        sm = max(range(len(loads)), key=loads.__getitem__) if loads else 0
        top = loads[sm] if loads else 0.0
        return sm, top + cal.stage_sync_us * self.counters + cal.launch_us


def features(program: Program, target: GpuTarget, seq_len: int = 1) -> Features:
    sizes = {b.id: b.dtype.nbytes for b in program.buffers}
    weights = {b.id for b in program.buffers if b.kind is BufferKind.WEIGHT}
    per_sm_bw = target.hbm_gbps * 1e3 / program.num_sms  # bytes/us at the full spec bandwidth
    stream = [0.0] * program.num_sms
    tasks = [0] * program.num_sms
    for t in program.tasks:
        stream[t.sm] += _weight_bytes(t, sizes, weights) / per_sm_bw
        tasks[t.sm] += 1
    return Features(tuple(stream), tuple(tasks), len(program.counters), floor_us(program, target.hbm_gbps, seq_len))


def _weight_bytes(task: Task, sizes: dict[int, int], weights: set[int]) -> int:
    """Weight bytes a task streams. Weights are the traffic that matters (activations are
    tiny and mostly in L2). EMBED gathers one row: its declared read covers the table
    rows of every token (the token is a runtime input), but it loads only [lo, hi) of one."""
    if task.op == "EMBED":
        return (task.params["hi"] - task.params["lo"]) * sizes[task.params["table"]]
    # RoPE ops declare the whole table (pos is a runtime input) but read one position's row.
    rope = task.params.get("rope", -1) if task.op in ("ROPE_APPEND", "ROPE_ATTN_PARTIAL") else -1
    return sum((r.hi - r.lo) * sizes[r.buffer] if r.buffer != rope else task.params["head_dim"] * sizes[r.buffer]
               for r in task.reads if r.buffer in weights)


def predict_from(f: Features, cal: Calibration) -> float:
    return max(f.terms(cal)[1], f.floor_us)


def predict_us(program: Program, target: GpuTarget, seq_len: int = 1, calibration: Calibration | None = None) -> float:
    """Predicted latency of one decode step; never below the roofline floor. Uses
    ``calibration``, else the one set by ``using``, else the defaults."""
    cal = calibration or _ACTIVE.get() or DEFAULT
    return predict_from(features(program, target, seq_len), cal)


# -- calibration ------------------------------------------------------------------------

Point = tuple[Program, float]


def _mape(feats: list[Features], measured: list[float], cal: Calibration) -> float:
    errs = [abs(predict_from(f, cal) - m) / m for f, m in zip(feats, measured, strict=True)]
    return 100.0 * sum(errs) / len(errs)


def program_of_row(row: Mapping[str, Any]) -> Program:
    """Lower the schedule a corpus row describes (model, dtype, gpu, max_seq, knobs)."""
    from pytest_amk.ir import get_target
    from pytest_amk.lower import lower
    from pytest_amk.models import config_for

    return lower(config_for(str(row["model"])), get_target(str(row["gpu"])), dict(row["knobs"]),
                 str(row.get("dtype", "bf16")), int(row.get("max_seq", 512)))


def calibrate(points: Iterable[Point | Mapping[str, Any]], target: GpuTarget | None = None,
              iterations: int = 30) -> Calibration:
    """Fit the constants to measured latencies. Each point is a ``(program, measured_us)``
    pair or a corpus row (``model, dtype, gpu, max_seq, knobs, latency_us``; rows whose
    ``latency_kind`` is not ``measured-gpu`` are ignored). Programs are read on ``target``
    (default: the one in each program's meta). Raises ValueError without usable points."""
    from pytest_amk.ir import get_target

    feats: list[Features] = []
    measured: list[float] = []
    gpus: set[str] = set()
    for point in points:
        if isinstance(point, Mapping):
            if point.get("latency_kind") != "measured-gpu" or not point.get("latency_us"):
                continue
            program, lat = program_of_row(point), float(point["latency_us"])
        else:
            program, lat = point
        if not lat > 0:
            continue
        tgt = target or get_target(str(program.meta.get("target", "h100")))
        gpus.add(tgt.name)
        feats.append(features(program, tgt))
        measured.append(float(lat))
    if not feats:
        raise ValueError("no measured latencies to calibrate against")
    cal = _fit(feats, measured, iterations)
    return Calibration(cal.task_overhead_us, cal.stage_sync_us, cal.bw_fraction, cal.launch_us,
                       gpu=gpus.pop() if len(gpus) == 1 else "", points=len(feats),
                       mape=_mape(feats, measured, cal), default_mape=_mape(feats, measured, DEFAULT))


def _fit(feats: list[Features], measured: list[float], iterations: int) -> Calibration:
    """Least squares on relative errors: for each point, the row [stream_us, tasks,
    counters, 1] of its critical SM (re-chosen until stable) over its measurement, with the
    unknowns [1/fraction, overhead, sync, launch]. An unknown that leaves its range (a
    fraction above 1 or below MIN_FRACTION, a negative cost) is pinned to the bound and the
    rest refitted; columns the data cannot separate keep their defaults. Points at their
    floor carry no information about the constants and are left out."""
    import numpy as np

    defaults = [1.0 / DEFAULT.bw_fraction, DEFAULT.task_overhead_us, DEFAULT.stage_sync_us, DEFAULT.launch_us]
    lower = [1.0, 0.0, 0.0, 0.0]
    upper = [1.0 / MIN_FRACTION, np.inf, np.inf, np.inf]
    best, best_err = DEFAULT, _mape(feats, measured, DEFAULT)
    cal = DEFAULT
    for _ in range(iterations):
        rows, ys = [], []
        for f, m in zip(feats, measured, strict=True):
            if m <= f.floor_us * (1 + 1e-9):
                continue
            sm, _ = f.terms(cal)
            rows.append([f.stream_us[sm] / m, f.tasks[sm] / m, f.counters / m, 1.0 / m])
            ys.append(1.0)
        if not rows:
            break
        a, y = np.asarray(rows, dtype=float), np.asarray(ys, dtype=float)
        scale = np.maximum(np.abs(a).max(axis=0), 1e-300)
        pinned: dict[int, float] = {}
        for j in range(3, 0, -1):  # launch, then sync, then overhead: keep the defaults of what cannot be told apart
            free = [i for i in range(4) if i not in pinned]
            if np.linalg.matrix_rank(a[:, free] / scale[free]) < len(free):
                pinned[j] = defaults[j]
        theta = list(defaults)
        for _ in range(5):
            free = [i for i in range(4) if i not in pinned]
            rest = y - (a[:, list(pinned)] @ np.asarray(list(pinned.values())) if pinned else 0.0)
            sol, *_ = np.linalg.lstsq(a[:, free] / scale[free], rest, rcond=None)
            theta = [pinned.get(i, 0.0) for i in range(4)]
            for i, v in zip(free, sol / scale[free], strict=True):
                theta[i] = float(v)
            out = [i for i in free if not lower[i] <= theta[i] <= upper[i]]
            if not out:
                break
            worst = max(out, key=lambda i: max(lower[i] - theta[i], theta[i] - upper[i]))
            pinned[worst] = min(max(theta[worst], lower[worst]), upper[worst])
        theta = [min(max(v, lower[i]), upper[i]) for i, v in enumerate(theta)]
        new = Calibration(theta[1], theta[2], 1.0 / theta[0], theta[3])
        err = _mape(feats, measured, new)
        if err < best_err:
            best, best_err = new, err
        if new == cal:
            break
        cal = new
    return best


# -- calibration files -------------------------------------------------------------------

def load_calibration(directory: str | Path, gpu: str) -> Calibration | None:
    """The calibration for ``gpu`` (else the one for "any") in ``directory/calibration.json``."""
    path = Path(directory) / CALIBRATION_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    entry = (data.get(gpu) or data.get("any")) if isinstance(data, dict) else None
    return Calibration.from_json(entry) if isinstance(entry, dict) else None


def save_calibration(directory: str | Path, cal: Calibration) -> Path:
    """Store ``cal`` under its gpu in ``directory/calibration.json`` (atomic replace, under a lock)."""
    import fcntl

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CALIBRATION_FILE
    fd = os.open(directory / (CALIBRATION_FILE + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        data[cal.gpu or "any"] = cal.to_json()
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        os.close(fd)
    return path
