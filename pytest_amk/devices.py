"""Which GPU a process uses, and exclusive timing per GPU (plain Python, no CUDA init).

Under xdist each worker is pinned to one GPU before anything touches CUDA: worker
``gwN`` takes the ``N mod len(devices)``-th entry of the devices the user made
visible (``CUDA_VISIBLE_DEVICES``, indices or UUIDs; all GPUs when unset) and
narrows ``CUDA_VISIBLE_DEVICES`` to it, so torch and PyCUDA see that one card as
device 0. With more workers than GPUs, several workers share a card; timings are
then taken under an exclusive per-GPU file lock, so no GPU is timed while another
worker runs on it through a timed region of its own. On a machine without GPUs
pinning is a no-op, so the same code runs on CPU workers.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

ENV = "CUDA_VISIBLE_DEVICES"
PINNED_ENV = "AMK_PINNED_GPU"  # the physical device this process was pinned to (for locks and reports)


def count_gpus() -> int:
    """GPUs on this host, without initialising CUDA in this process (nvidia-smi -L)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def visible_devices(env: Mapping[str, str], probe: Callable[[], int] = count_gpus) -> list[str]:
    """The devices this process may use, as CUDA_VISIBLE_DEVICES entries."""
    raw = env.get(ENV)
    if raw is not None:
        # CUDA stops at the first invalid entry; an empty value hides every GPU.
        return [d.strip() for d in raw.split(",") if d.strip()]
    return [str(i) for i in range(probe())]


def worker_index(worker_id: str) -> int:
    m = re.fullmatch(r"gw(\d+)", worker_id)
    if not m:
        raise ValueError(f"not an xdist worker id: {worker_id!r}")
    return int(m.group(1))


def assign(worker_id: str, devices: list[str]) -> str | None:
    """The device for an xdist worker, or None when there is none (CPU)."""
    if not devices:
        return None
    return devices[worker_index(worker_id) % len(devices)]


def pin_worker(worker_id: str, env: os._Environ[str] | dict[str, str],
               probe: Callable[[], int] = count_gpus) -> str | None:
    """Narrow CUDA_VISIBLE_DEVICES to this worker's GPU (before CUDA is initialised)."""
    device = assign(worker_id, visible_devices(env, probe))
    if device is not None:
        env[ENV] = device
        env[PINNED_ENV] = device
    return device


def lock_dir() -> Path:
    d = Path(os.environ.get("AMK_LOCK_DIR") or tempfile.gettempdir()) / "amk-gpu-locks"
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextlib.contextmanager
def exclusive_gpu(device: str | None = None) -> Iterator[None]:
    """Hold the host-wide timing lock of one GPU (default: the pinned one, else device 0)."""
    key = device or os.environ.get(PINNED_ENV) or (visible_devices(os.environ, lambda: 1) or ["0"])[0]
    path = lock_dir() / f"gpu-{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
