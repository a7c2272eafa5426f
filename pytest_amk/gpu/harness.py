"""The GPU stages of a schedule (called by pytest_amk.pipeline): check against the
reference VM's logits, and time. One runner (weights on the GPU) is kept for the
last program so that checking and timing it upload the weights once."""

from __future__ import annotations

import functools
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
    median_us: float
    floor_us: float
    device_name: str
    bandwidth_gbps: float
    samples_us: list[float]


def runner_for(program: ir.Program, sf: Any) -> GpuRunner:
    """A runner with the schedule's eager-model weights bound (cached for the last program)."""
    key = program.digest()
    if _LAST.get("key") == key:
        return _LAST["runner"]
    _LAST.clear()
    from pytest_amk import refvm
    from pytest_amk.pipeline import eager_model

    m = sf.model
    model = eager_model(m.id, m.dtype, m.seed, m.max_seq)
    bufs = refvm.alloc_buffers(program, refvm.bind_weights(program, model), f"cuda:{device_info().index}")
    # The pipeline has proven the program already; the runner still checks memory safety.
    runner = GpuRunner(program, bufs, validate=False)
    _LAST.update(key=key, runner=runner)
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


@functools.lru_cache(maxsize=1)
def measure_bandwidth_gbps(nbytes: int = 1 << 30, iters: int = 10) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), median of ``iters``."""
    import statistics

    import torch

    dev = f"cuda:{device_info().index}"
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=dev).fill_(1)
    dst = torch.empty_like(src)
    times = []
    for i in range(iters + 2):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dst.copy_(src)
        e.record()
        e.synchronize()
        if i >= 2:
            times.append(s.elapsed_time(e) / 1e3)
    return 2 * src.numel() / statistics.median(times) / 1e9


def time_program(program: ir.Program, sf: Any, pos: int = 0, iters: int = 20) -> GpuTiming:
    """Median latency of one decode step (L2 flushed between launches) and the measured floor."""
    from pytest_amk.cost import floor_us

    runner = runner_for(program, sf)
    t = runner.time_step(1, pos, iters=iters)
    bw = measure_bandwidth_gbps()
    return GpuTiming(t.median_us, floor_us(program, bw, pos + 1), t.device_name, bw, t.samples_us)
