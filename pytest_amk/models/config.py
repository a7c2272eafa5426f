"""Model shapes (no torch): the Llama config and the named presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class LlamaConfig:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool = True
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    # Llama-3 rope scaling: {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"} or None.
    rope_scaling: dict[str, float] | None = field(default=None, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")

    @property
    def qkv_rows(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def param_count(self) -> int:
        h, f = self.hidden, self.ffn
        per_layer = 2 * h + self.qkv_rows * h + h * self.heads * self.head_dim + 2 * f * h + h * f
        head = 0 if self.tied else self.vocab * h
        return self.vocab * h + self.layers * per_layer + h + head


PRESETS: dict[str, LlamaConfig] = {
    "toy": LlamaConfig(hidden=256, layers=2, heads=8, kv_heads=2, head_dim=32, ffn=512, vocab=512),
    "toy-4L": LlamaConfig(
        hidden=512, layers=4, heads=8, kv_heads=4, head_dim=64, ffn=1536, vocab=2048, tied=False
    ),
    "llama-3.2-1b-shape": LlamaConfig(
        hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64, ffn=8192, vocab=128256,
        tied=True, rope_theta=500000.0, rms_eps=1e-5,
        rope_scaling={"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    ),
}


def config_for(model_id: str) -> LlamaConfig:
    """The config of a model id: a preset name, or ``hf:<path>`` (read from its config.json;
    raises ``hf.UnsupportedModel`` / ``hf.HfModelError``, both ValueErrors, naming the problem)."""
    if model_id in PRESETS:
        return PRESETS[model_id]
    if model_id.startswith("hf:"):
        from pytest_amk.models.hf import config_from_id

        return config_from_id(model_id)
    raise KeyError(f"unknown model {model_id!r}; known: {', '.join(PRESETS)}, hf:<path>")
