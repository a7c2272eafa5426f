"""The task-program IR: buffers, counters, tasks, opcodes and GPU targets.

This module is the single source of truth for opcode numbers, their parameter
layouts and the fixed-size GPU instruction format; the CUDA header in vm/ is
generated from it (``pytest_amk.gpu.abi.cuda_header``). Nothing here imports torch.

Semantics (DESIGN §5): counters start at 0 and only increase. A task starts when
every wait has ``value(counter) >= threshold``, does its reads and writes, then
adds 1 to its ``signal`` counter. Tasks with the same ``sm`` run one at a time in
the order they appear in ``Program.tasks``.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

IR_VERSION = 1

# Fixed GPU instruction: 8 header words + PARAM_WORDS parameter words, all int32.
MAX_WAITS = 4
MAX_GROUP_HEADS = 1024  # query heads per KV head an attention task may serve
HEADER_WORDS = 2 + 2 * MAX_WAITS  # op, signal, then (counter, threshold) * MAX_WAITS
PARAM_WORDS = 22
INSTR_WORDS = HEADER_WORDS + PARAM_WORDS  # 32 words = 128 bytes
NO_COUNTER = -1
NO_BUFFER = -1
MAX_HEAD_DIM = 256  # the VM keeps a key row per lane group in registers
# Attention stages its KV block in shared memory in chunks of at most this many bytes (K and V).
ATTN_CHUNK_BYTES = 32 << 10
# L2 prefetch ranges per instruction (the host's table, the VM's loop): two of its own weight
# ranges (gate and up of a SiLU-mul GEMV) and two of a later instruction's (lookahead).
PREFETCH_RANGES = 4
# The opcodes that take head_dim and max_seq params (RoPE and attention over the KV cache).
HEAD_OPS = ("ROPE_APPEND", "ATTN_PARTIAL", "ROPE_ATTN_PARTIAL")


class DType(enum.StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT32 = "int32"

    @property
    def nbytes(self) -> int:
        return {"fp32": 4, "fp16": 2, "bf16": 2, "int32": 4}[self.value]

    def torch(self) -> Any:
        import torch

        return {
            "fp32": torch.float32,
            "fp16": torch.float16,
            "bf16": torch.bfloat16,
            "int32": torch.int32,
        }[self.value]


MODEL_DTYPES = (DType.FP32, DType.FP16, DType.BF16)


class BufferKind(enum.StrEnum):
    WEIGHT = "weight"  # read-only model parameters (never written by a task)
    ACTIVATION = "activation"  # scratch written and read within one step
    KV = "kv"  # persistent state across steps (KV cache)
    INPUT = "input"  # written by the host before launch (token, position, length)
    OUTPUT = "output"  # every element written by the program


@dataclass(frozen=True)
class OpSpec:
    """An opcode: its number, ordered params (int words in the instruction) and doc.

    ``buffer_params`` name the params that hold buffer ids; ``float_params`` are
    stored as the bit pattern of a float32. ``-1`` is "none" for optional ids.
    """

    name: str
    code: int
    params: tuple[str, ...]
    buffer_params: tuple[str, ...]
    float_params: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    doc: str = ""


# The opcodes. The reference VM (refvm.py) and the CUDA VM (vm/) implement each
# exactly as its doc says; accumulation is fp32, results are rounded to the
# output buffer's dtype once.
OPS: tuple[OpSpec, ...] = (
    OpSpec("NOP", 0, (), (), doc="Does nothing (queue padding)."),
    OpSpec(
        "EMBED", 1, ("token", "table", "out", "lo", "hi", "hidden"), ("token", "table", "out"),
        doc="out[i] = table[token[0] * hidden + i] for i in [lo, hi).",
    ),
    OpSpec(
        "RMSNORM", 2, ("inp", "weight", "out", "lo", "hi", "n", "eps"), ("inp", "weight", "out"),
        float_params=("eps",),
        doc="r = rsqrt(mean(inp[0:n]^2) + eps) in fp32; out[i] = round(inp[i]*r) * weight[i], i in [lo, hi).",
    ),
    OpSpec(
        "GEMV", 3,
        ("inp", "weight", "out", "n_lo", "n_hi", "k", "norm_weight", "eps", "residual", "act", "up_row",
         "inp_blocks", "head_dim"),
        ("inp", "weight", "out", "norm_weight", "residual"),
        float_params=("eps",),
        optional=("norm_weight", "residual"),
        doc=(
            "x = inp[0:k]; if inp_blocks > 0, inp is instead an fp32 attention partial buffer of k/head_dim "
            "heads x inp_blocks blocks and x = ATTN_COMBINE of all of them rounded to dtype (the combine "
            "fused into its consumer). If norm_weight: x = RMSNORM(x) rounded to dtype. "
            "y_i = sum_j weight[i*k + j] * x[j] (fp32). act=0: v = y_i; act=1 (SiLU-mul): "
            "v = round(silu(round(y_i))) * round(y_(up_row+i)) with up rows at up_row+i. "
            "If residual: out[i] = round(residual[i] + round(v)) else out[i] = round(v); i in [n_lo, n_hi)."
        ),
    ),
    OpSpec(
        "ROPE_APPEND", 4,
        ("qkv", "rope", "pos", "q_out", "k_cache", "v_cache", "kv_head", "n_heads", "n_kv_heads",
         "head_dim", "max_seq"),
        ("qkv", "rope", "pos", "q_out", "k_cache", "v_cache"),
        doc=(
            "For kv head g=kv_head with rep = n_heads/n_kv_heads: q heads h in [g*rep, (g+1)*rep) "
            "get q_out[h*D:(h+1)*D] = rope(qkv[h*D:(h+1)*D], pos[0]); k head g (qkv offset "
            "n_heads*D + g*D) is roped and stored at k_cache[(g*max_seq + pos)*D:+D]; v head g "
            "(offset (n_heads+n_kv_heads)*D + g*D) is copied to v_cache likewise. rope is the "
            "fp32 table [max_seq, D/2, 2] of (cos, sin); rotate-half convention: "
            "x'[i] = x[i]c_i - x[i+D/2]s_i, x'[i+D/2] = x[i+D/2]c_i + x[i]s_i."
        ),
    ),
    OpSpec(
        "ATTN_PARTIAL", 5,
        ("q", "k_cache", "v_cache", "seq_len", "partial", "kv_head", "blk", "kv_block", "n_heads",
         "n_kv_heads", "head_dim", "max_seq", "n_blocks", "scale"),
        ("q", "k_cache", "v_cache", "seq_len", "partial"),
        float_params=("scale",),
        doc=(
            "Positions p in [blk*kv_block, min(seq_len[0], (blk+1)*kv_block)). For each q head h of "
            "kv head g: s_p = scale * q_h . k_p (fp32); m = max s_p; l = sum exp(s_p - m); "
            "o = sum exp(s_p - m) v_p. Writes fp32 partial[(h*n_blocks + blk)*(D+2):+D+2] = "
            "(m, l, o[0:D]); an empty range writes (-inf, 0, 0...)."
        ),
    ),
    OpSpec(
        "ATTN_COMBINE", 6,
        ("partial", "out", "head_lo", "head_hi", "n_blocks", "head_dim"),
        ("partial", "out"),
        doc=(
            "For h in [head_lo, head_hi): M = max_b m_b; out[h*D + d] = "
            "sum_b exp(m_b - M) o_b[d] / sum_b exp(m_b - M) l_b (blocks with l_b = 0 skipped)."
        ),
    ),
    OpSpec(
        "ROPE_ATTN_PARTIAL", 11,
        ("qkv", "rope", "pos", "k_cache", "v_cache", "seq_len", "partial", "kv_head", "blk", "kv_block",
         "n_heads", "n_kv_heads", "head_dim", "max_seq", "n_blocks", "scale"),
        ("qkv", "rope", "pos", "k_cache", "v_cache", "seq_len", "partial"),
        float_params=("scale",),
        doc=(
            "ROPE_APPEND fused into ATTN_PARTIAL (one sync level less): the q heads of kv head g are "
            "roped from qkv (rounded to dtype) in the task; the task whose block holds pos[0] also "
            "writes k head g (roped) and v head g to the caches at pos, as ROPE_APPEND does; then "
            "ATTN_PARTIAL over the block with those q heads."
        ),
    ),
    OpSpec(
        "ADD", 7, ("a", "b", "out", "lo", "hi"), ("a", "b", "out"),
        doc="out[i] = round(a[i] + b[i]) for i in [lo, hi).",
    ),
    OpSpec(
        "SILU_MUL", 8, ("inp", "out", "lo", "hi", "up_off"), ("inp", "out"),
        doc="out[i] = round(silu(inp[i])) * inp[up_off + i] for i in [lo, hi) (fp32 math, rounded).",
    ),
    OpSpec(
        "LM_HEAD", 9,
        ("inp", "weight", "out", "n_lo", "n_hi", "k", "norm_weight", "eps", "amax", "tile"),
        ("inp", "weight", "out", "norm_weight", "amax"),
        float_params=("eps",),
        optional=("norm_weight",),
        doc=(
            "As GEMV (no act, no residual) but out is fp32 logits; also writes "
            "amax[2*tile:2*tile+2] = (max logit of the tile, its smallest row index as float)."
        ),
    ),
    OpSpec(
        "ARGMAX", 10, ("amax", "n_tiles", "out"), ("amax", "out"),
        doc="out[0] = index of the largest amax value over n_tiles tiles (smallest index on ties).",
    ),
)

OPS_BY_NAME: dict[str, OpSpec] = {op.name: op for op in OPS}
OPS_BY_CODE: dict[int, OpSpec] = {op.code: op for op in OPS}
assert all(len(op.params) <= PARAM_WORDS for op in OPS)


@dataclass(frozen=True)
class GpuTarget:
    """What the lowering and the validator need to know about a GPU."""

    name: str
    arch: str  # nvcc arch, e.g. "sm_90"
    sm_count: int
    smem_per_block: int  # bytes, opt-in maximum for one block
    smem_per_sm: int
    regs_per_sm: int
    max_threads_per_block: int
    max_threads_per_sm: int
    hbm_gbps: float  # spec bandwidth, GB/s
    l2_bytes: int


TARGETS: dict[str, GpuTarget] = {
    t.name: t
    for t in (
        GpuTarget("h100", "sm_90", 132, 227 * 1024, 228 * 1024, 65536, 1024, 2048, 3350.0, 50 << 20),
        GpuTarget("h200", "sm_90", 132, 227 * 1024, 228 * 1024, 65536, 1024, 2048, 4800.0, 50 << 20),
        GpuTarget("a100", "sm_80", 108, 163 * 1024, 164 * 1024, 65536, 1024, 2048, 2039.0, 40 << 20),
        GpuTarget("rtx5090", "sm_120", 170, 99 * 1024, 100 * 1024, 65536, 1024, 1536, 1792.0, 96 << 20),
        GpuTarget("l4", "sm_89", 58, 99 * 1024, 100 * 1024, 65536, 1024, 1536, 300.0, 48 << 20),
    )
}


def get_target(name: str) -> GpuTarget:
    try:
        return TARGETS[name]
    except KeyError:
        raise KeyError(f"unknown GPU {name!r}; known: {', '.join(sorted(TARGETS))}") from None


@dataclass(frozen=True)
class Region:
    """Half-open element range [lo, hi) of a flattened buffer."""

    buffer: int
    lo: int
    hi: int
    mode: str = "write"  # for writes: "write" or "accumulate" (atomic add)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"buffer": self.buffer, "lo": self.lo, "hi": self.hi}
        if self.mode != "write":
            d["mode"] = self.mode
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> Region:
        return Region(int(d["buffer"]), int(d["lo"]), int(d["hi"]), str(d.get("mode", "write")))


@dataclass(frozen=True)
class Wait:
    counter: int
    threshold: int


@dataclass(frozen=True)
class Buffer:
    id: int
    name: str
    kind: BufferKind
    dtype: DType
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.nbytes


@dataclass(frozen=True)
class Counter:
    id: int
    name: str


@dataclass
class Task:
    id: int
    op: str
    sm: int
    reads: list[Region]
    writes: list[Region]
    waits: list[Wait]
    signal: int | None
    params: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "op": self.op,
            "sm": self.sm,
            "reads": [r.to_json() for r in self.reads],
            "writes": [r.to_json() for r in self.writes],
            "waits": [{"counter": w.counter, "threshold": w.threshold} for w in self.waits],
            "signal": self.signal,
            "params": dict(self.params),
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> Task:
        return Task(
            id=int(d["id"]),
            op=str(d["op"]),
            sm=int(d["sm"]),
            reads=[Region.from_json(r) for r in d.get("reads", [])],
            writes=[Region.from_json(r) for r in d.get("writes", [])],
            waits=[Wait(int(w["counter"]), int(w["threshold"])) for w in d.get("waits", [])],
            signal=None if d.get("signal") is None else int(d["signal"]),
            params=dict(d.get("params", {})),
        )


@dataclass
class Program:
    """A lowered decode step. ``meta`` holds the target name, the model config,
    the schedule's knobs and the kernel-build settings (threads, pipelining)."""

    buffers: list[Buffer]
    counters: list[Counter]
    tasks: list[Task]
    meta: dict[str, Any] = field(default_factory=dict)

    # -- lookups ---------------------------------------------------------
    def buffer(self, name: str) -> Buffer:
        for b in self.buffers:
            if b.name == name:
                return b
        raise KeyError(name)

    @property
    def num_sms(self) -> int:
        return int(self.meta.get("num_sms", 1 + max((t.sm for t in self.tasks), default=0)))

    def queues(self) -> list[list[Task]]:
        """Tasks per SM in queue order."""
        qs: list[list[Task]] = [[] for _ in range(self.num_sms)]
        for t in self.tasks:
            qs[t.sm].append(t)
        return qs

    def weight_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers if b.kind is BufferKind.WEIGHT)

    def sync_skeleton(self) -> Program:
        """The same queues, waits and signals with every task a NOP. Timed on a GPU it gives the
        step's synchronisation cost alone, a floor of its own beside the bandwidth floor."""
        tasks = [Task(t.id, "NOP", t.sm, [], [], list(t.waits), t.signal, {}) for t in self.tasks]
        return Program(self.buffers, self.counters, tasks, dict(self.meta))

    def without_waits(self) -> Program:
        """The same tasks with every wait dropped: each queue runs its tasks back to back. Timed on
        a GPU it gives the step's work alone, a lower bound of the step beside the sync skeleton.
        Its tasks race (the validator rejects it) and its results mean nothing: time it only."""
        tasks = [Task(t.id, t.op, t.sm, list(t.reads), list(t.writes), [], t.signal, dict(t.params))
                 for t in self.tasks]
        return Program(self.buffers, self.counters, tasks, dict(self.meta))

    # -- JSON ------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "version": IR_VERSION,
            "meta": self.meta,
            "buffers": [
                {"id": b.id, "name": b.name, "kind": b.kind.value, "dtype": b.dtype.value,
                 "shape": list(b.shape)}
                for b in self.buffers
            ],
            "counters": [{"id": c.id, "name": c.name} for c in self.counters],
            "tasks": [t.to_json() for t in self.tasks],
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        """Content hash: two programs with the same digest are the same program."""
        return hashlib.sha256(self.dumps().encode()).hexdigest()[:16]

    @staticmethod
    def from_json(d: dict[str, Any]) -> Program:
        """Parse program JSON. Raises ValueError naming the offending field."""
        if not isinstance(d, dict):
            raise ValueError("program JSON must be an object")
        version = d.get("version")
        if version != IR_VERSION:
            raise ValueError(f"version: expected {IR_VERSION}, got {version!r}")
        try:
            buffers = [
                Buffer(int(b["id"]), str(b["name"]), BufferKind(b["kind"]), DType(b["dtype"]),
                       tuple(int(s) for s in b["shape"]))
                for b in d["buffers"]
            ]
            counters = [Counter(int(c["id"]), str(c["name"])) for c in d["counters"]]
            tasks = [Task.from_json(t) for t in d["tasks"]]
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:  # Overflow: int(Infinity)
            raise ValueError(f"malformed program JSON: {type(e).__name__}: {e}") from None
        meta = d.get("meta", {})
        if not isinstance(meta, dict):
            raise ValueError("meta: must be an object")
        return Program(buffers, counters, tasks, meta)

    @staticmethod
    def loads(text: str) -> Program:
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:  # RecursionError: arrays or objects nested too deeply
            raise ValueError(f"not JSON: {e}") from None
        return Program.from_json(data)


# Buffer params whose dtype the op fixes; every other buffer param holds the model dtype.
FIXED_DTYPES: dict[tuple[str, str], DType] = {
    ("EMBED", "token"): DType.INT32, ("ROPE_APPEND", "pos"): DType.INT32, ("ROPE_APPEND", "rope"): DType.FP32,
    ("ATTN_PARTIAL", "seq_len"): DType.INT32, ("ATTN_PARTIAL", "partial"): DType.FP32,
    ("ATTN_COMBINE", "partial"): DType.FP32, ("ROPE_ATTN_PARTIAL", "pos"): DType.INT32,
    ("ROPE_ATTN_PARTIAL", "rope"): DType.FP32, ("ROPE_ATTN_PARTIAL", "seq_len"): DType.INT32,
    ("ROPE_ATTN_PARTIAL", "partial"): DType.FP32, ("LM_HEAD", "out"): DType.FP32, ("LM_HEAD", "amax"): DType.FP32,
    ("ARGMAX", "amax"): DType.FP32, ("ARGMAX", "out"): DType.INT32,
}


def buffer_dtype(op: str, name: str, params: dict[str, Any], model: DType) -> DType:
    """The dtype both VMs use for buffer param ``name`` of an ``op`` task (``model``: the model
    dtype; a GEMV's input is fp32 attention partials when it combines them, inp_blocks > 0)."""
    if op == "GEMV" and name == "inp" and int(params.get("inp_blocks", 0)) > 0:
        return DType.FP32
    return FIXED_DTYPES.get((op, name), model)


# -- resources (shared by the validator and the GPU launcher) -----------------------

SMEM_RESERVED = 256  # bytes the VM keeps for its own bookkeeping (reduction scratch)


def task_smem_bytes(program: Program, task: Task) -> int:
    """Dynamic shared memory the CUDA VM needs to run ``task``.

    GEMV and LM_HEAD stage the (normalised) input vector in fp32; ATTN_PARTIAL
    stages its q heads and one score per position of its block for each q head.
    """
    p = task.params
    if task.op in ("GEMV", "LM_HEAD"):
        blocks = int(p.get("inp_blocks", 0))
        heads = int(p["k"]) // max(1, int(p.get("head_dim", 0))) if blocks > 0 else 0
        return 4 * int(p["k"]) + 4 * (2 * heads * blocks + heads)  # + combine scratch (GEMV of partials)
    if task.op in ("ATTN_PARTIAL", "ROPE_ATTN_PARTIAL"):
        esize = DType(str(program.meta.get("dtype", "bf16"))).nbytes
        rep = int(p["n_heads"]) // max(1, int(p["n_kv_heads"]))
        d, ch = int(p["head_dim"]), attn_chunk(int(p["kv_block"]), int(p["head_dim"]), esize)
        # fp32: q and o accumulators [rep][D], scores [rep][chunk], (m, l, alpha) per head;
        # then (16-byte aligned: + 16) the K and V chunk in the model dtype, rows padded.
        return 4 * rep * (2 * d + ch + 3) + 2 * ch * (d + kv_pad(esize)) * esize + 16
    return 0


def gemv_input_len(k: int, inp_blocks: int, head_dim: int) -> int:
    """Elements of a GEMV's input: k, or the fp32 attention partials of k/head_dim heads x
    inp_blocks blocks (m, l, o[0:head_dim] each) when the combine is fused into it."""
    return k // head_dim * inp_blocks * (head_dim + 2) if inp_blocks else k


def kv_pad(esize: int) -> int:
    """Elements of padding per staged K/V row: 16 bytes, so rows stay 16-byte aligned (cp.async)
    and 8 consecutive rows put a 16-byte column in 8 distinct bank groups."""
    return 16 // esize


def attn_chunk(kv_block: int, head_dim: int, esize: int) -> int:
    """Positions of a KV block staged in shared memory at once (the VM computes the same)."""
    return max(1, min(kv_block, ATTN_CHUNK_BYTES // (2 * (head_dim + kv_pad(esize)) * esize)))


def buffer_table_bytes(program: Program) -> int:
    """The VM copies the table of buffer pointers into shared memory (16-byte aligned)."""
    return -(-8 * len(program.buffers) // 16) * 16


def program_smem_bytes(program: Program) -> int:
    """The kernel's dynamic shared memory: reserved scratch, the buffer table, and the
    largest need of any task."""
    return (SMEM_RESERVED + buffer_table_bytes(program)
            + max((task_smem_bytes(program, t) for t in program.tasks), default=0))


# Registers: a resident block of T threads gets 65536 / T registers per thread (at most
# 255); the VM needs about VM_BASE_REGS of them, and each 16-byte load in flight in
# GEMV holds 8 (two rows of 4 words). ptxas confirms every build within this cap is
# spill free (tests/test_vm_compile.py); the VM static_asserts the same cap. fp32 needs
# more for its wider staged vectors. (88/96 since GEMV splits a lone row over both slots.)
VM_BASE_REGS = 88
VM_BASE_REGS_FP32 = 96


def max_pipelining_depth(threads: int, dtype: str) -> int:
    """The most 16-byte weight loads in flight per lane the VM can hold in registers."""
    # ptxas sizes a one-block-per-SM register budget by the block rounded up to 128 threads.
    budget = min(255, 65536 // (-(-max(1, threads) // 128) * 128))
    base, most = (VM_BASE_REGS_FP32, 5) if dtype == "fp32" else (VM_BASE_REGS, 8)
    return max(1, min((budget - base) // 8, most))


# -- footprints (what each opcode reads and writes; used by the validator) -------------

def footprint(op: str, params: dict[str, Any]) -> list[tuple[str, str, int, int]]:
    """What opcode ``op`` reads and writes with ``params``: (param, "r"|"w", lo, hi) per range.

    This is the one definition of each opcode's footprint, derived from its doc in
    ``OPS``: ``param`` names the buffer-id param, [lo, hi) the elements of that buffer
    read ("r") or written ("w"). Ranges behind an optional buffer param set to -1 are
    still listed; callers skip them. Runtime values (token, pos, seq_len) are covered
    conservatively. Raises ValueError for params the op cannot run with. The validator
    checks declared task regions against it."""
    p = params
    if op == "EMBED":
        if p["hi"] > p["hidden"]:
            raise ValueError(f"hi = {p['hi']} exceeds hidden = {p['hidden']}")
        return [("token", "r", 0, 1), ("table", "r", p["lo"], p["hi"]), ("out", "w", p["lo"], p["hi"])]
    if op == "RMSNORM":
        lo, hi = p["lo"], p["hi"]
        return [("inp", "r", 0, p["n"]), ("weight", "r", lo, hi), ("out", "w", lo, hi)]
    if op in ("GEMV", "LM_HEAD"):
        lo, hi, k = p["n_lo"], p["n_hi"], p["k"]
        fp = [("inp", "r", 0, k), ("weight", "r", lo * k, hi * k), ("norm_weight", "r", 0, k),
              ("out", "w", lo, hi)]
        if op == "LM_HEAD":
            return fp + [("amax", "w", 2 * p["tile"], 2 * p["tile"] + 2)]
        if p["act"] not in (0, 1):
            raise ValueError(f"act = {p['act']} (expected 0 or 1)")
        if p["inp_blocks"] < 0 or (p["inp_blocks"] and (p["head_dim"] < 1 or k % p["head_dim"])):
            raise ValueError(f"inp_blocks = {p['inp_blocks']}, head_dim = {p['head_dim']} with k = {k}: "
                             "head_dim must divide k when the input is attention partials")
        if p["inp_blocks"]:
            fp[0] = ("inp", "r", 0, gemv_input_len(k, p["inp_blocks"], p["head_dim"]))
        if p["act"]:
            fp.append(("weight", "r", (p["up_row"] + lo) * k, (p["up_row"] + hi) * k))
        return fp + [("residual", "r", lo, hi)]
    if op in HEAD_OPS:
        nh, nkv, d, s, g = p["n_heads"], p["n_kv_heads"], p["head_dim"], p["max_seq"], p["kv_head"]
        if nkv < 1 or nh % nkv or d < 1 or s < 1 or not 0 <= g < nkv:
            raise ValueError(f"n_heads = {nh}, n_kv_heads = {nkv}, head_dim = {d}, max_seq = {s}, "
                             f"kv_head = {g} are inconsistent")
        rep = nh // nkv
        if rep > MAX_GROUP_HEADS:  # one write region per query head below: keep that list small
            raise ValueError(f"n_heads / n_kv_heads = {rep} query heads per KV head; at most {MAX_GROUP_HEADS}")
        q = (g * rep * d, (g + 1) * rep * d)
        if op == "ROPE_APPEND":
            if d % 2:
                raise ValueError(f"head_dim = {d} must be even for RoPE")
            kv = (g * s * d, (g + 1) * s * d)
            ko, vo = (nh + g) * d, (nh + nkv + g) * d
            return [("qkv", "r", *q), ("qkv", "r", ko, ko + d), ("qkv", "r", vo, vo + d),
                    ("rope", "r", 0, s * d), ("pos", "r", 0, 1), ("q_out", "w", *q),
                    ("k_cache", "w", *kv), ("v_cache", "w", *kv)]
        blk, kb, nb = p["blk"], p["kv_block"], p["n_blocks"]
        if kb < 1 or not 0 <= blk < nb:
            raise ValueError(f"blk = {blk}, kv_block = {kb}, n_blocks = {nb} are inconsistent")
        kv = ((g * s + blk * kb) * d, (g * s + min(s, (blk + 1) * kb)) * d)
        if op == "ROPE_ATTN_PARTIAL":
            if d % 2:
                raise ValueError(f"head_dim = {d} must be even for RoPE")
            ko, vo = (nh + g) * d, (nh + nkv + g) * d
            # The block's cache rows: read, and written at pos when pos falls in the block.
            ins = [("qkv", "r", *q), ("qkv", "r", ko, ko + d), ("qkv", "r", vo, vo + d),
                   ("rope", "r", 0, s * d), ("pos", "r", 0, 1), ("k_cache", "r", *kv), ("v_cache", "r", *kv),
                   ("k_cache", "w", *kv), ("v_cache", "w", *kv)]
        else:
            ins = [("q", "r", *q), ("k_cache", "r", *kv), ("v_cache", "r", *kv)]
        return ins + [("seq_len", "r", 0, 1)] + [
            ("partial", "w", (h * nb + blk) * (d + 2), (h * nb + blk + 1) * (d + 2))
            for h in range(g * rep, (g + 1) * rep)]
    if op == "ATTN_COMBINE":
        w, d = p["n_blocks"] * (p["head_dim"] + 2), p["head_dim"]
        return [("partial", "r", p["head_lo"] * w, p["head_hi"] * w),
                ("out", "w", p["head_lo"] * d, p["head_hi"] * d)]
    if op == "ADD":
        lo, hi = p["lo"], p["hi"]
        return [("a", "r", lo, hi), ("b", "r", lo, hi), ("out", "w", lo, hi)]
    if op == "SILU_MUL":
        lo, hi, up = p["lo"], p["hi"], p["up_off"]
        return [("inp", "r", lo, hi), ("inp", "r", up + lo, up + hi), ("out", "w", lo, hi)]
    if op == "ARGMAX":
        return [("amax", "r", 0, 2 * p["n_tiles"]), ("out", "w", 0, 1)]
    return []  # NOP

