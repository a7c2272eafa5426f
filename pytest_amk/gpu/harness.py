"""The GPU stages of a schedule (called by pytest_amk.pipeline): check against the
reference VM's logits, and time. One runner (weights on the GPU) is kept for the
last program so that checking and timing it upload the weights once; a next program
with the same buffers (its sync skeleton, its work alone) shares those tensors."""

from __future__ import annotations

import hashlib
import math
import os
import statistics
from dataclasses import dataclass
from typing import Any

from pytest_amk import ir
from pytest_amk.gpu.runtime import GpuRunner, device_info

_LAST: dict[str, Any] = {}


@dataclass
class GpuCheck:
    ok: bool
    message: str
    max_abs_err: float


@dataclass
class GpuTiming:
    """One decode step's kernel timing: CUDA events around the launch alone, after warm-up,
    L2 flushed before each launch; floors from the bandwidth measured now and from the spec."""

    median_us: float
    floor_us: float  # weight + KV bytes over the bandwidth measured on this device in this run
    device_name: str
    bandwidth_gbps: float  # measured now (the better of read and copy)
    samples_us: list[float]
    spec_floor_us: float = math.nan  # the same bytes over the target's spec bandwidth
    spec_gbps: float = math.nan
    pos: int = 0
    warmup: int = 0
    rounds: int = 0
    flushed_l2: bool = True
    slowdown_us: float = 0.0  # AMK_TEST_SLOWDOWN_US (test only): a spin inside the timed region
    sm_count: int = 0

    @property
    def pct_of_roofline(self) -> float:
        return 100.0 * self.floor_us / self.median_us

    @property
    def pct_of_spec(self) -> float:
        return 100.0 * self.spec_floor_us / self.median_us


def buffers_key(program: ir.Program, model: Any) -> str:
    """What the bound tensors depend on: the model and the program's buffer list. Programs with
    the same key (a program and its sync skeleton, or schedules that only move tasks) can share
    one set of tensors on the GPU."""
    layout = [(b.id, b.name, b.kind.value, b.dtype.value, tuple(b.shape)) for b in program.buffers]
    text = repr((model.id, model.dtype, model.seed, model.max_seq, layout))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def runner_for(program: ir.Program, sf: Any) -> GpuRunner:
    """A runner with the schedule's eager-model weights bound (cached for the last program). A
    program with the same buffers as the last one reuses its tensors instead of uploading the
    weights again (every check runs its positions from 0, so no state carries over)."""
    key = program.digest()
    if _LAST.get("key") == key:
        return _LAST["runner"]
    m = sf.model
    bkey = buffers_key(program, m)
    bufs = _LAST.get("bufs") if _LAST.get("bkey") == bkey else None
    _LAST.clear()  # drop the old runner (and tensors, unless reused) before binding new ones
    if bufs is None:
        from pytest_amk import refvm
        from pytest_amk.pipeline import eager_model

        model = eager_model(m.id, m.dtype, m.seed, m.max_seq)
        bufs = refvm.alloc_buffers(program, refvm.bind_weights(program, model), f"cuda:{device_info().index}")
    # The pipeline has proven the program already; the runner still checks memory safety.
    runner = GpuRunner(program, bufs, validate=False)
    _LAST.update(key=key, runner=runner, bkey=bkey, bufs=bufs)
    return runner


def check_against_reference(program: ir.Program, sf: Any, ref_logits: list[Any], steps: int) -> GpuCheck:
    """Run positions 0..len(ref_logits)-1 on the GPU (same tokens as the reference run)."""
    from pytest_amk.oracle import compare_logits
    from pytest_amk.pipeline import eager_trace

    m = sf.model
    tokens, _ = eager_trace(m.id, m.dtype, m.seed, m.max_seq, min(steps, m.max_seq))
    runner = runner_for(program, sf)
    worst = GpuCheck(True, "no positions run", 0.0)
    for pos, token in enumerate(tokens[: len(ref_logits)]):
        got = runner.run_step(token, pos).cpu()
        cmp = compare_logits(got, ref_logits[pos], m.dtype, f"GPU vs reference VM, position {pos}")
        nt = runner.next_token()
        if nt is not None and nt != int(got.argmax()):
            return GpuCheck(False, f"position {pos}: GPU next_token {nt} != argmax of GPU logits "
                                   f"{int(got.argmax())}", cmp.max_abs_err)
        if not cmp.ok:
            return GpuCheck(False, cmp.message, cmp.max_abs_err)
        if cmp.max_abs_err >= worst.max_abs_err:
            worst = GpuCheck(True, cmp.message, cmp.max_abs_err)
    return worst


DEFAULT_WARMUP = 10
DEFAULT_ROUNDS = 100
SLOWDOWN_ENV = "AMK_TEST_SLOWDOWN_US"
_MIN_ROUNDS = [0]  # raised by --benchmark-min-rounds (pytest_amk.benchmarking)


def set_min_rounds(rounds: int) -> None:
    """Time at least this many launches (pytest's --benchmark-min-rounds, when above the default)."""
    _MIN_ROUNDS[0] = max(0, int(rounds))


def slowdown_us() -> float:
    """$AMK_TEST_SLOWDOWN_US: microseconds of GPU spin added inside every timed region.
    Test only (it proves that ``--benchmark-compare-fail`` catches a slower kernel); 0 unless
    the variable is set."""
    raw = os.environ.get(SLOWDOWN_ENV, "").strip()
    if not raw:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{SLOWDOWN_ENV}={raw!r}: expected microseconds (a number)") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{SLOWDOWN_ENV}={raw!r}: expected a non-negative number of microseconds")
    return value


def measure_bandwidth_gbps() -> float:
    """Achievable HBM bandwidth measured on this device in this run (GB/s): the better of the
    read and the copy probe of ``pytest_amk.bench.bandwidth_probe`` (cached per device)."""
    from pytest_amk.bench import bandwidth_probe

    bw = bandwidth_probe()
    return max(bw["read_gbps"], bw["copy_gbps"])


def _spin(us: float) -> Any:
    """A callable that keeps the GPU busy for at least ``us`` microseconds (on the current stream)."""
    import pycuda.driver as drv
    import torch

    if not hasattr(torch.cuda, "_sleep"):
        raise RuntimeError(f"{SLOWDOWN_ENV} needs torch.cuda._sleep, which this torch lacks")
    khz = drv.Device(device_info().index).get_attribute(drv.device_attribute.CLOCK_RATE)
    cycles = max(1, int(us * khz / 1000))  # at the top clock: the spin lasts at least `us`
    return lambda: torch.cuda._sleep(cycles)


def time_launches(runner: GpuRunner, token: int, pos: int, *, warmup: int, rounds: int,
                  flush_l2: bool = True, slowdown: float = 0.0) -> list[float]:
    """CUDA-event durations (us) of ``rounds`` launches after ``warmup``: the events enclose the
    kernel launch alone; counters are reset and (with ``flush_l2``) a buffer twice the L2 size
    is overwritten before each launch, outside the timed region. ``slowdown`` (test only) adds
    a GPU spin of that many microseconds inside the timed region. Like ``GpuRunner.time_step``
    (which this replaces for the pipeline), under the host-wide timing lock of the GPU."""
    import torch

    from pytest_amk.bench import L2Flusher
    from pytest_amk.devices import exclusive_gpu

    runner.run_step(token, pos)  # faults surface here, before any timing
    flush = L2Flusher() if flush_l2 else None
    spin = _spin(slowdown) if slowdown > 0 else None
    events = []
    with exclusive_gpu():  # never timed while another xdist worker's timed region shares this GPU
        for _ in range(warmup + rounds):
            if flush is not None:
                flush()
            runner._reset()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            if spin is not None:
                spin()
            runner._launch_raw()
            end.record()
            events.append((start, end))
        runner.check()  # synchronises; a fault or watchdog during timing raises
    return [1000.0 * s.elapsed_time(e) for s, e in events[warmup:]]


def time_program(program: ir.Program, sf: Any, pos: int = 0, *, rounds: int | None = None,
                 warmup: int | None = None, iters: int | None = None) -> GpuTiming:
    """Median latency of one decode step at position ``pos`` (correctness is checked by the
    caller first), the floor at the bandwidth measured now and the floor at the target's spec.
    ``iters`` is the old name of ``rounds``."""
    from pytest_amk.cost import floor_us

    rounds = max(rounds or iters or DEFAULT_ROUNDS, _MIN_ROUNDS[0])
    warmup = DEFAULT_WARMUP if warmup is None else warmup
    slow = slowdown_us()
    runner = runner_for(program, sf)
    samples = time_launches(runner, 1, pos, warmup=warmup, rounds=rounds, slowdown=slow)
    from pytest_amk.devices import exclusive_gpu

    with exclusive_gpu():  # measured once per process, alone on the GPU like the timings
        bw = measure_bandwidth_gbps()
    target = ir.get_target(sf.gpu)
    return GpuTiming(
        median_us=statistics.median(samples), floor_us=floor_us(program, bw, pos + 1),
        device_name=runner.dev.name, bandwidth_gbps=bw, samples_us=samples,
        spec_floor_us=floor_us(program, target.hbm_gbps, pos + 1), spec_gbps=target.hbm_gbps, pos=pos,
        warmup=warmup, rounds=rounds, flushed_l2=True, slowdown_us=slow, sm_count=runner.dev.sm_count)
