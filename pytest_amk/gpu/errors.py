"""Exceptions of the GPU layer. Plain Python: importing this imports nothing heavy."""

from __future__ import annotations


class GpuError(Exception):
    """Base class: anything that stops a program from running correctly on the GPU."""


class GpuUnavailable(GpuError):
    """No usable CUDA device, torch build, PyCUDA or nvcc."""


class BuildError(GpuError):
    """nvcc failed to compile the VM."""


class ProgramCheckError(GpuError):
    """The program would make the VM touch memory outside its buffers (or is malformed)."""


class ResidencyError(GpuError):
    """The persistent grid cannot be co-resident on this device (it could deadlock)."""


class GpuFault(GpuError):
    """The kernel reported an error record (or the launch itself failed).

    ``task`` is the Program task id, ``op`` its opcode name; ``counter``,
    ``value`` and ``threshold`` describe the wait that failed (watchdog) or the
    offending value (bad input: ``value`` is the input read on the GPU).
    """

    def __init__(self, message: str, *, code: int = 0, task: int | None = None, op: str | None = None,
                 sm: int | None = None, counter: int | None = None, value: int | None = None,
                 threshold: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.task = task
        self.op = op
        self.sm = sm
        self.counter = counter
        self.value = value
        self.threshold = threshold


class WatchdogTimeout(GpuFault):
    """A spin wait exceeded its budget: the kernel aborted cleanly instead of hanging."""
