"""Hugging Face ``LlamaForCausalLM`` import: the model ids ``hf:<path>``.

``<path>`` is either a directory saved by ``save_pretrained`` (config.json plus
model.safetensors, sharded safetensors with model.safetensors.index.json, or
pytorch_model.bin) or the path of a config JSON file: the config-only form,
whose weights are random from the schedule's seed (``init_weights``), built
offline. Relative paths resolve against the current directory; nothing is ever
fetched from a hub.

The config is checked against what the lowering and the eager model implement
(GQA, tied or untied embeddings, rms_norm_eps, rope_theta, Llama-3 rope scaling,
an explicit head_dim); anything else raises ``UnsupportedModel`` naming the
config key and its value.

HF's q_proj/k_proj rows are already in the rotate-half layout our RoPE uses, so
the weight mapping only concatenates: wqkv = [q; k; v], w_gate_up = [gate; up].

Importing this module needs no torch; torch, safetensors and transformers are
imported where they are used.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_amk.models.config import LlamaConfig

if TYPE_CHECKING:
    import torch

    from pytest_amk.models.llama import Llama

__all__ = [
    "HfModelError", "UnsupportedModel", "HfSource", "resolve", "convert_config", "config_from_id",
    "load_weights", "map_hf_state_dict", "to_hf_state_dict", "load_model", "hf_model", "hf_generate",
]

PREFIX = "hf:"
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

# HF LlamaConfig defaults for keys a saved config may leave out.
DEFAULT_RMS_EPS = 1e-6
DEFAULT_ROPE_THETA = 10000.0
DEFAULT_MAX_POSITIONS = 2048
REQUIRED_INTS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
# Keys whose presence with a non-empty value changes the math into something we do not lower.
UNSUPPORTED_IF_SET = (
    "num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
    "n_shared_experts", "quantization_config", "sliding_window", "attn_logit_softcapping",
    "final_logit_softcapping", "attention_chunk_size", "no_rope_layers", "use_qk_norm", "qk_norm",
)
ROPE_TYPES = ("default", "llama3")
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor")


class HfModelError(ValueError):
    """An ``hf:`` model cannot be imported (missing files, bad config, weights not matching it)."""


class UnsupportedModel(HfModelError):
    """The config asks for something the lowering does not implement; the message names the key."""


@dataclass(frozen=True)
class HfSource:
    """Where an ``hf:`` id points: its config file and, unless config-only, its weights directory."""

    config_path: Path
    weights_dir: Path | None  # None: config-only (random weights from the seed)

    @property
    def config_only(self) -> bool:
        return self.weights_dir is None


def _strip(model_id: str | os.PathLike[str]) -> str:
    s = os.fspath(model_id)
    return s[len(PREFIX):] if s.startswith(PREFIX) else s


def resolve(model_id: str | os.PathLike[str]) -> HfSource:
    """The files of ``hf:<path>`` (the prefix is optional). Raises HfModelError when they are missing."""
    raw = _strip(model_id)
    if not raw:
        raise HfModelError("hf: model id without a path; use hf:<directory> or hf:<config.json>")
    path = Path(raw).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise HfModelError(f"{path}: no config.json in this directory")
        if not any((path / f).is_file() for f in SINGLE_FILES + INDEX_FILES):
            raise HfModelError(
                f"{path}: no weights ({', '.join(SINGLE_FILES + INDEX_FILES)}); for random weights "
                f"from the seed use the config-only form hf:{config}")
        return HfSource(config, path)
    if path.is_file():
        return HfSource(path, None)
    raise HfModelError(f"{path}: no such directory or config file (hf: paths are local; nothing is downloaded)")


def read_config(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HfModelError(f"{path}: cannot read the config: {e}") from None
    if not isinstance(raw, dict):
        raise HfModelError(f"{path}: the config is not a JSON object")
    return raw


def _is_set(value: Any) -> bool:
    return value not in (None, False, 0, [], {}, "")


def _number(raw: Mapping[str, Any], key: str, where: str, name: str | None = None) -> float:
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise HfModelError(f"{where}: {name or key} = {value!r} is not a finite number")
    return float(value)


def _positive_int(raw: Mapping[str, Any], key: str, where: str) -> int:
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HfModelError(f"{where}: {key} = {value!r} is not a positive integer")
    return value


def _rope(raw: Mapping[str, Any], where: str) -> tuple[float, dict[str, float] | None]:
    """rope_theta and our Llama-3 scaling dict (or None), from either the transformers 5.x
    ``rope_parameters`` or the 4.x ``rope_scaling`` + top-level ``rope_theta``."""
    params: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for key in ("rope_scaling", "rope_parameters"):  # rope_parameters wins where both say something
        value = raw.get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise HfModelError(f"{where}: {key} = {value!r} is not an object")
        nested = [k for k, v in value.items() if isinstance(v, dict)]
        if nested:
            raise UnsupportedModel(f"{where}: {key}.{nested[0]} = {{...}}: per-layer-type RoPE is not supported")
        params.update(value)
        origin.update(dict.fromkeys(value, key))

    def name(k: str) -> str:
        return f"{origin[k]}.{k}" if k in origin else k

    type_key = "rope_type" if "rope_type" in params else "type"
    rope_type = params.get(type_key, "default")
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModel(
            f"{where}: {name(type_key)} = {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    for src in (raw, params):
        prf = src.get("partial_rotary_factor")
        if prf is not None and prf != 1:
            key = name("partial_rotary_factor") if src is params else "partial_rotary_factor"
            raise UnsupportedModel(f"{where}: {key} = {prf!r} is not supported (only 1.0)")

    if "rope_theta" in params and params["rope_theta"] is not None:
        theta = _number(params, "rope_theta", where, name("rope_theta"))
    elif raw.get("rope_theta") is not None:
        theta = _number(raw, "rope_theta", where)
    else:
        theta = DEFAULT_ROPE_THETA
    if theta <= 0:
        raise HfModelError(f"{where}: rope_theta = {theta!r} must be positive")
    if rope_type == "default":
        return theta, None

    scaling: dict[str, float] = {}
    for k in LLAMA3_KEYS:
        if k not in params:
            raise HfModelError(f"{where}: rope type 'llama3' needs {origin.get(type_key, 'rope_parameters')}.{k}")
        scaling[k] = _number(params, k, where, name(k))
    # As in transformers: a top-level original_max_position_embeddings wins, then the rope dict's,
    # then max_position_embeddings.
    if raw.get("original_max_position_embeddings") is not None:
        old_ctx = _number(raw, "original_max_position_embeddings", where)
    elif params.get("original_max_position_embeddings") is not None:
        old_ctx = _number(params, "original_max_position_embeddings", where, name("original_max_position_embeddings"))
    else:
        old_ctx = float(raw.get("max_position_embeddings") or DEFAULT_MAX_POSITIONS)
    scaling["original_max_position_embeddings"] = old_ctx
    if scaling["factor"] <= 0 or old_ctx <= 0 or scaling["high_freq_factor"] == scaling["low_freq_factor"]:
        raise HfModelError(f"{where}: llama3 rope parameters {scaling} are degenerate (factor and "
                           "original_max_position_embeddings > 0, high_freq_factor != low_freq_factor)")
    return theta, scaling


def convert_config(raw: Mapping[str, Any], where: str = "config.json") -> LlamaConfig:
    """Our LlamaConfig for an HF Llama config dict; UnsupportedModel / HfModelError name the key."""
    model_type = raw.get("model_type")
    if model_type != "llama":
        raise UnsupportedModel(f"{where}: model_type = {model_type!r} is not supported (only 'llama')")
    arch = raw.get("architectures")
    if arch is not None and (not isinstance(arch, list) or "LlamaForCausalLM" not in arch):
        raise UnsupportedModel(f"{where}: architectures = {arch!r} is not supported (only LlamaForCausalLM)")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModel(f"{where}: hidden_act = {act!r} is not supported (only 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if raw.get(key):
            raise UnsupportedModel(f"{where}: {key} = {raw[key]!r} is not supported (biases must be false)")
    for key in UNSUPPORTED_IF_SET:
        if _is_set(raw.get(key)):
            raise UnsupportedModel(f"{where}: {key} = {raw[key]!r} is not supported")
    layer_types = raw.get("layer_types")
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        raise UnsupportedModel(f"{where}: layer_types = {layer_types!r} is not supported (only full_attention)")

    for key in REQUIRED_INTS:
        if key not in raw:
            raise HfModelError(f"{where}: missing {key}")
    hidden, ffn, layers, heads, vocab = (_positive_int(raw, k, where) for k in
                                         ("hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "vocab_size"))
    kv_heads = _positive_int(raw, "num_key_value_heads", where) if raw.get("num_key_value_heads") else heads
    head_dim = _positive_int(raw, "head_dim", where) if raw.get("head_dim") else hidden // heads
    if heads % kv_heads:
        raise HfModelError(f"{where}: num_attention_heads = {heads} is not a multiple of "
                           f"num_key_value_heads = {kv_heads}")
    if head_dim % 2 or head_dim < 2:
        key = "head_dim" if raw.get("head_dim") else "hidden_size / num_attention_heads"
        raise UnsupportedModel(f"{where}: {key} = {head_dim} is not supported (RoPE needs an even head_dim)")
    tied = raw.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        raise HfModelError(f"{where}: tie_word_embeddings = {tied!r} is not a boolean")
    eps = _number(raw, "rms_norm_eps", where) if raw.get("rms_norm_eps") is not None else DEFAULT_RMS_EPS
    if eps < 0:
        raise HfModelError(f"{where}: rms_norm_eps = {eps!r} must not be negative")
    theta, scaling = _rope(raw, where)
    return LlamaConfig(hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                       ffn=ffn, vocab=vocab, tied=tied, rope_theta=theta, rms_eps=eps, rope_scaling=scaling)


def config_from_id(model_id: str | os.PathLike[str]) -> LlamaConfig:
    """``config_for`` for ``hf:<path>`` (no torch)."""
    src = resolve(model_id)
    return convert_config(read_config(src.config_path), str(src.config_path))


# ---------------------------------------------------------------- weights

_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


class _SafetensorsFile:
    """A minimal safetensors reader on torch, for when the ``safetensors`` package is missing."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self.base, self.header = 8 + n, header

    def keys(self) -> list[str]:
        return list(self.header)

    def get_tensor(self, name: str) -> torch.Tensor:
        import torch

        info = self.header[name]
        lo, hi = info["data_offsets"]
        if info["dtype"] not in _ST_DTYPES:
            raise HfModelError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        dtype = getattr(torch, _ST_DTYPES[info["dtype"]])
        with self.path.open("rb") as f:
            f.seek(self.base + lo)
            data = bytearray(f.read(hi - lo))
        if len(data) != hi - lo:
            raise HfModelError(f"{self.path}: truncated tensor {name}")
        if not data:
            return torch.empty(info["shape"], dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(info["shape"]).clone()


def _open_file(path: Path) -> Any:
    """An object with keys() and get_tensor(name) for one checkpoint file."""
    if path.suffix == ".safetensors":
        try:
            from safetensors import safe_open
        except ImportError:
            return _SafetensorsFile(path)
        return safe_open(str(path), framework="pt")
    import torch

    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)

    class _Dict:
        def keys(self) -> list[str]:
            return list(sd)

        def get_tensor(self, name: str) -> torch.Tensor:
            return sd[name]

    return _Dict()


def iter_checkpoint(weights_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of a saved checkpoint, one file open at a time."""
    for index in INDEX_FILES:
        if (weights_dir / index).is_file():
            try:
                weight_map = json.loads((weights_dir / index).read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise HfModelError(f"{weights_dir / index}: cannot read the index: {e!r}") from None
            files: dict[str, list[str]] = {}
            for name, file in weight_map.items():
                files.setdefault(file, []).append(name)
            for file, names in files.items():
                if not (weights_dir / file).is_file():
                    raise HfModelError(f"{weights_dir / index}: shard {file} is missing")
                f = _open_file(weights_dir / file)
                for name in names:
                    yield name, f.get_tensor(name)
            return
    for single in SINGLE_FILES:
        if (weights_dir / single).is_file():
            f = _open_file(weights_dir / single)
            for name in f.keys():
                yield name, f.get_tensor(name)
            return
    raise HfModelError(f"{weights_dir}: no checkpoint files ({', '.join(SINGLE_FILES + INDEX_FILES)})")


def hf_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """HF parameter names and shapes of a LlamaForCausalLM with this config."""
    h, d = cfg.hidden, cfg.head_dim
    s: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab, h), "model.norm.weight": (h,)}
    for i in range(cfg.layers):
        p = f"model.layers.{i}."
        s[p + "input_layernorm.weight"] = (h,)
        s[p + "self_attn.q_proj.weight"] = (cfg.heads * d, h)
        s[p + "self_attn.k_proj.weight"] = (cfg.kv_heads * d, h)
        s[p + "self_attn.v_proj.weight"] = (cfg.kv_heads * d, h)
        s[p + "self_attn.o_proj.weight"] = (h, cfg.heads * d)
        s[p + "post_attention_layernorm.weight"] = (h,)
        s[p + "mlp.gate_proj.weight"] = (cfg.ffn, h)
        s[p + "mlp.up_proj.weight"] = (cfg.ffn, h)
        s[p + "mlp.down_proj.weight"] = (h, cfg.ffn)
    if not cfg.tied:
        s["lm_head.weight"] = (cfg.vocab, h)
    return s


def _ignorable(name: str, cfg: LlamaConfig) -> bool:
    return name.endswith("rotary_emb.inv_freq") or (cfg.tied and name == "lm_head.weight")


def map_hf_state_dict(tensors: Mapping[str, torch.Tensor] | Iterator[tuple[str, torch.Tensor]],
                      cfg: LlamaConfig, dtype: torch.dtype, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Our fused weights (``Llama`` names) from HF tensors, cast to ``dtype``; checks names and shapes."""
    shapes = hf_shapes(cfg)
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    got: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for name, t in items:
        if name in shapes:
            if tuple(t.shape) != shapes[name]:
                raise HfModelError(f"{where}: {name} has shape {tuple(t.shape)}, the config says {shapes[name]}")
            got[name] = t.to(dtype)
        elif not _ignorable(name, cfg):
            unexpected.append(name)
    if unexpected:
        raise HfModelError(f"{where}: unexpected tensors {unexpected[:5]}" +
                           (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else "") +
                           " (biases, other architectures and quantized weights are not supported)")
    missing = [n for n in shapes if n not in got]
    if missing:
        raise HfModelError(f"{where}: missing tensors {missing[:5]}" +
                           (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
    import torch

    w = {"embed": got.pop("model.embed_tokens.weight")}
    for i in range(cfg.layers):
        p, a, m = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        q = f"layers.{i}."
        w[q + "attn_norm"] = got.pop(p + "input_layernorm.weight")
        w[q + "wqkv"] = torch.cat([got.pop(a + "q_proj.weight"), got.pop(a + "k_proj.weight"),
                                   got.pop(a + "v_proj.weight")])
        w[q + "wo"] = got.pop(a + "o_proj.weight")
        w[q + "mlp_norm"] = got.pop(p + "post_attention_layernorm.weight")
        w[q + "w_gate_up"] = torch.cat([got.pop(m + "gate_proj.weight"), got.pop(m + "up_proj.weight")])
        w[q + "w_down"] = got.pop(m + "down_proj.weight")
    w["norm"] = got.pop("model.norm.weight")
    if not cfg.tied:
        w["lm_head"] = got.pop("lm_head.weight")
    return {k: v.contiguous() for k, v in w.items()}


def to_hf_state_dict(cfg: LlamaConfig, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``map_hf_state_dict``: HF names from our fused weights (views, no copies)."""
    h, d = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    sd = {"model.embed_tokens.weight": weights["embed"], "model.norm.weight": weights["norm"]}
    for i in range(cfg.layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        qkv, gu = weights[q + "wqkv"], weights[q + "w_gate_up"]
        sd[p + "input_layernorm.weight"] = weights[q + "attn_norm"]
        sd[p + "self_attn.q_proj.weight"] = qkv[:h]
        sd[p + "self_attn.k_proj.weight"] = qkv[h:h + d]
        sd[p + "self_attn.v_proj.weight"] = qkv[h + d:]
        sd[p + "self_attn.o_proj.weight"] = weights[q + "wo"]
        sd[p + "post_attention_layernorm.weight"] = weights[q + "mlp_norm"]
        sd[p + "mlp.gate_proj.weight"] = gu[:cfg.ffn]
        sd[p + "mlp.up_proj.weight"] = gu[cfg.ffn:]
        sd[p + "mlp.down_proj.weight"] = weights[q + "w_down"]
    sd["lm_head.weight"] = weights["embed"] if cfg.tied else weights["lm_head"]
    return sd


def load_weights(model_id: str | os.PathLike[str], dtype: torch.dtype, seed: int = 0,
                 cfg: LlamaConfig | None = None) -> dict[str, torch.Tensor]:
    """Our weights for ``hf:<path>``: the checkpoint's, or random from ``seed`` in the config-only form."""
    src = resolve(model_id)
    cfg = cfg or convert_config(read_config(src.config_path), str(src.config_path))
    if src.weights_dir is None:
        from pytest_amk.models.llama import init_weights

        return init_weights(cfg, dtype, seed)
    return map_hf_state_dict(iter_checkpoint(src.weights_dir), cfg, dtype, str(src.weights_dir))


def load_model(model_id: str | os.PathLike[str], dtype: str, seed: int, max_seq: int) -> Llama:
    """The eager model for ``hf:<path>`` (``seed`` is used only by the config-only form)."""
    from pytest_amk.ir import DType
    from pytest_amk.models.llama import Llama

    cfg = config_from_id(model_id)
    return Llama(cfg, load_weights(model_id, DType(dtype).torch(), seed, cfg), max_seq)


# ---------------------------------------------------------------- transformers (reference generation)

def _transformers() -> Any:
    """transformers, imported with the hub offline (nothing is ever downloaded)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    return transformers


def hf_model(model_id: str | os.PathLike[str], dtype: str = "fp32", seed: int = 0) -> Any:
    """A transformers ``LlamaForCausalLM`` (eval mode, eager attention) for ``hf:<path>``: loaded by
    transformers itself from a directory, or built from the config with our seeded random weights
    (the same weights ``load_model`` gives) in the config-only form. Offline only."""
    from pytest_amk.ir import DType

    transformers = _transformers()

    src = resolve(model_id)
    raw = read_config(src.config_path)
    cfg = convert_config(raw, str(src.config_path))  # the same support check as our import
    tdtype = DType(dtype).torch()
    if src.weights_dir is not None:
        model = transformers.LlamaForCausalLM.from_pretrained(
            str(src.weights_dir), local_files_only=True, attn_implementation="eager")
    else:
        hf_cfg = transformers.LlamaConfig.from_dict({k: v for k, v in raw.items() if k != "transformers_version"})
        hf_cfg._attn_implementation = "eager"
        model = transformers.LlamaForCausalLM(hf_cfg)
        sd = to_hf_state_dict(cfg, load_weights(model_id, tdtype, seed, cfg))
        result = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
        missing = [k for k in result.missing_keys if not _ignorable(k, cfg)]
        if missing or result.unexpected_keys:
            raise HfModelError(f"{src.config_path}: weight mapping mismatch: missing {missing}, "
                               f"unexpected {result.unexpected_keys}")
        model.tie_weights()
    return model.to(tdtype).eval()


def hf_generate(model_id: str | os.PathLike[str], prompt_ids: list[int], max_new_tokens: int, *,
                dtype: str = "fp32", seed: int = 0, stop_at_eos: bool = False) -> list[int]:
    """Greedy ``generate`` with transformers for ``hf:<path>`` (prefix optional): the new tokens only.

    By default it does not stop at the config's EOS token, so it yields exactly ``max_new_tokens``
    tokens, like our decode loop. ``seed`` picks the random weights of the config-only form.
    """
    import torch

    transformers = _transformers()
    if not prompt_ids:
        raise ValueError("hf_generate needs at least one prompt token")
    model = hf_model(model_id, dtype, seed)
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    eos = model.generation_config.eos_token_id if stop_at_eos else None
    # generate() falls back to the model's own generation config for unset fields: clear EOS there too.
    model.generation_config.eos_token_id = eos
    gen = transformers.GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, num_beams=1, use_cache=True, eos_token_id=eos,
        pad_token_id=model.generation_config.pad_token_id or 0)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
    return [int(t) for t in out[0, ids.shape[1]:]]
