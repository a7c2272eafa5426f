"""A small, plain Llama decoder in torch: the eager correctness oracle.

Weights use the fused layout the lowering consumes: ``wqkv`` stacks the q, k and
v projections (rows), ``w_gate_up`` stacks gate then up. The decode step reads
like the math (gpt-fast style) and keeps rounding points where Hugging Face's
LlamaForCausalLM has them, so bf16 results are comparable.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pytest_amk.models.config import LlamaConfig


def rope_table(cfg: LlamaConfig, max_seq: int) -> torch.Tensor:
    """fp32 [max_seq, head_dim/2, 2] of (cos, sin), with Llama-3 scaling if configured."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    sc = cfg.rope_scaling
    if sc:
        factor, low, high = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old_ctx = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    angles = torch.outer(torch.arange(max_seq, dtype=torch.float64), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()


def init_weights(cfg: LlamaConfig, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """Random weights from a seed; scaled so activations stay O(1) through the layers."""
    gen = torch.Generator().manual_seed(seed)

    def rand(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=gen) / math.sqrt(cols)).to(dtype)

    def norm() -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(cfg.hidden, generator=gen)).to(dtype)

    h = cfg.hidden
    w: dict[str, torch.Tensor] = {"embed": rand(cfg.vocab, h)}
    for i in range(cfg.layers):
        w[f"layers.{i}.attn_norm"] = norm()
        w[f"layers.{i}.wqkv"] = rand(cfg.qkv_rows, h)
        w[f"layers.{i}.wo"] = rand(h, cfg.heads * cfg.head_dim)
        w[f"layers.{i}.mlp_norm"] = norm()
        w[f"layers.{i}.w_gate_up"] = rand(2 * cfg.ffn, h)
        w[f"layers.{i}.w_down"] = rand(h, cfg.ffn)
    w["norm"] = norm()
    if not cfg.tied:
        w["lm_head"] = rand(cfg.vocab, h)
    return w


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on [..., head_dim] in fp32, rounded back to x's dtype."""
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Llama:
    """Eager batch-1 decoder with its own KV cache (positions 0..max_seq-1)."""

    def __init__(self, cfg: LlamaConfig, weights: dict[str, torch.Tensor], max_seq: int,
                 device: str | torch.device | None = None) -> None:
        """``device``: where weights, RoPE table and KV cache live (default: the weights' device;
        given, the weights are moved there)."""
        self.cfg = cfg
        self.device = torch.device(device) if device is not None else weights["embed"].device
        self.w = {k: v.to(self.device) for k, v in weights.items()} if device is not None else weights
        self.max_seq = max_seq
        self.dtype = weights["embed"].dtype
        self.rope = rope_table(cfg, max_seq).to(self.device)
        self.reset()

    def reset(self) -> None:
        c = self.cfg
        shape = (c.layers, c.kv_heads, self.max_seq, c.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)

    @property
    def lm_head(self) -> torch.Tensor:
        return self.w["embed"] if self.cfg.tied else self.w["lm_head"]

    @torch.no_grad()
    def step(self, token: int, pos: int) -> torch.Tensor:
        """One decode step; returns fp32 logits [vocab]. Appends to the KV cache."""
        c, w = self.cfg, self.w
        if not 0 <= pos < self.max_seq:
            raise ValueError(f"position {pos} outside [0, {self.max_seq})")
        d, rep = c.head_dim, c.heads // c.kv_heads
        cos, sin = self.rope[pos, :, 0], self.rope[pos, :, 1]
        x = w["embed"][token]
        for i in range(c.layers):
            p = f"layers.{i}."
            h = rms_norm(x, w[p + "attn_norm"], c.rms_eps)
            qkv = F.linear(h, w[p + "wqkv"])
            q = qkv[: c.heads * d].view(c.heads, d)
            k = qkv[c.heads * d : (c.heads + c.kv_heads) * d].view(c.kv_heads, d)
            v = qkv[(c.heads + c.kv_heads) * d :].view(c.kv_heads, d)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            self.k_cache[i, :, pos] = k
            self.v_cache[i, :, pos] = v
            keys = self.k_cache[i, :, : pos + 1].float().repeat_interleave(rep, dim=0)
            vals = self.v_cache[i, :, : pos + 1].float().repeat_interleave(rep, dim=0)
            scores = torch.einsum("hd,hpd->hp", q.float(), keys) / math.sqrt(d)
            attn = torch.einsum("hp,hpd->hd", scores.softmax(-1), vals).to(self.dtype)
            x = x + F.linear(attn.reshape(-1), w[p + "wo"])
            h = rms_norm(x, w[p + "mlp_norm"], c.rms_eps)
            gate, up = F.linear(h, w[p + "w_gate_up"]).split(c.ffn)
            x = x + F.linear(F.silu(gate) * up, w[p + "w_down"])
        x = rms_norm(x, w["norm"], c.rms_eps)
        return F.linear(x, self.lm_head).float()
