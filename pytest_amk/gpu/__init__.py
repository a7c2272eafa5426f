"""The GPU side: build the CUDA VM (vm/), load it with PyCUDA in torch's primary
context, launch programs, watchdog errors, timing (DESIGN §7).

Importing this package imports neither torch nor PyCUDA; the names below are
resolved on first use.

    ok, reason = gpu.available()
    runner = gpu.GpuRunner(program, tensors)        # tensors: buffer id -> CUDA tensor
    logits = runner.run_step(token, pos)            # raises GpuFault / WatchdogTimeout
    timing = runner.time_step(token, pos)           # CUDA events, median, L2 flushed
"""

from __future__ import annotations

import importlib
from typing import Any

from pytest_amk.gpu.errors import (
    BuildError,
    GpuError,
    GpuFault,
    GpuUnavailable,
    ProgramCheckError,
    ResidencyError,
    WatchdogTimeout,
)

_LAZY = {
    "available": "runtime",
    "device_info": "runtime",
    "load_kernel": "runtime",
    "GpuRunner": "runtime",
    "Timing": "runtime",
    "BuildConfig": "build",
    "build_cubin": "build",
    "PtxasReport": "build",
    "find_nvcc": "build",
    "check_program": "checks",
    "check_against_reference": "harness",
    "time_program": "harness",
    "measure_bandwidth_gbps": "harness",
}

__all__ = [
    "BuildError",
    "GpuError",
    "GpuFault",
    "GpuUnavailable",
    "ProgramCheckError",
    "ResidencyError",
    "WatchdogTimeout",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"pytest_amk.gpu.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'pytest_amk.gpu' has no attribute {name!r}")
