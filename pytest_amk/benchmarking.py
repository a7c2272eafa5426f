"""pytest-benchmark glue (DESIGN §8): schedule items feed their CUDA-event kernel timings to
pytest-benchmark, storage is kept per GPU model, and ``--benchmark-compare-fail`` becomes a
gate that fails loudly instead of passing silently.

* **Durations in, exactly.** Every ScheduleItem carries a ``benchmark(timer=ReplayTimer())``
  marker. When the item's GPU stage timed the megakernel, ``record`` loads those CUDA-event
  durations into the timer and calls ``benchmark.pedantic``: each round's "start" reads 0 and
  its "end" reads the next duration, so the saved JSON holds exactly the kernel durations
  (seconds), not Python wall time. Without a GPU the fixture is marked skipped: no numbers.
* **Injected timings (test only).** ``pytest_amk_gpu_timing(item, result)`` (hookspec.py) may
  return durations in microseconds; they are recorded with ``latency_kind = "injected"`` so
  the plumbing can be tested on a CPU. They never reach the verdict.
* **Storage per GPU model.** pytest-benchmark's machine id names no GPU, so unless
  ``--benchmark-storage`` is given, storage becomes ``.benchmarks/<gpu-model-slug>/``
  (``no-gpu`` without one; ``AMK_GPU_MODEL`` overrides the detected name). Each benchmark's
  ``extra_info.device_name`` is checked against its baseline's as well.
* **The gate.** pytest-benchmark raises an uncaught ``PerformanceRegression`` after the run
  (a traceback, while JUnit says passed), and turns itself off under xdist so that
  ``--benchmark-compare-fail`` then passes having checked nothing. With
  ``--benchmark-compare-fail``, this module takes the checks over: each schedule item compares
  its own median (or other field) with the loaded baseline and fails as a normal test failure
  with both numbers; other benchmarks are checked at the end of the session; and a run that
  compared nothing (all skipped, REJECTED, GPU not run, benchmarks disabled, no baseline)
  exits 1 with a "benchmark gate" section saying why, and counts as one failed
  ``benchmark-gate`` in pytest's summary.

Nothing here imports torch; the GPU facts come from the CUDA driver through ctypes.
"""

from __future__ import annotations

import functools
import math
import os
import re
import statistics
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from _pytest._code.code import TerminalRepr
from _pytest._io import TerminalWriter

if TYPE_CHECKING:
    from pytest_amk.items import AmkState
    from pytest_amk.pipeline import ItemResult

DEFAULT_STORAGE = "file://./.benchmarks"  # pytest-benchmark's default --benchmark-storage
GPU_MODEL_ENV = "AMK_GPU_MODEL"  # names the GPU model for the storage folder (else detected)
NO_GPU = "no-gpu"
INJECTED, MEASURED = "injected", "measured-gpu"


# -- the timer that replays external durations -------------------------------------------------------------------

class ReplayTimer:
    """A pytest-benchmark timer that replays given durations: ``reset`` (the round's setup)
    sets the clock to 0, ``advance`` (the benchmarked target) sets it to the next duration.
    pytest-benchmark computes ``end - start`` = ``duration - 0.0``: the duration, exactly."""

    def __init__(self) -> None:
        self.__name__ = "cuda_events"  # what pytest-benchmark saves as options.timer
        self._now = 0.0
        self._pending: list[float] = []

    def __call__(self) -> float:
        return self._now

    def load(self, seconds: list[float]) -> None:
        self._pending = list(reversed(seconds))

    def reset(self) -> None:
        self._now = 0.0

    def advance(self) -> None:
        self._now = self._pending.pop()


REPLAY = pytest.StashKey[ReplayTimer]()
GATE = pytest.StashKey["BenchmarkGate"]()


def prepare_item(item: pytest.Item) -> None:
    """Give a schedule item its replay timer (as pytest-benchmark's marker, read when the
    fixture is set up) and group its benchmark by schedule file."""
    timer = ReplayTimer()
    item.stash[REPLAY] = timer
    item.add_marker(pytest.mark.benchmark(timer=timer, group=item.path.name))


# -- the GPU, without torch ----------------------------------------------------------------------------------------

def slugify(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@functools.lru_cache(maxsize=1)
def _cuda_device() -> tuple[Any, Any] | None:
    """The CUDA driver library and device 0 of this process (torch's ``cuda:0``), or None."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    count, dev = ctypes.c_int(0), ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return None
    if cuda.cuDeviceGet(ctypes.byref(dev), 0) != 0:
        return None
    return cuda, dev


def gpu_name() -> str:
    """Device 0's name from the CUDA driver ("" without a driver or a device)."""
    import ctypes

    found = _cuda_device()
    if found is None:
        return ""
    cuda, dev = found
    name = ctypes.create_string_buffer(256)
    if cuda.cuDeviceGetName(name, 256, dev) != 0:
        return ""
    return name.value.decode(errors="replace")


@functools.lru_cache(maxsize=1)
def gpu_info() -> dict[str, Any]:
    """Static facts about device 0, read through the driver API with ctypes (no torch): name,
    SM count, compute capability, memory, L2, clocks, driver and CUDA versions. ``{}`` without
    a driver or a device. Cached: machine info must be the same when a baseline is loaded
    (configure) and when results are saved (session end)."""
    import ctypes

    found = _cuda_device()
    if found is None:
        return {}
    cuda, dev = found
    info: dict[str, Any] = {"name": gpu_name()}
    attrs = {"sm_count": 16, "sm_clock_max_mhz": 13, "mem_clock_max_mhz": 36, "mem_bus_bits": 37,
             "l2_mb": 38, "cc_major": 75, "cc_minor": 76}
    got: dict[str, Any] = {}
    for key, attr in attrs.items():
        v = ctypes.c_int(0)
        if cuda.cuDeviceGetAttribute(ctypes.byref(v), attr, dev) == 0:
            got[key] = v.value
    if "cc_major" in got and "cc_minor" in got:
        info["compute_capability"] = f"{got.pop('cc_major')}.{got.pop('cc_minor')}"
    for key in ("sm_clock_max_mhz", "mem_clock_max_mhz"):
        if key in got:
            got[key] //= 1000  # kHz
    if "l2_mb" in got:
        got["l2_mb"] = round(got["l2_mb"] / 2**20, 1)
    info.update(got)
    mem = ctypes.c_size_t(0)
    if cuda.cuDeviceTotalMem_v2(ctypes.byref(mem), dev) == 0:
        info["memory_gib"] = round(mem.value / 2**30, 1)
    ver = ctypes.c_int(0)
    if cuda.cuDriverGetVersion(ctypes.byref(ver)) == 0:
        info["cuda_driver_api"] = f"{ver.value // 1000}.{ver.value % 1000 // 10}"
    pci = ctypes.create_string_buffer(64)
    if cuda.cuDeviceGetPCIBusId(pci, 64, dev) == 0:
        info.update(_nvml_info(pci.value))
    if "driver" not in info:
        info.update(_proc_driver())
    nvcc = _nvcc_version()
    if nvcc:
        info["nvcc"] = nvcc
    return info


def _nvml_info(pci_bus_id: bytes) -> dict[str, Any]:
    """Driver version and application clocks from NVML (the device found by PCI bus id)."""
    import ctypes

    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return {}
    if nvml.nvmlInit_v2() != 0:
        return {}
    out: dict[str, Any] = {}
    try:
        buf = ctypes.create_string_buffer(96)
        if nvml.nvmlSystemGetDriverVersion(buf, 96) == 0:
            out["driver"] = buf.value.decode()
        handle = ctypes.c_void_p()
        if nvml.nvmlDeviceGetHandleByPciBusId_v2(pci_bus_id, ctypes.byref(handle)) == 0:
            for key, clock in (("sm_clock_app_mhz", 1), ("mem_clock_app_mhz", 2)):  # NVML_CLOCK_SM, _MEM
                v = ctypes.c_uint(0)
                if nvml.nvmlDeviceGetApplicationsClock(handle, clock, ctypes.byref(v)) == 0:
                    out[key] = v.value
    finally:
        nvml.nvmlShutdown()
    return out


def _proc_driver() -> dict[str, str]:
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return {}
    m = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", text)
    return {"driver": m.group(1)} if m else {}


def _nvcc_version() -> str | None:
    import subprocess

    from pytest_amk.gpu.build import find_nvcc

    nvcc = find_nvcc()
    if nvcc is None:
        return None
    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"V(\d+\.\d+\.\d+)", text)
    return m.group(1) if m else None


def gpu_model(device: str) -> str:
    """The GPU model name used for storage: $AMK_GPU_MODEL, else device 0's name ("" with
    ``--amk-device=cpu`` or no GPU)."""
    override = os.environ.get(GPU_MODEL_ENV, "").strip()
    if override:
        return override
    if device == "cpu":
        return ""
    return gpu_name()


def machine_info(device: str) -> dict[str, Any]:
    """What pytest-amk adds to pytest-benchmark's machine info (besides its settings): the
    torch version (from its metadata: torch need not be imported) and, unless
    ``--amk-device=cpu``, the GPU (name, SMs, compute capability, driver, CUDA, clocks)."""
    import importlib.metadata

    info: dict[str, Any] = {}
    try:
        info["torch"] = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        pass
    if device != "cpu":
        gpu = gpu_info()
        if gpu:
            info["gpu"] = dict(gpu)
    return info


# -- configure: storage and the gate ----------------------------------------------------------------------------

def configure(config: pytest.Config, state: AmkState) -> None:
    """Before pytest-benchmark's own (trylast) configure: per-GPU storage, the compare-fail
    option check, and the gate plugin."""
    if not config.pluginmanager.hasplugin("benchmark"):
        return
    uses_storage = any(config.getoption(o, None) for o in ("benchmark_save", "benchmark_autosave",
                                                             "benchmark_compare"))
    if uses_storage and config.getoption("benchmark_storage", None) == DEFAULT_STORAGE:
        slug = slugify(gpu_model(state.device)) or NO_GPU
        config.option.benchmark_storage = f"{DEFAULT_STORAGE}/{slug}"
    if config.getoption("benchmark_compare_fail", None) and not config.getoption("benchmark_compare", None):
        raise pytest.UsageError("--benchmark-compare-fail needs --benchmark-compare (a saved run to compare with)")
    gate = BenchmarkGate(config)
    config.stash[GATE] = gate
    config.pluginmanager.register(gate, "amk-benchmark-gate")


def _check_text(check: Any) -> str:
    name = type(check).__name__
    if name.startswith("Percentage"):
        return f"{check.field}:{check.threshold}%"
    return f"{check.field}:{check.threshold}"


def _regression_text(check: Any, now: dict[str, Any], base: dict[str, Any], source: str) -> str:
    field = check.field
    new, old = float(now[field]), float(base[field])
    if type(check).__name__.startswith("Percentage"):
        change = f"{100 * (new / old - 1):+.1f}%" if old else "+inf%"
        limit = f"{check.threshold}%"
    else:
        change, limit = f"{1e6 * (new - old):+.2f} us", f"{1e6 * check.threshold:.2f} us"
    return f"{field} {1e6 * new:.2f} us now vs {1e6 * old:.2f} us in {source} ({change}, limit {limit})"


class BenchmarkGate:
    """Owns ``--benchmark-compare-fail`` (registered as a plugin when pytest-benchmark is)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.checks: list[Any] = []
        self.measured: dict[str, str] = {}  # fullname -> "measured-gpu" | "injected"
        self.compared: set[str] = set()
        self.not_in_baseline: list[str] = []
        self.not_measured: Counter[str] = Counter()
        self.regressions: list[str] = []  # of benchmarks other than schedule items (session end)
        self.failure = ""
        self.slowdown = os.environ.get("AMK_TEST_SLOWDOWN_US", "").strip()

    @property
    def session(self) -> Any:
        return getattr(self.config, "_benchmarksession", None)

    @pytest.hookimpl
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        bs = self.session
        if bs is None:
            return
        # Take the checks over: pytest-benchmark would raise PerformanceRegression after the run.
        self.checks = list(bs.compare_fail or [])
        bs.compare_fail = None
        rounds = int(getattr(bs, "options", {}).get("min_rounds", 0) or 0)
        if rounds:
            from pytest_amk.gpu import harness

            harness.set_min_rounds(rounds)

    # -- per item ---------------------------------------------------------------------------------------
    def skip(self, reason: str) -> None:
        self.not_measured[reason] += 1

    def compare(self, fullname: str, stats: dict[str, Any], device_name: str | None) -> str | None:
        """Check one benchmark against the loaded baseline(s); the failure text or None."""
        bs = self.session
        if not self.checks or bs is None:
            return None
        failures = []
        found = False
        for path, mapping in (bs.compared_mapping or {}).items():
            base = mapping.get(fullname)
            if base is None:
                continue
            found = True
            source = Path(str(path)).stem
            base_dev = (base.get("extra_info") or {}).get("device_name")
            if base_dev and device_name and base_dev != device_name:
                failures.append(f"baseline {source} was measured on {base_dev}, this run on {device_name}: "
                                f"different GPUs are never compared")
                continue
            for check in self.checks:
                if check.fails(stats, base["stats"]):
                    failures.append(_regression_text(check, stats, base["stats"], source))
        if not found:
            self.not_in_baseline.append(fullname)
            return None
        self.compared.add(fullname)
        if not failures:
            return None
        checks = " ".join(_check_text(c) for c in self.checks)
        return f"benchmark regression (--benchmark-compare-fail={checks}): " + "; ".join(failures)

    # -- session end ------------------------------------------------------------------------------------
    @pytest.hookimpl(tryfirst=True)  # before junitxml writes its file
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        bs = self.session
        if not self.checks or bs is None or hasattr(self.config, "workerinput"):
            return
        self._check_other_benchmarks(bs)
        self.failure = self._verdict(bs)
        if self.failure:
            if session.exitstatus == pytest.ExitCode.OK:
                session.exitstatus = pytest.ExitCode.TESTS_FAILED
            from _pytest.junitxml import xml_key

            xml = self.config.stash.get(xml_key, None)
            if xml is not None:
                xml.add_global_property("amk_benchmark_gate", f"failed: {self.failure}")

    def _check_other_benchmarks(self, bs: Any) -> None:
        """Benchmarks of ordinary tests in the same run: pytest-benchmark no longer checks them."""
        for bench in bs.benchmarks:
            if bench.fullname in self.measured or not bench:
                continue
            stats = bench.stats.as_dict() if hasattr(bench.stats, "as_dict") else {}
            failure = self.compare(bench.fullname, stats, (bench.extra_info or {}).get("device_name"))
            self.measured[bench.fullname] = "other"
            if failure:
                self.regressions.append(f"{bench.fullname}: {failure}")

    def _verdict(self, bs: Any) -> str:
        if self.regressions:
            return f"{len(self.regressions)} regression(s) in benchmarks other than schedule items"
        if bs.disabled:
            why = ("xdist is active (-n)" if self.config.getoption("dist", "no") != "no"
                   else "--benchmark-disable")
            return f"nothing was measured: pytest-benchmark disabled benchmarks because {why}"
        if bs.skip:
            return "nothing was measured: --benchmark-skip"
        if not bs.compared_mapping:
            return f"no baseline to compare with: nothing saved in {bs.storage} matches --benchmark-compare"
        if self.compared:
            return ""
        if self.measured:
            return (f"{len(self.measured)} benchmark(s) measured, but none has an entry in the baseline "
                    f"({', '.join(Path(str(p)).stem for p in bs.compared_mapping)})")
        why = "; ".join(f"{n} x {reason}" for reason, n in self.not_measured.most_common()) or "no item ran"
        return f"nothing was measured: {why}"

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        tr = terminalreporter
        if self.slowdown:
            tr.write_line(f"AMK_TEST_SLOWDOWN_US={self.slowdown}: every timed launch includes a spin of that "
                          f"length on purpose (test only)", yellow=True, bold=True)
        if not self.checks or hasattr(self.config, "workerinput"):
            return
        checks = " ".join(_check_text(c) for c in self.checks)
        tr.write_sep("=", f"benchmark gate (--benchmark-compare-fail={checks})",
                     red=bool(self.failure), green=not self.failure)
        tr.write_line(f"{len(self.compared)} benchmark(s) compared with the baseline")
        if self.not_in_baseline:
            tr.write_line(f"not in the baseline (not compared): {', '.join(sorted(set(self.not_in_baseline)))}",
                          yellow=True)
        for line in self.regressions:
            tr.write_line(line, red=True)
        if self.failure:
            tr.write_line(f"FAILED: {self.failure}", red=True, bold=True)
            # Counted like a failed test, so that pytest's last line is red and says so, and the
            # short test summary (printed after this hook) lists it.
            tr.stats.setdefault("failed", []).append(_gate_report(self.failure))


class _GateRepr(TerminalRepr):
    def __init__(self, message: str) -> None:
        self.message = message
        self.reprcrash = self  # pytest's short summary reads longrepr.reprcrash.message

    def toterminal(self, tw: TerminalWriter) -> None:
        tw.line(self.message, red=True)

    def __str__(self) -> str:
        return self.message


def _gate_report(message: str) -> pytest.TestReport:
    return pytest.TestReport(nodeid="benchmark-gate", location=("benchmark-gate", None, "benchmark gate"),
                             keywords={}, outcome="failed", longrepr=_GateRepr(message), when="call")


# -- per item: feed pytest-benchmark -----------------------------------------------------------------------------

def _extra_info(item: pytest.Item, result: ItemResult, kind: str, samples_us: list[float]) -> dict[str, Any]:
    v = result.verdict
    median = statistics.median(samples_us)
    timing = result.timing
    if kind == MEASURED and timing is not None:
        floor, spec_floor = timing.floor_us, timing.spec_floor_us
        bw, source = timing.bandwidth_gbps, "measured"
        extra = {"device_name": timing.device_name, "sm_count": timing.sm_count, "position": timing.pos,
                 "warmup": timing.warmup, "rounds": timing.rounds, "l2_flushed": timing.flushed_l2}
        if timing.slowdown_us:
            extra["test_slowdown_us"] = timing.slowdown_us
    elif result.timing is not None:  # injected (test only) where the GPU ran: its floors
        floor, spec_floor = result.timing.floor_us, result.timing.spec_floor_us
        bw, source = result.timing.bandwidth_gbps, "measured"
        extra = {"device_name": None}
    else:  # injected (test only) without a GPU: the floor at the target's spec bandwidth
        from pytest_amk.ir import get_target

        floor = spec_floor = v.bound_us
        bw, source = get_target(v.gpu).hbm_gbps, "spec"
        extra = {"device_name": None}

    def pct(f: float | None) -> float | None:
        return 100.0 * f / median if f and median > 0 and math.isfinite(f) else None

    return {"schedule_id": v.schedule_id, "latency_kind": kind, "median_us": median, "floor_us": floor,
            "pct_of_roofline": pct(floor), "spec_floor_us": spec_floor, "pct_of_spec": pct(spec_floor),
            "bandwidth_gbps": bw, "bandwidth_source": source, "tasks": v.tasks, "max_abs_err": v.max_abs_err,
            "gpu": v.gpu, "model": v.model, **extra}


def record(item: pytest.Item, result: ItemResult) -> str | None:
    """Feed this item's kernel timings to pytest-benchmark and check them against the baseline.
    Returns a regression message (the caller fails the item with it) or None."""
    from pytest_amk import outcomes

    gate = item.config.stash.get(GATE, None)
    bench = getattr(item, "funcargs", {}).get("benchmark")
    timer = item.stash.get(REPLAY, None)
    if gate is None:
        return None
    if result.outcome != outcomes.PASSED:
        gate.skip({outcomes.XREJECTED: "expected REJECTED"}.get(result.outcome, result.outcome.upper()))
        return None
    if bench is None or timer is None:
        gate.skip("benchmark fixture not requested (--benchmark-skip)")
        return None
    if bench.disabled:
        gate.skip("benchmarks disabled")
        return None
    injected = item.ihook.pytest_amk_gpu_timing(item=item, result=result)
    if injected is not None:
        samples, kind = [float(x) for x in injected], INJECTED
    elif getattr(result, "timing", None) is not None:
        samples, kind = list(result.timing.samples_us), MEASURED
    else:
        gate.skip(outcomes.gpu_not_run(result) or "GPU stage not timed")
        return None
    if not samples:
        gate.skip("no timing samples")
        return None
    bench.extra_info.update(_extra_info(item, result, kind, samples))
    timer.load([us * 1e-6 for us in samples])
    bench.pedantic(timer.advance, setup=timer.reset, rounds=len(samples), iterations=1, warmup_rounds=0)
    gate.measured[bench.fullname] = kind
    stats = bench.stats.stats.as_dict()
    return gate.compare(bench.fullname, stats, bench.extra_info.get("device_name"))
