"""Building the CUDA VM: generated header, nvcc, on-disk cubin cache, ptxas report.

Nothing here imports torch or PyCUDA: the compile test (no GPU) uses it as is.
The cache key covers every vm/ source, the header generated from ir.py, the
build settings and the nvcc version, so any change rebuilds; files are written
to a temporary name and renamed, so concurrent (xdist) builds are safe.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_amk import ir
from pytest_amk.gpu.abi import TRACE_MARKS, cuda_header
from pytest_amk.gpu.errors import BuildError

DTYPE_CODES = {"fp32": 0, "fp16": 1, "bf16": 2}
ENTRY = "amk_vm"
HEADER_NAME = "amk_ir.h"
MAIN_SOURCE = "amk_vm.cu"
# -O3 only: --use_fast_math would swap expf for a less accurate version and flush denormals.
NVCC_FLAGS = ("-O3", "-std=c++17")


def vm_dir() -> Path:
    """The CUDA sources: $AMK_VM_DIR, else vm/ inside the package (wheel), else the repo's vm/."""
    env = os.environ.get("AMK_VM_DIR")
    here = Path(__file__).resolve().parent.parent  # pytest_amk/
    for cand in ([Path(env)] if env else []) + [here / "vm", here.parent / "vm"]:
        if (cand / MAIN_SOURCE).is_file():
            return cand
    raise BuildError(f"CUDA sources not found ({MAIN_SOURCE} under $AMK_VM_DIR, {here / 'vm'} or {here.parent / 'vm'})")


def cache_dir() -> Path:
    """$AMK_CACHE_DIR, else $XDG_CACHE_HOME/pytest-amk, else ~/.cache/pytest-amk."""
    env = os.environ.get("AMK_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pytest-amk"


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.access(os.path.join(root, "bin", "nvcc"), os.X_OK):
            return os.path.join(root, "bin", "nvcc")
    return None


@functools.lru_cache(maxsize=4)
def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip()


@dataclass(frozen=True)
class BuildConfig:
    """Compile-time settings of one VM build (each becomes a -D define or -arch)."""

    dtype: str = "bf16"
    threads: int = 256
    pipe: int = 2
    arch: str = "sm_90"
    trace: bool = False  # per-instruction timing trace (vm/amk_trace.cuh); tools/trace_vm.py only
    prefetch_late: bool = True  # L2 prefetch of the next instruction after this op (False: before the wait)
    trace_mark: str = ""  # with trace: abi.TRACE_MARKS name where an op takes its last timing point

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CODES:
            raise BuildError(f"model dtype {self.dtype!r} not one of {', '.join(DTYPE_CODES)}")
        if self.threads % 32 or not 32 <= self.threads <= 1024:
            raise BuildError(f"threads_per_block {self.threads} must be a multiple of 32 in [32, 1024]")
        if not 1 <= self.pipe <= 16:
            raise BuildError(f"pipelining_depth {self.pipe} must be in [1, 16]")
        if not re.fullmatch(r"sm_\d+[a-z]?", self.arch):
            raise BuildError(f"arch {self.arch!r} is not of the form sm_XY")
        if self.trace_mark and (not self.trace or self.trace_mark not in TRACE_MARKS):
            raise BuildError(f"trace_mark {self.trace_mark!r} needs trace=True and one of {', '.join(TRACE_MARKS)}")

    @staticmethod
    def for_program(program: ir.Program, arch: str) -> BuildConfig:
        m = program.meta
        return BuildConfig(str(m.get("dtype", "bf16")), int(m.get("threads_per_block", 256)),
                           int(m.get("pipelining_depth", 2)), arch)

    def defines(self) -> list[str]:
        return [f"-DAMK_DTYPE={DTYPE_CODES[self.dtype]}", f"-DAMK_THREADS={self.threads}",
                f"-DAMK_PIPE={self.pipe}", f"-DAMK_PIPE_CAP={ir.max_pipelining_depth(self.threads, self.dtype)}",
                f"-DAMK_TRACE={int(self.trace)}", f"-DAMK_PF_LATE={int(self.prefetch_late)}",
                f"-DAMK_TRACE_MARK={TRACE_MARKS.index(self.trace_mark) + 1 if self.trace_mark else 0}"]


@dataclass(frozen=True)
class PtxasReport:
    """ptxas -v figures for the entry function."""

    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    static_smem: int

    @staticmethod
    def parse(log: str, entry: str = ENTRY) -> PtxasReport:
        """Parse ``nvcc -Xptxas -v`` output; raises BuildError if the entry is missing."""
        lines = log.splitlines()
        for i, line in enumerate(lines):
            if f"Function properties for {entry}" not in line:
                continue
            props = " ".join(lines[i + 1 : i + 3])
            frame = re.search(r"(\d+) bytes stack frame", props)
            st = re.search(r"(\d+) bytes spill stores", props)
            ld = re.search(r"(\d+) bytes spill loads", props)
            regs = re.search(r"Used (\d+) registers", props)
            smem = re.search(r"(\d+) bytes smem", props)
            if frame and st and ld and regs:
                return PtxasReport(int(regs.group(1)), int(st.group(1)), int(ld.group(1)),
                                   int(frame.group(1)), int(smem.group(1)) if smem else 0)
        raise BuildError(f"no ptxas report for {entry!r} in:\n{log}")

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class BuildResult:
    config: BuildConfig
    cubin: Path
    report: PtxasReport
    log: str
    cached: bool


def _sources(vm: Path) -> list[Path]:
    return sorted(p for p in vm.iterdir() if p.suffix in (".cu", ".cuh", ".h") and p.name != HEADER_NAME)


def build_key(cfg: BuildConfig, nvcc: str, vm: Path | None = None) -> str:
    vm = vm or vm_dir()
    h = hashlib.sha256()
    for p in _sources(vm):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(cuda_header().encode())
    h.update(repr((cfg, NVCC_FLAGS)).encode())
    h.update(nvcc_version(nvcc).encode())
    return h.hexdigest()[:20]


def build_cubin(cfg: BuildConfig, *, nvcc: str | None = None, cache: Path | None = None,
                force: bool = False) -> BuildResult:
    """Compile the VM for ``cfg`` (or reuse the cached cubin). Raises BuildError."""
    nvcc = nvcc or find_nvcc()
    if not nvcc:
        raise BuildError("nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    vm = vm_dir()
    key = build_key(cfg, nvcc, vm)
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    tags = ("-trace" if cfg.trace else "") + ("" if cfg.prefetch_late else "-pfearly")
    tags += f"-{cfg.trace_mark}" if cfg.trace_mark else ""
    stem = f"amk_vm-{cfg.arch}-{cfg.dtype}-t{cfg.threads}-p{cfg.pipe}{tags}-{key}"
    cubin, logf = cache / f"{stem}.cubin", cache / f"{stem}.log"
    if not force and cubin.is_file() and logf.is_file():
        log = logf.read_text()
        return BuildResult(cfg, cubin, PtxasReport.parse(log), log, True)
    with tempfile.TemporaryDirectory(dir=cache, prefix="build-") as tmp:
        # The header is generated here, from ir.py, at build time: never a checked-in copy.
        (Path(tmp) / HEADER_NAME).write_text(cuda_header())
        out = Path(tmp) / "out.cubin"
        cmd = [nvcc, "-cubin", f"-arch={cfg.arch}", *NVCC_FLAGS, "-Xptxas", "-v", "-I", tmp, "-I", str(vm),
               *cfg.defines(), "-o", str(out), str(vm / MAIN_SOURCE)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        log = proc.stdout + proc.stderr
        if proc.returncode != 0 or not out.is_file():
            raise BuildError(f"nvcc failed ({proc.returncode}): {' '.join(cmd)}\n{log}")
        report = PtxasReport.parse(log)
        (Path(tmp) / "out.log").write_text(log)
        os.replace(out, cubin)
        os.replace(Path(tmp) / "out.log", logf)
    return BuildResult(cfg, cubin, report, log, False)
