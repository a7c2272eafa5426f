"""The Hugging Face importer (model ids ``hf:<path>``) against transformers' own LlamaForCausalLM."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from pytest_amk import refvm
from pytest_amk.ir import TARGETS
from pytest_amk.lower import lower
from pytest_amk.models import config_for, load_model
from pytest_amk.models.hf import (
    HfModelError,
    UnsupportedModel,
    convert_config,
    hf_generate,
    hf_model,
    load_weights,
)
from pytest_amk.schedule import default_knobs

os.environ["HF_HUB_OFFLINE"] = "1"  # never touch a hub (transformers is imported lazily, after this)


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError, AttributeError):
        return False


HAVE_TRANSFORMERS = _importable("transformers")
needs_hf = pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers is not installed (pip install transformers)")

MAX_SEQ = 16
TOKENS = [3, 17, 42, 5, 60]  # fed at positions 0..4 (fixed, so degenerate greedy paths cannot hide errors)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}

CASES: dict[str, dict[str, Any]] = {
    # GQA ratio 1, tied, head_dim from hidden/heads (12)
    "mha-tied-h96": dict(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=128, tie_word_embeddings=True),
    # GQA ratio 2, untied, Llama-3 rope scaling, big theta
    "gqa2-untied-llama3-h160": dict(hidden_size=160, intermediate_size=224, num_hidden_layers=2,
                                    num_attention_heads=8, num_key_value_heads=4, vocab_size=136,
                                    tie_word_embeddings=False, rope_scaling=LLAMA3, rope_theta=500000.0),
    # GQA ratio 4, head_dim 16 != 96/8, other eps
    "gqa4-hd16-h96": dict(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=8,
                          num_key_value_heads=2, head_dim=16, vocab_size=128, tie_word_embeddings=False,
                          rms_norm_eps=1e-5),
    # GQA ratio 8 (MQA), tied, head_dim 24 != 160/8, llama3 with a different factor
    "mqa8-tied-llama3-hd24-h160": dict(hidden_size=160, intermediate_size=192, num_hidden_layers=2,
                                       num_attention_heads=8, num_key_value_heads=1, head_dim=24, vocab_size=96,
                                       tie_word_embeddings=True, rope_theta=20000.0,
                                       rope_scaling={**LLAMA3, "factor": 4.0,
                                                     "original_max_position_embeddings": 32}),
    # 3 layers, head_dim 40 wider than hidden/heads (24), q rows > hidden
    "wide-head-3L": dict(hidden_size=96, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=40, vocab_size=112, tie_word_embeddings=False),
}


def randomize(model: Any, seed: int) -> None:
    """O(1)-scale weights (HF's 0.02 init leaves attention nearly uniform, blind to RoPE errors)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            r = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * r if p.ndim == 1 else r / math.sqrt(p.shape[1]))


def make_hf(path: Path, seed: int = 0, max_shard_size: str | None = None, **cfg: Any) -> Any:
    """A random fp32 LlamaForCausalLM saved (safetensors) to ``path``; returns it in eval mode."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**cfg)
    config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(config).float().eval()
    randomize(model, seed)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kw)
    return model


def hf_step_logits(model: Any, tokens: list[int]) -> list[torch.Tensor]:
    """HF's own decode: one token at a time through its KV cache; fp32 logits per position."""
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.x / 4.x
    out_logits, cache = [], None
    with torch.no_grad():
        for t in tokens:
            kw = {name: cache} if cache is not None else {}
            out = model(input_ids=torch.tensor([[t]]), use_cache=True, **kw)
            cache = out[name]
            assert cache is not None
            out_logits.append(out.logits[0, -1].float())
    return out_logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    """Every case saved once per module: name -> (directory, HF model)."""
    if not HAVE_TRANSFORMERS:
        pytest.skip("transformers is not installed (pip install transformers)")
    root = tmp_path_factory.mktemp("hf")
    return {name: (root / name, make_hf(root / name, seed=i, **cfg)) for i, (name, cfg) in enumerate(CASES.items())}


@needs_hf
@pytest.mark.parametrize("case", list(CASES))
def test_refvm_and_eager_match_hf_decode(case: str, saved: dict[str, tuple[Path, Any]]) -> None:
    path, hf = saved[case]
    model_id = f"hf:{path}"
    cfg = config_for(model_id)
    expect = CASES[case]
    assert (cfg.hidden, cfg.heads, cfg.kv_heads, cfg.tied) == (
        expect["hidden_size"], expect["num_attention_heads"], expect["num_key_value_heads"],
        expect["tie_word_embeddings"])
    assert cfg.head_dim == expect.get("head_dim", expect["hidden_size"] // expect["num_attention_heads"])
    assert (cfg.rope_scaling is not None) == ("rope_scaling" in expect)

    ref = hf_step_logits(hf, TOKENS)
    model = load_model(model_id, "fp32", seed=123, max_seq=MAX_SEQ)
    program = lower(cfg, TARGETS["h100"], default_knobs(), "fp32", MAX_SEQ)
    bufs = refvm.alloc_buffers(program, refvm.bind_weights(program, model))
    for pos, token in enumerate(TOKENS):
        eager = model.step(token, pos)
        got = refvm.run_step(program, bufs, token, pos)
        assert (eager - ref[pos]).abs().max() < 1e-3, f"{case} eager vs HF at position {pos}"
        assert (got - ref[pos]).abs().max() < 1e-3, f"{case} reference VM vs HF at position {pos}"
        assert int(bufs[program.buffer("next_token").id][0]) == int(got.argmax())
    assert float(ref[-1].abs().max()) > 0.5  # logits of O(1): the 1e-3 bound means something


@needs_hf
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_matches_hf_within_oracle_tolerance(dtype: str, saved: dict[str, tuple[Path, Any]]) -> None:
    """Same rounding points as HF: our bf16/fp16 logits agree with transformers' at the oracle's tolerance."""
    from pytest_amk.oracle import compare_logits

    path, _ = saved["gqa2-untied-llama3-h160"]
    ref = hf_step_logits(hf_model(path, dtype), TOKENS)
    model = load_model(f"hf:{path}", dtype, 0, MAX_SEQ)
    program = lower(model.cfg, TARGETS["h100"], default_knobs(), dtype, MAX_SEQ)
    bufs = refvm.alloc_buffers(program, refvm.bind_weights(program, model))
    for pos, token in enumerate(TOKENS):
        for what, got in (("eager", model.step(token, pos)), ("refvm", refvm.run_step(program, bufs, token, pos))):
            cmp = compare_logits(got, ref[pos], dtype, f"{what} vs HF {dtype}, position {pos}")
            assert cmp.ok, cmp.message


def rotate_half_to_interleaved(w: torch.Tensor, heads: int, d: int) -> torch.Tensor:
    """Reorder each head's rows (x0..x_{d/2-1}, y0..) -> (x0, y0, x1, y1, ...): the Meta layout."""
    h = w[: heads * d].view(heads, 2, d // 2, -1).transpose(1, 2).reshape(heads * d, -1)
    return torch.cat([h, w[heads * d:]])


@needs_hf
def test_rope_layout_and_scaling_are_checked_numerically(saved: dict[str, tuple[Path, Any]]) -> None:
    """No q/k permutation is needed, and the comparison would notice one (or a missing rope scaling)."""
    from pytest_amk.models.llama import Llama

    path, hf = saved["gqa2-untied-llama3-h160"]
    ref = hf_step_logits(hf, TOKENS)
    good = load_model(f"hf:{path}", "fp32", 0, MAX_SEQ)
    c = good.cfg
    w = dict(good.w)
    for i in range(c.layers):  # permute q and k rows; v untouched
        qkv = w[f"layers.{i}.wqkv"]
        qk = rotate_half_to_interleaved(qkv[: (c.heads + c.kv_heads) * c.head_dim], c.heads + c.kv_heads, c.head_dim)
        w[f"layers.{i}.wqkv"] = torch.cat([qk, qkv[(c.heads + c.kv_heads) * c.head_dim:]])
    permuted = Llama(c, w, MAX_SEQ)
    unscaled = Llama(replace(c, rope_scaling=None), good.w, MAX_SEQ)
    errs: dict[str, float] = {"good": 0.0, "permuted": 0.0, "unscaled": 0.0}
    for pos, token in enumerate(TOKENS):
        for name, m in (("good", good), ("permuted", permuted), ("unscaled", unscaled)):
            errs[name] = max(errs[name], float((m.step(token, pos) - ref[pos]).abs().max()))
    assert errs["good"] < 1e-3
    assert errs["permuted"] > 1e-2 and errs["unscaled"] > 1e-2, errs


def eager_greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    model.reset()
    for pos, t in enumerate(prompt):
        logits = model.step(t, pos)
    out: list[int] = []
    for pos in range(len(prompt), len(prompt) + n):
        out.append(int(logits.argmax()))
        if len(out) < n:
            logits = model.step(out[-1], pos)
    return out


@needs_hf
def test_greedy_generation_matches_hf_generate(saved: dict[str, tuple[Path, Any]]) -> None:
    path, _ = saved["gqa4-hd16-h96"]
    prompt = [1, 9, 33, 7]
    ours = eager_greedy(load_model(f"hf:{path}", "fp32", 0, 48), prompt, 32)
    theirs = hf_generate(f"hf:{path}", prompt, 32)
    assert theirs == ours
    assert len(set(ours)) > 3  # not a degenerate repeat


@needs_hf
def test_hf_generate_ignores_eos_unless_asked(tmp_path: Path, saved: dict[str, tuple[Path, Any]]) -> None:
    src, _ = saved["mha-tied-h96"]
    prompt = [1, 2]
    ours = eager_greedy(load_model(f"hf:{src}", "fp32", 0, 48), prompt, 32)
    eos = ours[4]  # make a token that greedy decoding reaches the model's EOS
    path = tmp_path / "eos"
    shutil.copytree(src, path)
    gen_cfg = json.loads((path / "generation_config.json").read_text(encoding="utf-8"))
    (path / "generation_config.json").write_text(json.dumps({**gen_cfg, "eos_token_id": eos}), encoding="utf-8")
    assert hf_generate(path, prompt, 32) == ours  # the "hf:" prefix is optional here
    assert hf_generate(path, prompt, 32, stop_at_eos=True) == ours[: ours.index(eos) + 1]


@needs_hf
def test_sharded_and_torch_fallback_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = CASES["gqa4-hd16-h96"]
    make_hf(tmp_path / "one", seed=5, **cfg)
    make_hf(tmp_path / "sharded", seed=5, max_shard_size="60KB", **cfg)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    a = load_weights(f"hf:{tmp_path / 'one'}", torch.float32)
    b = load_weights(f"hf:{tmp_path / 'sharded'}", torch.float32)
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors -> ImportError
    c = load_weights(f"hf:{tmp_path / 'one'}", torch.bfloat16)
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
        assert c[k].dtype == torch.bfloat16 and torch.equal(a[k].to(torch.bfloat16), c[k]), k


@needs_hf
def test_config_only_form(tmp_path: Path) -> None:
    import transformers

    config = transformers.LlamaConfig(**CASES["gqa2-untied-llama3-h160"])
    config.to_json_file(tmp_path / "config.json")
    model_id = f"hf:{tmp_path / 'config.json'}"
    cfg = config_for(model_id)
    assert cfg.rope_scaling and cfg.rope_scaling["factor"] == 8.0 and cfg.rope_theta == 500000.0
    a, b, c = (load_model(model_id, "fp32", s, MAX_SEQ) for s in (7, 7, 8))
    assert all(torch.equal(a.w[k], b.w[k]) for k in a.w)
    assert not torch.equal(a.w["embed"], c.w["embed"])
    # A directory with only config.json is not silently random: it points at the config-only form.
    with pytest.raises(HfModelError, match="config-only"):
        config_for(f"hf:{tmp_path}")
    # transformers built from the same config with the same seeded weights agrees.
    ref = hf_step_logits(hf_model(model_id, seed=7), TOKENS)
    for pos, token in enumerate(TOKENS):
        assert (a.step(token, pos) - ref[pos]).abs().max() < 1e-3
    prompt = [2, 11, 40]
    assert hf_generate(model_id, prompt, 12, seed=7) == eager_greedy(a, prompt, 12)


@needs_hf
def test_schedule_with_hf_model_passes_cpu_stages(tmp_path: Path, saved: dict[str, tuple[Path, Any]]) -> None:
    from pytest_amk.pipeline import evaluate

    path, _ = saved["mqa8-tied-llama3-hd24-h160"]
    toml = tmp_path / "hf.toml"
    toml.write_text(f'[model]\nid = "hf:{path}"\ndtype = "fp32"\nmax_seq = 16\n\n[target]\ngpu = "h100"\n\n'
                    '[[schedule]]\nname = "default"\n', encoding="utf-8")
    v = evaluate(toml, device="cpu", steps=3)
    assert v.valid and v.correct, v
    assert v.max_abs_err is not None and v.max_abs_err < 1e-3


# ---------------------------------------------------------------- config conversion (no transformers needed)

BASE: dict[str, Any] = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 96, "intermediate_size": 160,
    "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 128,
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
    "rms_norm_eps": 1e-5,
}


def test_legacy_and_v5_rope_forms_agree() -> None:
    v4 = {**BASE, "rope_theta": 500000.0, "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 8192}}
    v5 = {**BASE, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}}
    a, b = convert_config(v4), convert_config(v5)
    assert a == b and a.rope_scaling == b.rope_scaling
    assert a.rope_theta == 500000.0 and a.rope_scaling["original_max_position_embeddings"] == 8192
    plain = convert_config({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})
    assert plain.rope_scaling is None and plain.head_dim == 12 and plain.rms_eps == 1e-5
    defaults = convert_config({k: v for k, v in BASE.items() if k not in ("num_key_value_heads", "rms_norm_eps")})
    assert defaults.kv_heads == 8 and defaults.rms_eps == 1e-6 and defaults.rope_theta == 10000.0


@pytest.mark.parametrize(("key", "value", "named"), [
    ("attention_bias", True, "attention_bias = True"),
    ("mlp_bias", True, "mlp_bias = True"),
    ("hidden_act", "gelu", "hidden_act = 'gelu'"),
    ("model_type", "mistral", "model_type = 'mistral'"),
    ("architectures", ["LlamaForSequenceClassification"], "architectures = ['LlamaForSequenceClassification']"),
    ("num_local_experts", 8, "num_local_experts = 8"),
    ("num_experts_per_tok", 2, "num_experts_per_tok = 2"),
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}, "rope_scaling.rope_type = 'linear'"),
    ("rope_scaling", {"type": "dynamic", "factor": 2.0}, "rope_scaling.type = 'dynamic'"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}, "rope_parameters.rope_type = 'yarn'"),
    ("partial_rotary_factor", 0.5, "partial_rotary_factor = 0.5"),
    ("head_dim", 13, "head_dim = 13"),
])
def test_unsupported_configs_name_the_key(tmp_path: Path, key: str, value: Any, named: str) -> None:
    raw = {**BASE, key: value}
    with pytest.raises(UnsupportedModel) as e:
        convert_config(raw)
    assert named in str(e.value)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace("]", r"\]")):  # what the pipeline sees
        config_for(f"hf:{path}")


def test_bad_paths_and_configs(tmp_path: Path) -> None:
    with pytest.raises(HfModelError, match="no such directory"):
        config_for(f"hf:{tmp_path / 'nope'}")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(HfModelError, match="cannot read"):
        config_for(f"hf:{bad}")
    with pytest.raises(HfModelError, match="missing vocab_size"):
        convert_config({k: v for k, v in BASE.items() if k != "vocab_size"})
    with pytest.raises(HfModelError, match="num_key_value_heads = 3"):
        convert_config({**BASE, "num_key_value_heads": 3})
    with pytest.raises(HfModelError, match="needs rope_parameters.low_freq_factor"):
        convert_config({**BASE, "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}})


def test_config_for_hf_imports_no_torch(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(BASE), encoding="utf-8")
    code = ("import sys; from pytest_amk.models import config_for; "
            f"c = config_for({'hf:' + str(path)!r}); assert c.kv_heads == 2; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
