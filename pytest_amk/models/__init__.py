"""Model presets and loading. ``config_for`` needs no torch; ``load_model`` builds weights."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pytest_amk.models.config import PRESETS, LlamaConfig, config_for
from pytest_amk.models.hf import HfModelError, UnsupportedModel

if TYPE_CHECKING:
    from pytest_amk.models.llama import Llama

__all__ = ["PRESETS", "HfModelError", "LlamaConfig", "UnsupportedModel", "config_for", "load_model"]


def load_model(model_id: str, dtype: str, seed: int, max_seq: int) -> Llama:
    """The eager model for a schedule's [model] table: random weights from ``seed`` for a preset
    or an ``hf:<config.json>``; the checkpoint's weights for an ``hf:<directory>``."""
    from pytest_amk.ir import DType
    from pytest_amk.models.llama import Llama, init_weights

    if model_id.startswith("hf:"):
        from pytest_amk.models import hf

        return hf.load_model(model_id, dtype, seed, max_seq)
    cfg = config_for(model_id)
    return Llama(cfg, init_weights(cfg, DType(dtype).torch(), seed), max_seq)
