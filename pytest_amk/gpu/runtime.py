"""Loading and launching the VM with PyCUDA inside torch's primary context.

torch and PyCUDA are imported inside functions only. The module is loaded into
the primary context of torch's current device (retained and pushed once), so
torch tensors are passed by pointer and torch's default stream (the legacy null
stream) orders our launches with torch's own work.
"""

from __future__ import annotations

import atexit
import functools
import statistics
from dataclasses import dataclass, field
from typing import Any

from pytest_amk import ir
from pytest_amk.gpu.abi import encode_task
from pytest_amk.gpu.build import BuildConfig, build_cubin, find_nvcc, vm_dir
from pytest_amk.gpu.checks import check_program, input_limits
from pytest_amk.gpu.errors import (
    GpuFault,
    GpuUnavailable,
    ProgramCheckError,
    ResidencyError,
    WatchdogTimeout,
)
from pytest_amk.gpu.prefetch import prefetch_sizes, prefetch_table

ERR_WORDS = 8  # AMK_ERR_WORDS in vm/amk_common.cuh
FAULT_WATCHDOG, FAULT_BAD_OPCODE, FAULT_BAD_INPUT = 1, 2, 3
DEFAULT_WATCHDOG_S = 2.0
# instrs, queue_start, queue_len, buffers, num_buffers, counters, err, prefetch, watchdog ns, then the K-step
# launch's: steps, counter_step, tokens_out, barrier counter, token / pos / seq_len buffer ids (vm/amk_vm.cu).
ARG_FORMAT = "PPPPiPPPqiPPiiii"


@functools.lru_cache(maxsize=1)
def available() -> tuple[bool, str]:
    """(True, "") when a CUDA device, torch with CUDA, PyCUDA and nvcc are all usable."""
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA device visible to torch"
    try:
        import pycuda.driver  # noqa: F401
    except ImportError as e:
        return False, f"PyCUDA is not importable ({e})"
    if find_nvcc() is None:
        return False, "nvcc not found"
    return True, ""


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    arch: str
    sm_count: int
    regs_per_sm: int
    smem_per_sm: int
    smem_optin_per_block: int
    smem_reserved_per_block: int
    max_threads_per_sm: int
    max_blocks_per_sm: int
    l2_bytes: int


_CTX: dict[str, Any] = {}


def _pop_context() -> None:
    ctx = _CTX.pop("ctx", None)
    if ctx is not None:
        try:
            ctx.pop()
        except Exception:  # interpreter shutdown: nothing useful to do
            pass


def device_info() -> DeviceInfo:
    """Push the primary context of torch's current device (once) and describe the device."""
    if "info" in _CTX:
        return _CTX["info"]
    ok, why = available()
    if not ok:
        raise GpuUnavailable(why)
    import pycuda.driver as drv
    import torch

    index = torch.cuda.current_device()
    torch.zeros(1, device=f"cuda:{index}")  # torch creates (and makes current) the primary context
    drv.init()
    dev = drv.Device(index)
    ctx = dev.retain_primary_context()
    ctx.push()
    _CTX["ctx"] = ctx
    atexit.register(_pop_context)
    a = drv.device_attribute
    major, minor = dev.compute_capability()
    info = DeviceInfo(
        index=index, name=dev.name(), arch=f"sm_{major}{minor}",
        sm_count=dev.get_attribute(a.MULTIPROCESSOR_COUNT),
        regs_per_sm=dev.get_attribute(a.MAX_REGISTERS_PER_MULTIPROCESSOR),
        smem_per_sm=dev.get_attribute(a.MAX_SHARED_MEMORY_PER_MULTIPROCESSOR),
        smem_optin_per_block=dev.get_attribute(a.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN),
        smem_reserved_per_block=dev.get_attribute(a.RESERVED_SHARED_MEMORY_PER_BLOCK),
        max_threads_per_sm=dev.get_attribute(a.MAX_THREADS_PER_MULTIPROCESSOR),
        max_blocks_per_sm=dev.get_attribute(a.MAX_BLOCKS_PER_MULTIPROCESSOR),
        l2_bytes=int(torch.cuda.get_device_properties(index).L2_cache_size),
    )
    _CTX["info"] = info
    return info


@dataclass
class Kernel:
    config: BuildConfig
    func: Any
    module: Any
    num_regs: int
    static_smem: int
    local_bytes: int
    cached_build: bool
    dyn_smem_limit: int = 0  # the function's MAX_DYNAMIC_SHARED_SIZE_BYTES as last set


_KERNELS: dict[tuple[BuildConfig, str], Kernel] = {}  # keyed by the sources' directory too ($AMK_VM_DIR)


def load_kernel(config: BuildConfig) -> Kernel:
    """Build (or reuse the cached cubin) and load the VM for ``config``; one module per config."""
    key = (config, str(vm_dir()))
    if key in _KERNELS:
        return _KERNELS[key]
    device_info()
    import pycuda.driver as drv

    built = build_cubin(config)
    module = drv.module_from_buffer(built.cubin.read_bytes())
    func = module.get_function("amk_vm")
    func.prepare(ARG_FORMAT)
    fa = drv.function_attribute
    k = Kernel(config, func, module, func.get_attribute(fa.NUM_REGS), func.get_attribute(fa.SHARED_SIZE_BYTES),
               func.get_attribute(fa.LOCAL_SIZE_BYTES), built.cached)
    _KERNELS[key] = k
    return k


def blocks_per_sm(kernel: Kernel, threads: int, dyn_smem: int, dev: DeviceInfo) -> int:
    """How many blocks of this kernel fit on one SM (registers, shared memory, threads)."""
    warps = -(-threads // 32)
    regs_per_warp = -(-kernel.num_regs * 32 // 256) * 256  # allocated per warp in units of 256
    by_regs = dev.regs_per_sm // max(1, regs_per_warp * warps)
    smem = kernel.static_smem + dyn_smem + dev.smem_reserved_per_block
    by_smem = dev.smem_per_sm // smem
    by_threads = dev.max_threads_per_sm // threads
    return max(0, min(by_regs, by_smem, by_threads, dev.max_blocks_per_sm))


@dataclass
class Timing:
    median_us: float
    samples_us: list[float]
    device_name: str
    flushed_l2: bool
    extra: dict[str, Any] = field(default_factory=dict)


class GpuRunner:
    """One program bound to its buffers on the GPU, ready to launch decode steps.

    ``tensors`` maps buffer id -> a contiguous CUDA tensor of the buffer's dtype and
    size (e.g. ``refvm.alloc_buffers(program, weights, "cuda")``); they are used in
    place. ``validate`` runs the static validator first (fault-injection tests pass
    False); the memory-safety checks always run. ``watchdog_s`` bounds every wait.
    ``prefetch_bytes`` and ``lookahead_bytes`` size the L2 prefetch (prefetch_table); left
    out, the program's (its schedule's prefetch.* knobs), else the defaults (prefetch_sizes).
    """

    def __init__(self, program: ir.Program, tensors: dict[int, Any], *, validate: bool = True,
                 watchdog_s: float = DEFAULT_WATCHDOG_S, prefetch_bytes: int | None = None,
                 lookahead_bytes: int | None = None, arch: str | None = None, trace: bool = False,
                 build: dict[str, Any] | None = None) -> None:
        import dataclasses

        import numpy as np
        import torch

        self.program = program
        self.tensors = tensors
        self.watchdog_s = float(watchdog_s)
        errors = check_program(program)
        if errors:
            raise ProgramCheckError("program is unsafe to launch: " + "; ".join(errors[:5])
                                    + (f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""))
        if validate:
            self._validate()
        self.dev = device_info()
        # build: BuildConfig overrides for A/B measurements (e.g. {"prefetch_late": False})
        self.config = dataclasses.replace(BuildConfig.for_program(program, arch or self.dev.arch), trace=trace,
                                          **(build or {}))
        self.kernel = load_kernel(self.config)
        device = torch.device("cuda", self.dev.index)

        # Buffer table (id -> pointer), checked against the program's buffers.
        n_buf = 1 + max((b.id for b in program.buffers), default=-1)
        ptrs = np.zeros(max(1, n_buf), dtype=np.int64)
        for b in program.buffers:
            t = tensors.get(b.id)
            if t is None:
                raise ProgramCheckError(f"no tensor for buffer {b.id} ({b.name!r})")
            if (not t.is_cuda or t.device.index != self.dev.index or not t.is_contiguous()
                    or t.dtype != b.dtype.torch() or t.numel() != b.numel):
                raise ProgramCheckError(
                    f"tensor for buffer {b.name!r} must be a contiguous {b.dtype.value} CUDA tensor on "
                    f"device {self.dev.index} of {b.numel} elements, got {t.dtype} {tuple(t.shape)} on {t.device}")
            ptrs[b.id] = t.data_ptr()
        self.num_buffers = n_buf

        # Instructions in queue order; queue q is instrs[start[q] : start[q] + len[q]].
        queues = program.queues()
        self.order = [t for q in queues for t in q]
        words = np.array([encode_task(t) for t in self.order] or [[0] * ir.INSTR_WORDS], dtype=np.int32)
        lens = np.array([len(q) for q in queues], dtype=np.int32)
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int32)
        own, look = prefetch_sizes(program.meta, self.dev.name, prefetch_bytes, lookahead_bytes)
        pf = prefetch_table(program, self.order, ptrs, own, look)

        def dev_tensor(a: Any) -> Any:
            return torch.from_numpy(np.ascontiguousarray(a)).to(device)

        self._instrs, self._starts, self._lens = dev_tensor(words), dev_tensor(starts), dev_tensor(lens)
        self._ptrs, self._prefetch = dev_tensor(ptrs), dev_tensor(pf)
        n_counters = 1 + max((c.id for c in program.counters), default=0)
        self._counters = torch.zeros(n_counters, dtype=torch.int32, device=device)
        # K-step launches (run_tokens): signals per step of each counter, and the tokens of each step.
        from pytest_amk.multistep import counter_steps

        steps = counter_steps(program) + [0] * n_counters
        self._counter_step = torch.tensor(steps[:n_counters], dtype=torch.int32, device=device)
        self._tokens_out = torch.zeros(1, dtype=torch.int32, device=device)
        self._step_plan: Any = None
        self._steps = 1  # of the last launch
        self._err = torch.zeros(ERR_WORDS, dtype=torch.int32, device=device)
        self._trace = None
        if trace:  # 6 u64 per instruction (vm/amk_trace.cuh), pointed to by the module global amk_trace
            import pycuda.driver as drv

            self._trace = torch.zeros((len(self.order), 3, 2), dtype=torch.int64, device=device)
            ptr, _ = self.kernel.module.get_global("amk_trace")
            drv.memcpy_htod(ptr, np.array([self._trace.data_ptr()], dtype=np.uint64))

        # Dynamic shared memory: the buffer table, then the largest op scratch.
        self.dyn_smem = ir.program_smem_bytes(program)
        limit = self.dev.smem_optin_per_block - self.kernel.static_smem
        if self.dyn_smem > limit:
            raise ResidencyError(f"program needs {self.dyn_smem} B of dynamic shared memory per block; "
                                 f"{self.dev.name} allows {limit} B")
        import pycuda.driver as drv

        # The function is shared by every runner of this build: only ever raise its limit, so a
        # runner of a smaller program never makes another's launches fail.
        if self.dyn_smem > self.kernel.dyn_smem_limit:
            self.kernel.func.set_attribute(drv.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, self.dyn_smem)
            self.kernel.dyn_smem_limit = self.dyn_smem
        self.grid = len(queues)
        per_sm = blocks_per_sm(self.kernel, self.config.threads, self.dyn_smem, self.dev)
        if self.grid > per_sm * self.dev.sm_count:
            raise ResidencyError(
                f"{self.grid} SM queues cannot be co-resident on {self.dev.name}: {per_sm} block(s) per SM x "
                f"{self.dev.sm_count} SMs ({self.kernel.num_regs} registers x {self.config.threads} threads, "
                f"{self.kernel.static_smem + self.dyn_smem} B shared memory per block)")
        self.vocab, self.max_seq = input_limits(program)
        self._ids = {name: self._buffer_id(name) for name in ("token", "pos", "seq_len", "logits", "next_token")}

    # -- setup helpers ---------------------------------------------------------------
    def _validate(self) -> None:
        try:
            from pytest_amk.validate import validate
        except ImportError:  # validator not available: the caller proves programs itself
            return
        target = ir.get_target(str(self.program.meta.get("target", "h100")))
        result = validate(self.program, target)
        if not result.ok:
            raise ProgramCheckError("validator: " + "; ".join(e.message for e in result.errors[:5]))

    def _buffer_id(self, name: str) -> int | None:
        try:
            return self.program.buffer(name).id
        except KeyError:
            return None

    # -- running ---------------------------------------------------------------------
    def set_inputs(self, token: int, pos: int) -> None:
        if self.vocab is not None and not 0 <= token < self.vocab:
            raise ValueError(f"token {token} outside [0, {self.vocab})")
        if self.max_seq is not None and not 0 <= pos < self.max_seq:
            raise ValueError(f"position {pos} outside [0, {self.max_seq})")
        for name, value in (("token", token), ("pos", pos), ("seq_len", pos + 1)):
            bid = self._ids[name]
            if bid is not None:
                self.tensors[bid].fill_(value)

    def launch(self, steps: int = 1) -> None:
        """Zero counters and the error record, then launch (asynchronously, null stream).
        ``steps`` > 1 only through ``run_tokens``, which proves the program can take it."""
        import torch

        stream = torch.cuda.current_stream(self.dev.index)
        if stream.cuda_stream != 0:  # our launch goes to the null stream: order it by hand
            stream.synchronize()
        self._reset()
        self._launch_raw(steps)

    def _reset(self) -> None:
        self._counters.zero_()
        self._err.zero_()

    def _launch_raw(self, steps: int = 1) -> None:
        plan = self._step_plan if steps > 1 else None
        if steps > 1 and (plan is None or self._tokens_out.numel() < steps):
            raise RuntimeError("a K-step launch needs run_tokens' proof and tokens_out first")
        ids = [-1, -1, -1, -1] if plan is None else [plan.barrier_counter] + [
            -1 if plan.inputs[n] is None else plan.inputs[n] for n in ("token", "pos", "seq_len")]
        self._steps = steps
        self.kernel.func.prepared_call(
            (self.grid, 1, 1), (self.config.threads, 1, 1),
            self._instrs.data_ptr(), self._starts.data_ptr(), self._lens.data_ptr(), self._ptrs.data_ptr(),
            self.num_buffers, self._counters.data_ptr(), self._err.data_ptr(), self._prefetch.data_ptr(),
            int(self.watchdog_s * 1e9), steps, self._counter_step.data_ptr(), self._tokens_out.data_ptr(), *ids,
            shared_size=self.dyn_smem)

    def check(self) -> None:
        """Synchronise and raise GpuFault / WatchdogTimeout from the error record."""
        import pycuda.driver as drv
        import torch

        try:
            torch.cuda.synchronize(self.dev.index)
            drv.Context.synchronize()
        except (RuntimeError, drv.Error) as e:
            raise GpuFault(f"the VM launch failed: {e}") from None
        err = self._err.cpu().tolist()
        if err[0] == 0:
            return
        code, sm, gi, op, counter, value, threshold, extra = err
        task = self.order[gi] if 0 <= gi < len(self.order) else None
        tid = task.id if task else None
        opname = ir.OPS_BY_CODE[op].name if op in ir.OPS_BY_CODE else f"opcode {op}"
        where = f"task {tid} ({opname}) on SM {sm}"
        if self._steps > 1 and code in (FAULT_WATCHDOG, FAULT_BAD_OPCODE):  # the VM's own faults record the step
            where += f" in step {extra} of {self._steps}"
        kw = dict(code=code, task=tid, op=opname, sm=sm, counter=counter, value=value, threshold=threshold)
        if code == FAULT_WATCHDOG:
            raise WatchdogTimeout(
                f"watchdog: {where} waited more than {self.watchdog_s:g} s for counter {counter} >= "
                f"{threshold} (value {value}); the kernel aborted", **kw)
        if code == FAULT_BAD_OPCODE:
            raise GpuFault(f"bad opcode {op} at {where}", **kw)
        if code == FAULT_BAD_INPUT:
            raise GpuFault(f"{where}: runtime input {value} out of range (limit {threshold})", **kw)
        raise GpuFault(f"unknown fault code {code} at {where}", **kw)

    def run_step(self, token: int, pos: int) -> Any:
        """One decode step: write inputs, launch, wait, check. Returns a copy of the logits."""
        self.set_inputs(token, pos)
        self.launch()
        self.check()
        lid = self._ids["logits"]
        return self.tensors[lid].clone() if lid is not None else None

    def next_token(self) -> int | None:
        nid = self._ids["next_token"]
        return int(self.tensors[nid][0]) if nid is not None else None

    def time_step(self, token: int = 0, pos: int = 0, *, warmup: int = 3, iters: int = 20,
                  flush_l2: bool = True) -> Timing:
        """Median kernel time (CUDA events) of ``iters`` launches after ``warmup``.

        With ``flush_l2`` a buffer twice the L2 size is overwritten before each launch
        (outside the timed region), so weights come from HBM as in a real decode.
        """
        self.run_step(token, pos)  # faults surface here, before any timing
        samples = self._timed_launches(1, warmup, iters, flush_l2)
        return Timing(statistics.median(samples), samples, self.dev.name, flush_l2)

    def _timed_launches(self, steps: int, warmup: int, iters: int, flush_l2: bool,
                        inputs: tuple[int, int] | None = None) -> list[float]:
        """Microseconds of ``iters`` launches of ``steps`` steps (CUDA events around each) after
        ``warmup``. Outside each timed region: ``inputs`` (token, pos) rewritten (a K-step launch
        advances them in place), the L2 flushed with ``flush_l2``, the counters reset. Checks faults."""
        import torch

        flush = torch.empty(2 * self.dev.l2_bytes, dtype=torch.uint8, device=f"cuda:{self.dev.index}") \
            if flush_l2 else None
        from pytest_amk.devices import exclusive_gpu

        events = []
        with exclusive_gpu():  # never timed while another worker's timed region shares this GPU
            for _ in range(warmup + iters):
                if inputs is not None:
                    self.set_inputs(*inputs)
                if flush is not None:
                    flush.fill_(1)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                self._reset()
                start.record()
                self._launch_raw(steps)
                end.record()
                events.append((start, end))
            self.check()
        return [1000.0 * s.elapsed_time(e) for s, e in events[warmup:]]

    # -- K tokens in one launch (pytest_amk/multistep.py, vm/amk_vm.cu) ----------------------
    def step_plan(self) -> Any:
        """The proof that this program may run K steps in one launch (once per runner);
        raises multistep.MultiStepError when it may not."""
        if self._step_plan is None:
            from pytest_amk.multistep import prove

            target = ir.TARGETS.get(str(self.program.meta.get("target", "h100")))
            self._step_plan = prove(self.program, target)
        return self._step_plan

    def _prepare_tokens(self, token: int, pos: int, k: int) -> None:
        """Prove (once), check the request, write the inputs; raises before any launch."""
        import torch

        from pytest_amk.multistep import check_request

        check_request(self.step_plan(), pos, k)
        self.set_inputs(token, pos)
        if self._tokens_out.numel() < k:
            self._tokens_out = torch.zeros(k, dtype=torch.int32, device=self._counters.device)

    def run_tokens(self, token: int, pos: int, k: int) -> list[int]:
        """Greedy-decode ``k`` tokens in one launch from ``token`` at ``pos``: token i is the argmax
        of the step at position pos + i (the per-token path's ``next_token`` after each step).
        The logits left behind are the last step's; ``k == 1`` is a plain ``run_step``."""
        from pytest_amk.multistep import check_k

        if check_k(k) == 1:  # the one-step kernel path, unchanged (set_inputs refuses bad positions)
            self.run_step(token, pos)
            nt = self.next_token()
            return [] if nt is None else [nt]
        self._prepare_tokens(token, pos, k)
        self.launch(k)
        self.check()
        return [int(t) for t in self._tokens_out[:k].cpu().tolist()]

    def time_tokens(self, token: int, pos: int, k: int, *, warmup: int = 2, iters: int = 10,
                    flush_l2: bool = True) -> Timing:
        """Per-token latency of a K-token launch: the median over ``iters`` launches (CUDA events
        around each launch, after ``warmup``) divided by ``k``; ``extra["launch_us"]`` is the
        launch. Inputs are rewritten and the L2 flushed (``flush_l2``) outside the timed region."""
        self.run_tokens(token, pos, k)  # proof and faults surface here, before any timing
        if k == 1:
            t = self.time_step(token, pos, warmup=warmup, iters=iters, flush_l2=flush_l2)
            t.extra.update(k=1, launch_us=t.median_us)
            return t
        launches = self._timed_launches(k, warmup, iters, flush_l2, inputs=(token, pos))
        med = statistics.median(launches)
        return Timing(med / k, [x / k for x in launches], self.dev.name, flush_l2,
                      {"k": k, "launch_us": med, "launch_samples_us": launches})

    def read_trace(self) -> Any:
        """The last launch's trace as int64 [instruction (queue order), point, (ns, cycles)]."""
        if self._trace is None:
            raise ValueError("this runner was not built with trace=True")
        self.check()
        return self._trace.cpu().numpy()

    def resources(self) -> dict[str, Any]:
        """What the launch uses, for reports."""
        return {"registers": self.kernel.num_regs, "static_smem": self.kernel.static_smem,
                "local_bytes": self.kernel.local_bytes, "dynamic_smem": self.dyn_smem, "grid": self.grid,
                "threads": self.config.threads, "pipe": self.config.pipe, "dtype": self.config.dtype,
                "arch": self.config.arch, "device": self.dev.name, "sm_count": self.dev.sm_count}
