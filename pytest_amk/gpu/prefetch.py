"""The L2 prefetch plan of a launch: which weight bytes each instruction asks L2 for before its
wait (its own first bytes, and for the tasks before a big one, that task's first bytes: the
lookahead), and how many bytes by default on each card. Plain Python and numpy, tested without
a GPU; the VM issues the table's ranges (vm/amk_vm.cu prefetch_weights).
"""

from __future__ import annotations

from typing import Any

from pytest_amk import ir
from pytest_amk.gpu.errors import ProgramCheckError
from pytest_amk.schedule import KNOBS

# L2 prefetch of an instruction's first weight bytes (0: off), split evenly over its weight ranges
# (the default of the schedule knob prefetch.own_kb). Measured on an H100 (1B shape,
# tools/trace_vm.py): 64 KB per range let the gate/up level's two ranges flood HBM just as the O
# projection ends (that sync gap 2.3 us; 1.2 us at 32 KB a range);
# 64 KB per instruction: 1185.5 -> 1176.5 us, 48 KB: 1165.6 us, 96 KB: 1197.1 us.
DEFAULT_PREFETCH_BYTES = KNOBS["prefetch.own_kb"].default << 10
# Lookahead (0: off; what the knob prefetch.lookahead_kb's default -1 means on most cards): a big
# weight task's first bytes (split evenly over its ranges), prefetched into L2 while the small
# latency-bound stages before it run and HBM would idle. Measured on an
# H100 (1B shape, dev A/B in one process, 4 alternating rounds): 1099.7 us without; 256 KB
# 1087.0 us (the gate/up level 390 -> 341 us, but the attention stage's sync gaps grow with the
# traffic: issued right after the qkv projection, 1090.9 us); 128 KB 1090.3, 192 KB 1092.6,
# 384 KB 1093.9 us. Since it goes out only after an attention task (LOOKAHEAD_AFTER; 64 SMs a
# layer instead of all), 384 KB: 1060.1 / 1092.1 us at context 16 / 512 against 1070.6 / 1094.1
# for 256 KB after an attention or combine task (two runs agree: -7.2 / -1.1 in the other);
# 448 KB 1063.6 / 1094.6 (tools/ab_vm.py, session 6).
DEFAULT_LOOKAHEAD_BYTES = 384 << 10
# Cards where the lookahead measured slower (a substring of the device name -> bytes). H200 (1B
# shape, wide-blocks, tools/ab_vm.py, 4 alternating rounds, us at context 16 / 512): without
# 900.6 / 913.0, with 256 KB 903.3 / 929.9, with 128 KB 902.4 / 918.4 (placed by LOOKAHEAD_MIN_GAP
# alone; with the session-5 placement, 256 KB cost 12 / 26 us). With the LOOKAHEAD_AFTER placement
# (session 9, knob prefetch.lookahead_kb): off 880.7 / 895.3, 128 KB 876.3 / 897.0, 256 KB 876.4 /
# 903.1, 384 KB 879.7 / 912.2; own prefetch 32 / 64 / 96 KB instead of 48: 889.3, 884.7, 913.8 at
# context 16. Its faster HBM leaves a shorter idle window, and the flood still slows the attention
# chain: at most 4 us gained at context 16 and lost again at 512.
LOOKAHEAD_BYTES_BY_DEVICE = {"H200": 0}


def default_lookahead_bytes(device_name: str) -> int:
    """The lookahead a GpuRunner uses on this card unless told otherwise."""
    for key, n in LOOKAHEAD_BYTES_BY_DEVICE.items():
        if key in device_name.upper():
            return n
    return DEFAULT_LOOKAHEAD_BYTES


def prefetch_sizes(meta: dict[str, Any], device_name: str, prefetch_bytes: int | None = None,
                   lookahead_bytes: int | None = None) -> tuple[int, int]:
    """(own, lookahead) L2 prefetch bytes of a launch: the arguments where given, else the
    program's (meta "prefetch", from the schedule's prefetch.* knobs), else the defaults; a
    lookahead of None is the card's (default_lookahead_bytes). Raises ProgramCheckError for a
    malformed meta entry."""
    pf = meta.get("prefetch", {}) if isinstance(meta, dict) else {}
    if not isinstance(pf, dict):
        raise ProgramCheckError(f"meta.prefetch must be an object, got {pf!r}")
    for key in ("own_bytes", "lookahead_bytes"):
        v = pf.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise ProgramCheckError(f"meta.prefetch.{key} must be a non-negative integer or null, got {v!r}")
    own = prefetch_bytes if prefetch_bytes is not None else pf.get("own_bytes")
    look = lookahead_bytes if lookahead_bytes is not None else pf.get("lookahead_bytes")
    return (DEFAULT_PREFETCH_BYTES if own is None else own,
            default_lookahead_bytes(device_name) if look is None else look)


LOOKAHEAD_MIN_BYTES = 128 << 10  # a "big" task: gate/up, down and LM head tiles of the 1B shape
# The lookahead goes out only where at least this many small tasks lie between two big ones, after
# the second, and only when that is an attention task (past the qkv projection and the attention:
# HBM idles then). Where the O projection follows qkv directly (SMs without an attention task in
# that layer), issuing it right after qkv floods HBM while other SMs still stream qkv, which delays
# the whole level; after a combine task it overlaps the O projection. Measured on an H100 (1B
# shape, tools/ab_vm.py, 4 rounds, us at context 16 / 512, 256 KB): from every SM 1092.0 /
# 1117.9; after an attention or combine task 1072.1 / 1094.7; after an attention task only
# 1068.4 / 1095.7 (the same; with 384 KB faster, see DEFAULT_LOOKAHEAD_BYTES); the other SMs'
# lookahead issued with gate/up's own prefetch instead 1082.3 / 1107.0, or lent to another SM's
# carrier 1084.0 / 1111.7.
LOOKAHEAD_MIN_GAP = 3
LOOKAHEAD_AFTER = ("ATTN_PARTIAL", "ROPE_ATTN_PARTIAL")


def _weight_ranges(program: ir.Program, t: ir.Task, ptrs: Any) -> list[tuple[int, int]]:
    """(start, end) device addresses of a GEMV / LM_HEAD task's weight rows (gate, then up)."""
    if t.op not in ("GEMV", "LM_HEAD"):
        return []
    p = t.params
    w, k, lo, hi = p["weight"], p["k"], p["n_lo"], p["n_hi"]
    row_bytes = k * program.buffers[w].dtype.nbytes
    rows = [lo] + ([p["up_row"] + lo] if t.op == "GEMV" and p["act"] == 1 else [])
    return [(int(ptrs[w]) + r * row_bytes, int(ptrs[w]) + (r + hi - lo) * row_bytes) for r in rows]


def _span(start: int, end: int, skip: int, budget: int) -> tuple[int, int]:
    """(address, bytes) of at most ``budget`` bytes of [start + skip, end), 16-byte aligned and
    sized as the bulk prefetch wants; (0, 0) when under 16 bytes."""
    a = (start + skip + 15) & ~15
    n = min(budget, end - a) & ~15
    return (a, n) if n >= 16 else (0, 0)


def prefetch_table(program: ir.Program, order: list[ir.Task], ptrs: Any, cap: int,
                   lookahead: int = 0, big: int = LOOKAHEAD_MIN_BYTES) -> Any:
    """Per instruction (queue order) ir.PREFETCH_RANGES (address, bytes) L2 prefetch ranges,
    issued just before it (after the previous op of its queue).

    Slots 0-1: its own first weight bytes, ``cap`` in all, split evenly over its ranges.
    Slots 2-3: with ``lookahead`` > 0, the first ``lookahead`` bytes (split the same way) of the
    queue's next big task (weights of at least ``big`` bytes), which then skips them in its own
    slots. They go out after the second instruction past the previous big task (past the qkv
    projection that follows down, then the attention task), only when at least
    LOOKAHEAD_MIN_GAP small tasks lie between the two big ones and that second one is an
    attention task (LOOKAHEAD_AFTER: not on an SM whose O projection follows qkv directly, or
    that runs a combine task instead; never for down right after gate/up, or the LM head right
    after down).
    ``ptrs``: buffer id -> device address. Plain numpy: tested without a GPU."""
    import numpy as np

    pf = np.zeros((max(1, len(order)), ir.PREFETCH_RANGES, 2), dtype=np.int64)
    ranges = [_weight_ranges(program, t, ptrs) for t in order]
    skip = [[0, 0] for _ in order]
    if lookahead > 0:
        queues: dict[int, list[int]] = {}
        for i, t in enumerate(order):
            queues.setdefault(t.sm, []).append(i)
        for q in queues.values():
            prev = -1  # queue position of the previous big task
            for pos, i in enumerate(q):
                if sum(e - s for s, e in ranges[i]) < big:
                    continue
                # After the second small task. The first big task of a queue (layer 0's gate/up)
                # counts EMBED as one, so it gets none (measured so; one layer in 16).
                at = prev + 3
                if pos - prev - 1 >= LOOKAHEAD_MIN_GAP and order[q[at - 1]].op in LOOKAHEAD_AFTER:
                    for r, (start, end) in enumerate(ranges[i]):
                        a, n = _span(start, end, 0, lookahead // len(ranges[i]))
                        pf[q[at], 2 + r] = (a, n)
                        skip[i][r] = a + n - start if n else 0
                prev = pos
    if cap > 0:
        for i, rs in enumerate(ranges):
            for r, (start, end) in enumerate(rs):
                pf[i, r] = _span(start, end, skip[i][r], cap // len(rs))
    return pf
