"""Lowering: Llama config + GPU target + schedule knobs -> task Program.

The program is a sequence of stages (one op over many tiles). Each stage gets
one counter that all its tiles signal; a consumer waits for the full count of
each stage that wrote what it reads, so every wait orders every producer
(coarse counters, as the fastest hand-written kernels use). Tiles map to SM
queues by the ``sm_assignment`` knob; queue order is program order, and waits
only point to earlier stages, so the program is deadlock free by construction
(the validator proves it anyway).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from pytest_amk.ir import (
    Buffer,
    BufferKind,
    Counter,
    DType,
    GpuTarget,
    Program,
    Region,
    Task,
    Wait,
    gemv_input_len,
)
from pytest_amk.models.config import LlamaConfig


class LoweringError(Exception):
    """The schedule cannot be lowered for this target (a REJECTED outcome)."""


# Limits of this implementation, not of the GPU: the validator's happens-before sets grow
# with the square of the task count, and the CPU reference VM and the eager model hold
# every buffer in host memory. A schedule beyond them is REJECTED (LoweringError) before
# the program is built, never an out-of-memory.
MAX_TASKS = 1 << 16
MAX_STATE_BYTES = 4 << 30  # every buffer but the weights: KV caches, activations, partials, rope
MAX_WEIGHT_BYTES = 32 << 30


@dataclass
class _Tile:
    op: str
    params: dict[str, Any]
    reads: list[Region]
    writes: list[Region]
    cost: float  # bytes moved, for balanced assignment


class _Builder:
    def __init__(self, num_sms: int, assignment: str) -> None:
        self.buffers: list[Buffer] = []
        self.counters: list[Counter] = []
        self.tasks: list[Task] = []
        self.num_sms = num_sms
        self.assignment = assignment
        self.cursor = 0  # round-robin position, continued across stages
        self.load = [0.0] * num_sms
        self.producer: dict[int, tuple[int, int]] = {}  # buffer -> (counter, tiles)

    def buffer(self, name: str, kind: BufferKind, dtype: DType, *shape: int) -> int:
        self.buffers.append(Buffer(len(self.buffers), name, kind, dtype, tuple(shape)))
        return len(self.buffers) - 1

    def stage(self, name: str, tiles: list[_Tile]) -> None:
        counter = len(self.counters)
        self.counters.append(Counter(counter, name))
        waits: dict[int, int] = {}
        for tile in tiles:
            for r in tile.reads:
                if r.buffer in self.producer:
                    c, n = self.producer[r.buffer]
                    waits[c] = n
        for tile in tiles:
            sm = self._place(tile.cost)
            self.tasks.append(Task(
                id=len(self.tasks), op=tile.op, sm=sm, reads=tile.reads, writes=tile.writes,
                waits=[Wait(c, n) for c, n in sorted(waits.items())], signal=counter,
                params=tile.params,
            ))
        for tile in tiles:
            for w in tile.writes:
                self.producer[w.buffer] = (counter, len(tiles))

    def _place(self, cost: float) -> int:
        if self.assignment == "balanced":
            sm = min(range(self.num_sms), key=lambda s: (self.load[s], s))
        else:
            sm = self.cursor % self.num_sms
            self.cursor += 1
        self.load[sm] += cost
        return sm


def _split(n: int, tile: int) -> list[tuple[int, int]]:
    return [(lo, min(n, lo + tile)) for lo in range(0, n, tile)]


def _spread(n: int, parts: int) -> list[tuple[int, int]]:
    """[0, n) in min(n, parts) near-equal pieces: every SM gets a share."""
    parts = max(1, min(n, parts))
    bounds = [n * i // parts for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def task_count(cfg: LlamaConfig, knobs: dict[str, Any], num_sms: int, max_seq: int) -> int:
    """The number of tasks ``lower`` makes (arithmetic only: checked before building)."""
    fusions = {tuple(f) for f in knobs["fusion"]}
    norm = 0 if ("rmsnorm", "gemv") in fusions else 1  # an RMSNORM stage before a normed GEMV
    res = 0 if ("gemv", "residual_add") in fusions else 1  # an ADD stage after a residual GEMV

    def tiles(n: int, rows: int = 0) -> int:
        return -(-n // rows) if rows else max(1, min(n, num_sms))

    h, n_tile = cfg.hidden, knobs["tiling.gemv.n_tile"]
    n_blocks = -(-max_seq // min(knobs["tiling.attention.kv_block"], max_seq))
    if ("gemv", "silu_mul") in fusions:
        mlp = norm * tiles(h) + tiles(cfg.ffn, n_tile)
    else:
        mlp = norm * tiles(h) + tiles(2 * cfg.ffn, n_tile) + tiles(cfg.ffn)
    rope = 0 if ("rope_append", "attn_partial") in fusions else cfg.kv_heads
    combine = 0 if ("attn_combine", "gemv") in fusions else -(-cfg.heads // knobs["tiling.attention.combine_heads"])
    layer = (norm * tiles(h) + tiles(cfg.qkv_rows, n_tile) + rope + cfg.kv_heads * n_blocks + combine
             + 2 * (tiles(h, n_tile) + res * tiles(h)) + mlp)
    return tiles(h) + cfg.layers * layer + norm * tiles(h) + tiles(cfg.vocab, knobs["tiling.lm_head.n_tile"]) + 1


def lower(cfg: LlamaConfig, target: GpuTarget, knobs: dict[str, Any], dtype: str,
          max_seq: int) -> Program:
    """Lower one decode step. Raises LoweringError when the target cannot hold it."""
    dt = DType(dtype)
    num_sms = knobs["sm_count"] or target.sm_count
    if num_sms > target.sm_count:
        raise LoweringError(f"sm_count = {num_sms} but {target.name} has {target.sm_count} SMs")
    fusions = {tuple(f) for f in knobs["fusion"]}
    fuse_norm = ("rmsnorm", "gemv") in fusions
    fuse_residual = ("gemv", "residual_add") in fusions
    fuse_silu = ("gemv", "silu_mul") in fusions
    fuse_rope = ("rope_append", "attn_partial") in fusions
    fuse_combine = ("attn_combine", "gemv") in fusions
    n_tile, lm_tile = knobs["tiling.gemv.n_tile"], knobs["tiling.lm_head.n_tile"]
    kv_block = min(knobs["tiling.attention.kv_block"], max_seq)
    combine_heads = knobs["tiling.attention.combine_heads"]
    if cfg.heads % combine_heads:
        raise LoweringError(
            f"tiling.attention.combine_heads = {combine_heads} does not divide {cfg.heads} heads")
    n_tasks = task_count(cfg, knobs, num_sms, max_seq)
    if n_tasks > MAX_TASKS:
        raise LoweringError(
            f"the program would have {n_tasks} tasks; at most {MAX_TASKS} are supported (raise "
            f"tiling.gemv.n_tile, tiling.lm_head.n_tile or tiling.attention.kv_block, or lower model.max_seq)")

    b = _Builder(num_sms, knobs["sm_assignment"])
    W, A, F32, I32 = BufferKind.WEIGHT, BufferKind.ACTIVATION, DType.FP32, DType.INT32
    h, d, eps = cfg.hidden, cfg.head_dim, cfg.rms_eps
    token = b.buffer("token", BufferKind.INPUT, I32, 1)
    pos = b.buffer("pos", BufferKind.INPUT, I32, 1)
    seq_len = b.buffer("seq_len", BufferKind.INPUT, I32, 1)
    embed = b.buffer("embed", W, dt, cfg.vocab, h)
    rope = b.buffer("rope", W, F32, max_seq, d // 2, 2)
    esize = dt.nbytes

    def tiles(n: int, rows: int = 0) -> list[tuple[int, int]]:
        """Row ranges: ``rows`` per tile, or (0) spread over every SM."""
        return _split(n, rows) if rows else _spread(n, num_sms)

    def rmsnorm(name: str, x: int, weight: int) -> int:
        out = b.buffer(name, A, dt, h)
        b.stage(name, [
            _Tile("RMSNORM", dict(inp=x, weight=weight, out=out, lo=lo, hi=hi, n=h, eps=eps),
                  [Region(x, 0, h), Region(weight, lo, hi)], [Region(out, lo, hi)], 2.0 * (hi - lo))
            for lo, hi in tiles(h)
        ])
        return out

    def gemv(name: str, x: int, k: int, weight: int, n: int, *, norm: int = -1,
             residual: int = -1, silu_up: int = 0, inp_blocks: int = 0) -> int:
        """out[0:n] = W x (+ residual), tiled over rows; with silu_up, rows silu_up+i are 'up';
        with inp_blocks, x is the attention partial buffer (combined while staging)."""
        if norm >= 0 and not fuse_norm:
            x, norm = rmsnorm(name + ".norm", x, norm), -1
        if residual >= 0 and not fuse_residual:
            partial = gemv(name + ".proj", x, k, weight, n, norm=norm, inp_blocks=inp_blocks)
            return add(name, residual, partial, n)
        out = b.buffer(name, A, dt, n)
        stage_tiles = []
        x_len = gemv_input_len(k, inp_blocks, d)
        for lo, hi in tiles(n, n_tile):
            reads = [Region(x, 0, x_len), Region(weight, lo * k, hi * k)]
            if silu_up:
                reads.append(Region(weight, (silu_up + lo) * k, (silu_up + hi) * k))
            if norm >= 0:
                reads.append(Region(norm, 0, k))
            if residual >= 0:
                reads.append(Region(residual, lo, hi))
            params = dict(inp=x, weight=weight, out=out, n_lo=lo, n_hi=hi, k=k, norm_weight=norm,
                          eps=eps, residual=residual, act=1 if silu_up else 0, up_row=silu_up,
                          inp_blocks=inp_blocks, head_dim=d if inp_blocks else 0)
            rows = (hi - lo) * (2 if silu_up else 1)
            stage_tiles.append(_Tile("GEMV", params, reads, [Region(out, lo, hi)], rows * k * esize))
        b.stage(name, stage_tiles)
        return out

    def add(name: str, a: int, c: int, n: int) -> int:
        out = b.buffer(name, A, dt, n)
        b.stage(name, [
            _Tile("ADD", dict(a=a, b=c, out=out, lo=lo, hi=hi),
                  [Region(a, lo, hi), Region(c, lo, hi)], [Region(out, lo, hi)], 3.0 * (hi - lo))
            for lo, hi in tiles(n)
        ])
        return out

    # Embedding lookup.
    x = b.buffer("x.0", A, dt, h)
    b.stage("embed", [
        _Tile("EMBED", dict(token=token, table=embed, out=x, lo=lo, hi=hi, hidden=h),
              [Region(token, 0, 1), Region(embed, 0, cfg.vocab * h)], [Region(x, lo, hi)], hi - lo)
        for lo, hi in tiles(h)
    ])

    rep, n_blocks = cfg.heads // cfg.kv_heads, math.ceil(max_seq / kv_block)
    for i in range(cfg.layers):
        p = f"layers.{i}."
        attn_norm = b.buffer(p + "attn_norm", W, dt, h)
        wqkv = b.buffer(p + "wqkv", W, dt, cfg.qkv_rows, h)
        wo = b.buffer(p + "wo", W, dt, h, cfg.heads * d)
        mlp_norm = b.buffer(p + "mlp_norm", W, dt, h)
        w_gate_up = b.buffer(p + "w_gate_up", W, dt, 2 * cfg.ffn, h)
        w_down = b.buffer(p + "w_down", W, dt, h, cfg.ffn)
        k_cache = b.buffer(p + "k_cache", BufferKind.KV, dt, cfg.kv_heads, max_seq, d)
        v_cache = b.buffer(p + "v_cache", BufferKind.KV, dt, cfg.kv_heads, max_seq, d)

        qkv = gemv(p + "qkv", x, h, wqkv, cfg.qkv_rows, norm=attn_norm)
        q = qkv  # fused: the attention tasks rope q themselves and append k, v
        if not fuse_rope:
            q = b.buffer(p + "q", A, dt, cfg.heads * d)
            stage_tiles = []
            for g in range(cfg.kv_heads):
                k_off, v_off = (cfg.heads + g) * d, (cfg.heads + cfg.kv_heads + g) * d
                kv_rows = Region(k_cache, g * max_seq * d, (g + 1) * max_seq * d)
                stage_tiles.append(_Tile(
                    "ROPE_APPEND",
                    dict(qkv=qkv, rope=rope, pos=pos, q_out=q, k_cache=k_cache, v_cache=v_cache,
                         kv_head=g, n_heads=cfg.heads, n_kv_heads=cfg.kv_heads, head_dim=d,
                         max_seq=max_seq),
                    [Region(qkv, g * rep * d, (g + 1) * rep * d), Region(qkv, k_off, k_off + d),
                     Region(qkv, v_off, v_off + d), Region(rope, 0, max_seq * d), Region(pos, 0, 1)],
                    [Region(q, g * rep * d, (g + 1) * rep * d), kv_rows,
                     Region(v_cache, kv_rows.lo, kv_rows.hi)],
                    (rep + 2) * d * 2.0,
                ))
            b.stage(p + "rope_append", stage_tiles)

        partial = b.buffer(p + "attn_partial", A, DType.FP32, cfg.heads, n_blocks, d + 2)
        stage_tiles = []
        for g in range(cfg.kv_heads):
            for blk in range(n_blocks):
                lo, hi = (g * max_seq + blk * kv_block) * d, (g * max_seq + min(max_seq, (blk + 1) * kv_block)) * d
                params = dict(k_cache=k_cache, v_cache=v_cache, seq_len=seq_len, partial=partial,
                              kv_head=g, blk=blk, kv_block=kv_block, n_heads=cfg.heads,
                              n_kv_heads=cfg.kv_heads, head_dim=d, max_seq=max_seq, n_blocks=n_blocks,
                              scale=1.0 / math.sqrt(d))
                writes = [Region(partial, (hh * n_blocks + blk) * (d + 2), (hh * n_blocks + blk + 1) * (d + 2))
                          for hh in range(g * rep, (g + 1) * rep)]
                reads = [Region(q, g * rep * d, (g + 1) * rep * d), Region(k_cache, lo, hi),
                         Region(v_cache, lo, hi), Region(seq_len, 0, 1)]
                if fuse_rope:
                    k_off, v_off = (cfg.heads + g) * d, (cfg.heads + cfg.kv_heads + g) * d
                    params |= dict(qkv=qkv, rope=rope, pos=pos)
                    reads += [Region(qkv, k_off, k_off + d), Region(qkv, v_off, v_off + d),
                              Region(rope, 0, max_seq * d), Region(pos, 0, 1)]
                    writes += [Region(k_cache, lo, hi), Region(v_cache, lo, hi)]
                else:
                    params["q"] = q
                stage_tiles.append(_Tile("ROPE_ATTN_PARTIAL" if fuse_rope else "ATTN_PARTIAL", params, reads,
                                         writes, 2.0 * (hi - lo) * esize))
        b.stage(p + "attn_partial", stage_tiles)

        if fuse_combine:
            hmid = gemv(p + "h", partial, cfg.heads * d, wo, h, residual=x, inp_blocks=n_blocks)
        else:
            attn = b.buffer(p + "attn", A, dt, cfg.heads * d)
            b.stage(p + "attn_combine", [
                _Tile("ATTN_COMBINE",
                      dict(partial=partial, out=attn, head_lo=lo, head_hi=hi, n_blocks=n_blocks, head_dim=d),
                      [Region(partial, lo * n_blocks * (d + 2), hi * n_blocks * (d + 2))],
                      [Region(attn, lo * d, hi * d)], 4.0 * (hi - lo) * n_blocks * (d + 2))
                for lo, hi in _split(cfg.heads, combine_heads)
            ])
            hmid = gemv(p + "h", attn, cfg.heads * d, wo, h, residual=x)
        if fuse_silu:
            act = gemv(p + "act", hmid, h, w_gate_up, cfg.ffn, norm=mlp_norm, silu_up=cfg.ffn)
        else:
            gu = gemv(p + "gate_up", hmid, h, w_gate_up, 2 * cfg.ffn, norm=mlp_norm)
            act = b.buffer(p + "act", A, dt, cfg.ffn)
            b.stage(p + "act", [
                _Tile("SILU_MUL", dict(inp=gu, out=act, lo=lo, hi=hi, up_off=cfg.ffn),
                      [Region(gu, lo, hi), Region(gu, cfg.ffn + lo, cfg.ffn + hi)],
                      [Region(act, lo, hi)], 3.0 * (hi - lo))
                for lo, hi in tiles(cfg.ffn)
            ])
        x = gemv(f"x.{i + 1}", act, cfg.ffn, w_down, h, residual=hmid)

    # Final norm, LM head with per-tile argmax, argmax reduction.
    norm = b.buffer("norm", W, dt, h)
    lm_w = embed if cfg.tied else b.buffer("lm_head", W, dt, cfg.vocab, h)
    if not fuse_norm:
        x, norm = rmsnorm("final_norm", x, norm), -1
    logits = b.buffer("logits", BufferKind.OUTPUT, DType.FP32, cfg.vocab)
    lm_tiles = tiles(cfg.vocab, lm_tile)
    amax = b.buffer("amax", A, DType.FP32, len(lm_tiles), 2)
    stage_tiles = []
    for t, (lo, hi) in enumerate(lm_tiles):
        reads = [Region(x, 0, h), Region(lm_w, lo * h, hi * h)]
        if norm >= 0:
            reads.append(Region(norm, 0, h))
        stage_tiles.append(_Tile(
            "LM_HEAD",
            dict(inp=x, weight=lm_w, out=logits, n_lo=lo, n_hi=hi, k=h, norm_weight=norm, eps=eps,
                 amax=amax, tile=t),
            reads, [Region(logits, lo, hi), Region(amax, 2 * t, 2 * t + 2)], (hi - lo) * h * esize))
    b.stage("lm_head", stage_tiles)
    next_token = b.buffer("next_token", BufferKind.OUTPUT, I32, 1)
    b.stage("argmax", [_Tile("ARGMAX", dict(amax=amax, n_tiles=len(lm_tiles), out=next_token),
                             [Region(amax, 0, 2 * len(lm_tiles))], [Region(next_token, 0, 1)], 1.0)])

    weight_bytes = sum(x.nbytes for x in b.buffers if x.kind is W)
    state_bytes = sum(x.nbytes for x in b.buffers if x.kind is not W)
    if weight_bytes > MAX_WEIGHT_BYTES:
        raise LoweringError(f"the weights take {weight_bytes / 2**30:.1f} GiB; at most "
                            f"{MAX_WEIGHT_BYTES >> 30} GiB are supported")
    if state_bytes > MAX_STATE_BYTES:
        raise LoweringError(f"the KV caches and activations take {state_bytes / 2**30:.1f} GiB; at most "
                            f"{MAX_STATE_BYTES >> 30} GiB are supported (lower model.max_seq)")
    look_kb = knobs["prefetch.lookahead_kb"]
    meta = {
        "target": target.name,
        "dtype": dt.value,
        "num_sms": num_sms,
        "threads_per_block": knobs["threads_per_block"],
        "pipelining_depth": knobs["pipelining_depth"],
        # L2 prefetch bytes for the runner (gpu.prefetch.prefetch_sizes); None: the card's default.
        "prefetch": {"own_bytes": knobs["prefetch.own_kb"] << 10,
                     "lookahead_bytes": None if look_kb < 0 else look_kb << 10},
        "max_seq": max_seq,
        "model": cfg.to_json(),
        "knobs": knobs,
    }
    return Program(b.buffers, b.counters, b.tasks, meta)


def stage_kind(counter_name: str) -> str:
    """A stage's kind from its counter's name, the same for every layer: ``layers.3.qkv`` ->
    ``qkv``, ``x.4`` (the down projection's output) -> ``down``, ``lm_head`` -> ``lm_head``."""
    return re.sub(r"^layers\.\d+\.", "", re.sub(r"^x\.\d+$", "down", counter_name))


def bypass_stages(program: Program, kinds: set[str]) -> Program:
    """The same tasks, where a wait on a stage of one of ``kinds`` becomes the waits of that
    stage's tasks: its readers no longer wait for it, so the stage and the stage after it run
    as one level (several kinds chain: bypassing ``attn_partial`` and ``attn_combine`` lets the
    O projection wait for the qkv projection only). Timed on a GPU it bounds what fusing or
    removing those levels could gain. Its tasks race (the validator rejects it) and its results
    mean nothing: time it only. Raises ValueError for a kind no stage has."""
    known = {stage_kind(c.name) for c in program.counters}
    if unknown := sorted(set(kinds) - known):
        raise ValueError(f"no stage of kind {', '.join(unknown)}; the kinds are {', '.join(sorted(known))}")
    skipped = {c.id for c in program.counters if stage_kind(c.name) in kinds}
    producers: dict[int, list[Task]] = {}
    for t in program.tasks:
        if t.signal is not None:
            producers.setdefault(t.signal, []).append(t)
    resolved: dict[int, dict[int, int]] = {}

    def expand(waits: list[Wait]) -> dict[int, int]:
        out: dict[int, int] = {}
        for w in waits:
            if w.counter in skipped and producers.get(w.counter):
                if w.counter not in resolved:
                    resolved[w.counter] = {}  # a cycle (never in a lowered program) ends here
                    merged: dict[int, int] = {}
                    for p in producers[w.counter]:
                        for c, n in expand(p.waits).items():
                            merged[c] = max(merged.get(c, 0), n)
                    resolved[w.counter] = merged
                for c, n in resolved[w.counter].items():
                    out[c] = max(out.get(c, 0), n)
            else:
                out[w.counter] = max(out.get(w.counter, 0), w.threshold)
        return out

    tasks = [Task(t.id, t.op, t.sm, list(t.reads), list(t.writes),
                  [Wait(c, n) for c, n in sorted(expand(t.waits).items())], t.signal, dict(t.params))
             for t in program.tasks]
    return Program(program.buffers, program.counters, tasks, dict(program.meta))
