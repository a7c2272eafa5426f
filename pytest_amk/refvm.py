"""CPU reference VM: executes a Program's tasks with torch, one at a time.

Each opcode is implemented exactly as its doc in ir.OPS says; this module is the
executable meaning of the IR that the CUDA VM is checked against. Tasks run in
an order the counters allow: SM queues are visited in turn (or in a seeded
random order), and a queue head runs only once its waits are met. A program
whose tasks cannot all run raises ``RefVmDeadlock``.
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F

from pytest_amk.ir import BufferKind, DType, Program, Task

Tensors = dict[int, torch.Tensor]


class RefVmDeadlock(RuntimeError):
    pass


def alloc_buffers(program: Program, weights: dict[str, torch.Tensor],
                  device: str | torch.device = "cpu") -> Tensors:
    """Flat tensors for every buffer: weights bound by name, activations poisoned
    with NaN (so a read of unwritten data shows), KV zeroed, inputs and outputs zeroed."""
    out: Tensors = {}
    for b in program.buffers:
        if b.kind is BufferKind.WEIGHT:
            if b.name not in weights:
                raise KeyError(f"no weight bound for buffer {b.name!r}")
            w = weights[b.name]
            if w.numel() != b.numel:
                raise ValueError(f"weight {b.name!r} has {w.numel()} elements, buffer needs {b.numel}")
            out[b.id] = w.to(device=device, dtype=b.dtype.torch()).contiguous().view(-1)
        elif b.kind is BufferKind.ACTIVATION and b.dtype is not DType.INT32:
            out[b.id] = torch.full((b.numel,), float("nan"), dtype=b.dtype.torch(), device=device)
        else:
            out[b.id] = torch.zeros(b.numel, dtype=b.dtype.torch(), device=device)
    return out


def bind_weights(program: Program, model: Any) -> dict[str, torch.Tensor]:
    """Weight tensors by buffer name, from an eager ``Llama`` model."""
    from pytest_amk.models.llama import rope_table

    w = dict(model.w)
    w["rope"] = rope_table(model.cfg, int(program.meta["max_seq"]))
    return w


def set_inputs(program: Program, bufs: Tensors, token: int, pos: int) -> None:
    bufs[program.buffer("token").id].fill_(token)
    bufs[program.buffer("pos").id].fill_(pos)
    bufs[program.buffer("seq_len").id].fill_(pos + 1)


def run_step(program: Program, bufs: Tensors, token: int, pos: int,
             order_seed: int | None = None) -> torch.Tensor:
    """Run one decode step in place; returns a copy of the fp32 logits."""
    set_inputs(program, bufs, token, pos)
    for task in schedule_order(program, order_seed):
        execute(task, bufs)
    return bufs[program.buffer("logits").id].clone()


def schedule_order(program: Program, seed: int | None = None) -> list[Task]:
    """An order of all tasks that the queues and counters allow."""
    queues = program.queues()
    heads = [0] * len(queues)
    value = [0] * len(program.counters)
    rng = random.Random(seed) if seed is not None else None
    order: list[Task] = []
    while len(order) < len(program.tasks):
        sms = list(range(len(queues)))
        if rng:
            rng.shuffle(sms)
        progressed = False
        for sm in sms:
            # Run this queue as far as its waits allow (random mode: one task at a time).
            while heads[sm] < len(queues[sm]):
                t = queues[sm][heads[sm]]
                if any(value[w.counter] < w.threshold for w in t.waits):
                    break
                order.append(t)
                heads[sm] += 1
                if t.signal is not None:
                    value[t.signal] += 1
                progressed = True
                if rng:
                    break
        if not progressed:
            stuck = [queues[s][heads[s]] for s in range(len(queues)) if heads[s] < len(queues[s])]
            t = stuck[0]
            w = next(w for w in t.waits if value[w.counter] < w.threshold)
            raise RefVmDeadlock(
                f"deadlock: {len(stuck)} queue heads blocked, e.g. task {t.id} ({t.op}) on SM {t.sm} "
                f"waits for counter {w.counter} >= {w.threshold}, value {value[w.counter]}")
    return order


# -- opcodes ----------------------------------------------------------------------

def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    r = torch.rsqrt(xf.pow(2).mean() + eps)
    return (xf * r).to(x.dtype) * weight


def _gemv_rows(bufs: Tensors, p: dict[str, Any], x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    k = p["k"]
    w = bufs[p["weight"]][lo * k : hi * k].view(hi - lo, k)
    return F.linear(x.float(), w.float())


def _gemv_input(bufs: Tensors, p: dict[str, Any]) -> torch.Tensor:
    if p.get("inp_blocks", 0) > 0:  # attention partials: the combine is fused into this GEMV
        d = p["head_dim"]
        x = _combine(bufs[p["inp"]], 0, p["k"] // d, p["inp_blocks"], d, bufs[p["weight"]].dtype)
    else:
        x = bufs[p["inp"]][: p["k"]]
    if p["norm_weight"] >= 0:
        x = _norm(x, bufs[p["norm_weight"]][: p["k"]], p["eps"])
    return x


def op_embed(bufs: Tensors, p: dict[str, Any]) -> None:
    tok = int(bufs[p["token"]][0])
    base = tok * p["hidden"]
    bufs[p["out"]][p["lo"] : p["hi"]] = bufs[p["table"]][base + p["lo"] : base + p["hi"]]


def op_rmsnorm(bufs: Tensors, p: dict[str, Any]) -> None:
    lo, hi = p["lo"], p["hi"]
    x = bufs[p["inp"]][: p["n"]]
    r = torch.rsqrt(x.float().pow(2).mean() + p["eps"])
    out = bufs[p["out"]]
    out[lo:hi] = (x[lo:hi].float() * r).to(x.dtype) * bufs[p["weight"]][lo:hi]


def op_gemv(bufs: Tensors, p: dict[str, Any]) -> None:
    out = bufs[p["out"]]
    lo, hi = p["n_lo"], p["n_hi"]
    x = _gemv_input(bufs, p)
    y = _gemv_rows(bufs, p, x, lo, hi)
    if p["act"] == 1:
        up = _gemv_rows(bufs, p, x, p["up_row"] + lo, p["up_row"] + hi)
        v = F.silu(y.to(out.dtype).float()).to(out.dtype) * up.to(out.dtype)
    else:
        v = y.to(out.dtype)
    if p["residual"] >= 0:
        v = bufs[p["residual"]][lo:hi] + v
    out[lo:hi] = v


def _rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    c, s = table[:, 0], table[:, 1]
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def _rope_group(bufs: Tensors, p: dict[str, Any]) -> tuple[torch.Tensor, int, torch.Tensor]:
    """(q heads of kv head g roped [rep, d], pos, this position's rope table row)."""
    d, g, ms = p["head_dim"], p["kv_head"], p["max_seq"]
    rep = p["n_heads"] // p["n_kv_heads"]
    pos = int(bufs[p["pos"]][0])
    table = bufs[p["rope"]].view(ms, d // 2, 2)[pos]
    return _rope(bufs[p["qkv"]][g * rep * d : (g + 1) * rep * d].view(rep, d), table), pos, table


def _append_kv(bufs: Tensors, p: dict[str, Any], pos: int, table: torch.Tensor) -> None:
    """k head g roped and v head g of qkv into the caches at ``pos`` (ROPE_APPEND's append)."""
    d, g, ms, qkv = p["head_dim"], p["kv_head"], p["max_seq"], bufs[p["qkv"]]
    k_off = (p["n_heads"] + g) * d
    v_off = (p["n_heads"] + p["n_kv_heads"] + g) * d
    dst = slice((g * ms + pos) * d, (g * ms + pos + 1) * d)
    bufs[p["k_cache"]][dst] = _rope(qkv[k_off : k_off + d], table)
    bufs[p["v_cache"]][dst] = qkv[v_off : v_off + d]


def op_rope_append(bufs: Tensors, p: dict[str, Any]) -> None:
    q, pos, table = _rope_group(bufs, p)
    g = p["kv_head"]
    bufs[p["q_out"]][g * q.numel() : (g + 1) * q.numel()] = q.reshape(-1)
    _append_kv(bufs, p, pos, table)


def _attend(bufs: Tensors, p: dict[str, Any], q_of: Any) -> None:
    """ATTN_PARTIAL over the task's block; ``q_of(h)`` gives q head h (dtype)."""
    d, g, ms, blk, kb = p["head_dim"], p["kv_head"], p["max_seq"], p["blk"], p["kv_block"]
    rep = p["n_heads"] // p["n_kv_heads"]
    seq = int(bufs[p["seq_len"]][0])
    lo, hi = blk * kb, min(seq, (blk + 1) * kb)
    part = bufs[p["partial"]]
    for h in range(g * rep, (g + 1) * rep):
        base = (h * p["n_blocks"] + blk) * (d + 2)
        if hi <= lo:
            part[base] = float("-inf")
            part[base + 1 : base + d + 2] = 0.0
            continue
        q = q_of(h).float()
        k = bufs[p["k_cache"]][(g * ms + lo) * d : (g * ms + hi) * d].view(hi - lo, d).float()
        v = bufs[p["v_cache"]][(g * ms + lo) * d : (g * ms + hi) * d].view(hi - lo, d).float()
        s = (k @ q) * p["scale"]
        m = s.max()
        e = torch.exp(s - m)
        part[base] = m
        part[base + 1] = e.sum()
        part[base + 2 : base + d + 2] = e @ v


def op_attn_partial(bufs: Tensors, p: dict[str, Any]) -> None:
    d = p["head_dim"]
    _attend(bufs, p, lambda h: bufs[p["q"]][h * d : (h + 1) * d])


def op_rope_attn_partial(bufs: Tensors, p: dict[str, Any]) -> None:
    q, pos, table = _rope_group(bufs, p)
    blk, kb, rep = p["blk"], p["kv_block"], q.shape[0]
    if blk * kb <= pos < (blk + 1) * kb:  # this block holds the new position: append k and v
        _append_kv(bufs, p, pos, table)
    _attend(bufs, p, lambda h: q[h - p["kv_head"] * rep])


def _combine(part: torch.Tensor, h_lo: int, h_hi: int, nb: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    """ATTN_COMBINE of heads [h_lo, h_hi) from fp32 partials, rounded to ``dtype``."""
    out = torch.empty((h_hi - h_lo) * d, dtype=dtype, device=part.device)
    for h in range(h_lo, h_hi):
        rows = part[h * nb * (d + 2) : (h + 1) * nb * (d + 2)].view(nb, d + 2)
        live = rows[rows[:, 1] > 0]
        o = out[(h - h_lo) * d : (h - h_lo + 1) * d]
        if len(live) == 0:  # only reachable when partials were never written (NaN)
            o.fill_(float("nan"))
            continue
        m = live[:, 0]
        scale = torch.exp(m - m.max())
        o.copy_(((scale @ live[:, 2:]) / (scale @ live[:, 1])).to(dtype))
    return out


def op_attn_combine(bufs: Tensors, p: dict[str, Any]) -> None:
    d, lo, hi = p["head_dim"], p["head_lo"], p["head_hi"]
    out = bufs[p["out"]]
    out[lo * d : hi * d] = _combine(bufs[p["partial"]], lo, hi, p["n_blocks"], d, out.dtype)


def op_add(bufs: Tensors, p: dict[str, Any]) -> None:
    lo, hi = p["lo"], p["hi"]
    bufs[p["out"]][lo:hi] = bufs[p["a"]][lo:hi] + bufs[p["b"]][lo:hi]


def op_silu_mul(bufs: Tensors, p: dict[str, Any]) -> None:
    lo, hi, up = p["lo"], p["hi"], p["up_off"]
    x = bufs[p["inp"]]
    bufs[p["out"]][lo:hi] = F.silu(x[lo:hi].float()).to(x.dtype) * x[up + lo : up + hi]


def op_lm_head(bufs: Tensors, p: dict[str, Any]) -> None:
    lo, hi, t = p["n_lo"], p["n_hi"], p["tile"]
    y = _gemv_rows(bufs, p, _gemv_input(bufs, p), lo, hi)
    bufs[p["out"]][lo:hi] = y
    amax = bufs[p["amax"]]
    i = int(torch.argmax(y))  # first occurrence: smallest index on ties
    amax[2 * t] = y[i]
    amax[2 * t + 1] = float(lo + i)


def op_argmax(bufs: Tensors, p: dict[str, Any]) -> None:
    amax = bufs[p["amax"]][: 2 * p["n_tiles"]].view(-1, 2)
    best = int(torch.argmax(amax[:, 0]))  # tiles are in row order: first max is smallest index
    bufs[p["out"]][0] = int(amax[best, 1])


OPS_IMPL = {
    "NOP": lambda bufs, p: None,
    "EMBED": op_embed,
    "RMSNORM": op_rmsnorm,
    "GEMV": op_gemv,
    "ROPE_APPEND": op_rope_append,
    "ATTN_PARTIAL": op_attn_partial,
    "ATTN_COMBINE": op_attn_combine,
    "ROPE_ATTN_PARTIAL": op_rope_attn_partial,
    "ADD": op_add,
    "SILU_MUL": op_silu_mul,
    "LM_HEAD": op_lm_head,
    "ARGMAX": op_argmax,
}


def execute(task: Task, bufs: Tensors) -> None:
    OPS_IMPL[task.op](bufs, task.params)
