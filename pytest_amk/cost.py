"""Analytic cost model: a predicted latency for a program on its target.

Each SM streams its tasks' bytes at its share of HBM bandwidth, each task pays a
fixed dispatch overhead, and each stage boundary on the critical path pays one
cross-SM synchronisation. The prediction is never below the roofline floor.
Constants are first guesses, to be calibrated against measured latencies.
"""

from __future__ import annotations

from pytest_amk.ir import BufferKind, GpuTarget, Program

TASK_OVERHEAD_US = 0.4
STAGE_SYNC_US = 1.0
ACHIEVABLE_BW_FRACTION = 0.9


def floor_us(program: Program, bandwidth_gbps: float, seq_len: int = 1) -> float:
    """Roofline floor: weight bytes plus the KV bytes read at ``seq_len``, over bandwidth."""
    kv = 0
    max_seq = int(program.meta.get("max_seq", 1))
    for b in program.buffers:
        if b.kind is BufferKind.KV:
            kv += b.nbytes * min(seq_len, max_seq) // max_seq
    return (program.weight_bytes() + kv) / (bandwidth_gbps * 1e3)


def predict_us(program: Program, target: GpuTarget, seq_len: int = 1) -> float:
    sizes = {b.id: b.dtype.nbytes for b in program.buffers}
    weights = {b.id for b in program.buffers if b.kind is BufferKind.WEIGHT}
    per_sm_bw = target.hbm_gbps * 1e3 * ACHIEVABLE_BW_FRACTION / program.num_sms  # bytes/us
    load = [0.0] * program.num_sms
    for t in program.tasks:
        # Weights are the traffic that matters; activations are tiny and mostly in L2.
        nbytes = sum((r.hi - r.lo) * sizes[r.buffer] for r in t.reads if r.buffer in weights)
        load[t.sm] += nbytes / per_sm_bw + TASK_OVERHEAD_US
    predicted = max(load) + STAGE_SYNC_US * len(program.counters)
    return max(predicted, floor_us(program, target.hbm_gbps, seq_len))
