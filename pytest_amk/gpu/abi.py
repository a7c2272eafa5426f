"""The instruction ABI between the host and the CUDA VM, emitted from ir.py's definitions.

encode_task packs a Task into the fixed INSTR_WORDS int32 words that the VM's queues hold;
cuda_header is the generated header (amk_ir.h) that gives the VM the same opcodes, word
layout and param slots. Both read only pytest_amk/ir.py (OPS and its constants): one source
of truth, no hand-synced copy.
"""

from __future__ import annotations

import struct

from pytest_amk.ir import (
    ATTN_CHUNK_BYTES,
    HEADER_WORDS,
    INSTR_WORDS,
    IR_VERSION,
    MAX_HEAD_DIM,
    MAX_WAITS,
    NO_BUFFER,
    NO_COUNTER,
    OPS,
    OPS_BY_NAME,
    PARAM_WORDS,
    PREFETCH_RANGES,
    Task,
)

# Places inside ops where a traced build (tools/trace_vm.py --build trace_mark=NAME) takes an
# instruction's last timing point instead of after the op, to time the first part of an op.
# Each is AMK_MARK_<NAME> in the generated header and an AMK_TRACE_AT in vm/.
TRACE_MARKS = (
    "attn_prologue",  # an attention task's inputs staged (q roped, KV chunk 0), before its blocks
    "attn_blocks",    # an attention task's scores, softmax and P.V done, before it writes partials
    "gemv_staged",    # a GEMV or LM-head task's input staged (and normalised), before its rows
)


def float_bits(x: float) -> int:
    """The int32 word holding float32 ``x`` (a float param)."""
    return struct.unpack("<i", struct.pack("<f", float(x)))[0]


def encode_task(task: Task) -> list[int]:
    """The task as INSTR_WORDS int32 words (layout in the generated CUDA header)."""
    spec = OPS_BY_NAME[task.op]
    if len(task.waits) > MAX_WAITS:
        raise ValueError(f"task {task.id}: {len(task.waits)} waits, the instruction holds {MAX_WAITS}")
    words = [spec.code, NO_COUNTER if task.signal is None else task.signal]
    for i in range(MAX_WAITS):
        if i < len(task.waits):
            words += [task.waits[i].counter, task.waits[i].threshold]
        else:
            words += [NO_COUNTER, 0]
    for p in spec.params:
        v = task.params.get(p, NO_BUFFER if p in spec.optional else None)
        if v is None:
            raise ValueError(f"task {task.id} ({task.op}): missing param {p!r}")
        words.append(float_bits(v) if p in spec.float_params else int(v))
    words += [0] * (INSTR_WORDS - len(words))
    return words


def cuda_header() -> str:
    """The generated CUDA header: opcode numbers, instruction layout, param slots."""
    lines = [
        "// Generated from pytest_amk/ir.py by pytest_amk.gpu.abi.cuda_header(): do not edit.",
        "#pragma once",
        f"#define AMK_IR_VERSION {IR_VERSION}",
        f"#define AMK_MAX_WAITS {MAX_WAITS}",
        f"#define AMK_HEADER_WORDS {HEADER_WORDS}",
        f"#define AMK_PARAM_WORDS {PARAM_WORDS}",
        f"#define AMK_INSTR_WORDS {INSTR_WORDS}",
        "#define AMK_W_OP 0",
        "#define AMK_W_SIGNAL 1",
        "#define AMK_W_WAIT_COUNTER(i) (2 + 2 * (i))",
        "#define AMK_W_WAIT_THRESHOLD(i) (3 + 2 * (i))",
        f"#define AMK_NO_COUNTER ({NO_COUNTER})",
        f"#define AMK_NO_BUFFER ({NO_BUFFER})",
        f"#define AMK_MAX_HEAD_DIM {MAX_HEAD_DIM}",
        f"#define AMK_ATTN_CHUNK_BYTES {ATTN_CHUNK_BYTES}",
        f"#define AMK_PF_RANGES {PREFETCH_RANGES}",
    ]
    for i, mark in enumerate(TRACE_MARKS):
        lines.append(f"#define AMK_MARK_{mark.upper()} {i + 1}")
    for op in OPS:
        lines.append(f"#define OP_{op.name} {op.code}")
    for op in OPS:
        for i, p in enumerate(op.params):
            lines.append(f"#define P_{op.name}_{p.upper()} ({HEADER_WORDS} + {i})")
    return "\n".join(lines) + "\n"
