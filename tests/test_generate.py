"""Greedy generation with one lowered program (pytest_amk.generate): the reference VM against
eager (and HF ``generate`` for ``hf:`` models), the ``tokens`` stage of schedule items,
``amk generate``, and the megakernel where a GPU is usable. fp32 throughout (exact sequences)
except where the near-tie rule is the subject.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

# In-process pytester runs drop the modules a run imported; import C extensions (and the
# pipeline with its caches) before any inner run, as tests/test_plugin.py does.
import torch  # noqa: E402
from helpers import assert_input_error

from pytest_amk import generate as g  # noqa: E402
from pytest_amk import pipeline, refvm  # noqa: E402
from pytest_amk.cli import main  # noqa: E402
from pytest_amk.ir import TARGETS  # noqa: E402
from pytest_amk.lower import lower  # noqa: E402
from pytest_amk.models import load_model  # noqa: E402
from pytest_amk.schedule import default_knobs, parse_file  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"  # never touch a hub

HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None

TOY = """\
[model]
id = "{model}"
dtype = "fp32"
max_seq = {max_seq}

[target]
gpu = "h100"

[[schedule]]
name = "default"
"""

# Odd sizes, GQA ratio 2, untied, Llama-3 rope scaling, head_dim 12 = 96 / 8 (config-only: random
# weights from the schedule's seed, no transformers needed to build it).
HF_CONFIG: dict[str, Any] = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 96, "intermediate_size": 160,
    "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 136,
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 64,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 16},
}

# A bug in the reference VM that shows only from position 4 on: the value rows appended to the
# KV cache are scaled. The reference stage (--amk-steps=2) cannot see it; the tokens stage must.
LATE_BUG = """
from pytest_amk import refvm

_orig = refvm.OPS_IMPL["ROPE_APPEND"]
_orig_fused = refvm.OPS_IMPL["ROPE_ATTN_PARTIAL"]


def _scale_v(bufs, p):
    pos = int(bufs[p["pos"]][0])
    if pos >= 4:
        d, g, ms = p["head_dim"], p["kv_head"], p["max_seq"]
        bufs[p["v_cache"]][(g * ms + pos) * d:(g * ms + pos + 1) * d] *= -3.0


def rope_append_late_bug(bufs, p):
    _orig(bufs, p)
    _scale_v(bufs, p)


def rope_attn_late_bug(bufs, p):  # the fused op: only the task whose block holds pos appends
    _orig_fused(bufs, p)
    pos, kb = int(bufs[p["pos"]][0]), p["kv_block"]
    if p["blk"] * kb <= pos < (p["blk"] + 1) * kb:
        _scale_v(bufs, p)
"""


def late_bug(monkeypatch: pytest.MonkeyPatch) -> None:
    ns: dict[str, Any] = {}
    exec(LATE_BUG, ns)
    monkeypatch.setitem(refvm.OPS_IMPL, "ROPE_APPEND", ns["rope_append_late_bug"])
    monkeypatch.setitem(refvm.OPS_IMPL, "ROPE_ATTN_PARTIAL", ns["rope_attn_late_bug"])


def toy_program(model: str = "toy", dtype: str = "fp32", max_seq: int = 48) -> tuple[Any, Any]:
    m = load_model(model, dtype, 0, max_seq)
    return lower(m.cfg, TARGETS["h100"], default_knobs(), dtype, max_seq), m


@pytest.fixture
def hf_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(HF_CONFIG), encoding="utf-8")
    return path


# -- the decode loop ---------------------------------------------------------------------------

class FakeDecoder:
    engine = "refvm"
    max_seq, vocab = 10, 100

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def step(self, token: int, pos: int) -> tuple[int, torch.Tensor]:
        self.calls.append((token, pos))
        return 50 + pos, torch.zeros(self.vocab)


def test_prompt_fed_step_by_step_then_own_tokens() -> None:
    dec = FakeDecoder()
    out = g.decode(dec, [5, 6, 7], 4, keep_logits=True)
    assert dec.calls == [(5, 0), (6, 1), (7, 2), (52, 3), (53, 4), (54, 5)]
    assert out.tokens == [52, 53, 54, 55]
    assert len(out.step_us) == 6 and len(out.token_us) == 4 and out.logits is not None and len(out.logits) == 4
    # P + N - 1 <= max_seq: 3 + 8 - 1 = 10 fits exactly; one more does not.
    assert len(g.decode(FakeDecoder(), [5, 6, 7], 8).tokens) == 8
    with pytest.raises(g.GenerationError, match=r"need positions 0\.\.10, but max_seq is 10 .*at most 8 new"):
        g.decode(FakeDecoder(), [5, 6, 7], 9)
    assert g.decode(FakeDecoder(), [1], 0).tokens == []


@pytest.mark.parametrize("prompt, n, match", [
    ([], 3, "at least one prompt token"),
    ([1, 100], 3, r"prompt token 100 is outside the vocabulary \[0, 100\)"),
    ([1, -1], 3, "prompt token -1"),
    ([1], -1, "non-negative"),
])
def test_bad_requests(prompt: list[int], n: int, match: str) -> None:
    with pytest.raises(g.GenerationError, match=match):
        g.check_request(prompt, n, 10, 100)


def test_position_beyond_max_seq_is_a_clean_error_for_every_engine() -> None:
    program, model = toy_program(max_seq=8)
    for run in (lambda: g.generate(program, model, [1, 2], 8), lambda: g.eager_generate(model, [1, 2], 8)):
        with pytest.raises(g.GenerationError, match="max_seq is 8"):
            run()
    with pytest.raises(ValueError, match="device 'tpu'"):
        g.generate(program, model, [1], 2, "tpu")


# -- the reference VM against eager and HF ----------------------------------------------------

@pytest.mark.parametrize("model", ["toy", "toy-4L"])
def test_refvm_generation_equals_eager_fp32(model: str) -> None:
    program, m = toy_program(model, max_seq=40)
    got = g.generate(program, m, [1], 32)
    ref = g.eager_generate(m, [1], 32, keep_logits=True)
    assert got.engine == "refvm" and ref.engine == "eager"
    assert got.tokens == ref.tokens
    assert len(set(got.tokens)) > 5  # not a degenerate repeat
    check = g.compare_tokens(got, ref, "fp32")
    assert check.ok and check.divergence is None and check.compared == 32
    assert got.median_us is not None and got.median_us > 0


def test_hf_config_generation_equals_eager_and_hf_generate(hf_config: Path) -> None:
    model_id = f"hf:{hf_config}"
    m = load_model(model_id, "fp32", 7, 48)
    program = lower(m.cfg, TARGETS["h100"], default_knobs(), "fp32", 48)
    prompt = [1, 9, 33, 7]
    got = g.generate(program, m, prompt, 32)
    ref = g.eager_generate(m, prompt, 32)
    assert got.tokens == ref.tokens and len(got.tokens) == 32
    assert len(set(got.tokens)) > 5
    if not HAVE_TRANSFORMERS:
        pytest.skip("transformers is not installed: HF generate not compared")
    from pytest_amk.models.hf import hf_generate

    assert hf_generate(model_id, prompt, 32, seed=7) == got.tokens


# -- the comparison rule ---------------------------------------------------------------------

def _ref(tokens: list[int], logits: list[list[float]] | None) -> g.Generation:
    return g.Generation("eager", [1], tokens, [], None if logits is None else [torch.tensor(x) for x in logits])


def test_near_tie_divergence_passes_a_real_difference_fails() -> None:
    ref = _ref([2, 0, 1], [[0.0, 1.0, 3.0], [5.0, 1.0, 0.0], [0.0, 4.0, 4.0 - 1e-4]])
    assert g.compare_tokens([2, 0, 1], ref, "fp32").ok
    # Position 2: eager's logits of 1 and 2 are 1e-4 apart (fp32 tolerance 1e-3 + 1e-4 * 4): a near-tie.
    tie = g.compare_tokens([2, 0, 2], ref, "fp32", got_name="megakernel")
    assert tie.ok and tie.divergence is not None and tie.divergence.near_tie
    assert (tie.divergence.index, tie.divergence.pos, tie.divergence.got, tie.divergence.expected) == (2, 2, 2, 1)
    assert "near-tie divergence at generated token 2 (position 2): megakernel chose 2, eager 1" in tie.message
    # Position 1: 5.0 vs 1.0 is no near-tie; later tokens do not matter.
    bad = g.compare_tokens([2, 1, 1], ref, "fp32")
    assert not bad.ok and bad.divergence is not None and not bad.divergence.near_tie
    assert bad.divergence.gap == pytest.approx(4.0) and bad.compared == 2
    assert "greedy tokens differ at generated token 1 (position 1)" in bad.message and "not a near-tie" in bad.message
    # The same 4.0 gap is within bf16's tolerance only when the logits are large.
    assert not g.near_tie(torch.tensor([5.0, 1.0]), 0, 1, "bf16")[0]
    assert g.near_tie(torch.tensor([300.0, 296.0]), 0, 1, "bf16")[0]
    # Without reference logits any difference fails; so does a length mismatch.
    assert not g.compare_tokens([2, 0, 2], _ref([2, 0, 1], None), "fp32").ok
    assert not g.compare_tokens([2, 0], ref, "fp32").ok


def test_bf16_toy_diverges_only_at_a_near_tie() -> None:
    """bf16 eager rounds its logits to bf16 (ties pick the smaller id); the reference VM keeps them
    in fp32. Where the two greedy sequences part, eager's logits must be a near-tie."""
    program, m = toy_program("toy", "bf16", max_seq=40)
    got = g.generate(program, m, [1], 32)
    ref = g.eager_generate(m, [1], 32, keep_logits=True)
    check = g.compare_tokens(got, ref, "bf16")
    assert check.ok, check.message
    if check.divergence is not None:
        assert check.divergence.near_tie and "near-tie" in check.message


# -- the "tokens" stage of schedule items ------------------------------------------------------

def _schedule(tmp_path: Path, tokens: int, max_seq: int = 48, name: str = "default") -> Path:
    path = tmp_path / "toy.toml"
    path.write_text(TOY.format(model="toy", max_seq=max_seq).replace(
        'name = "default"', f'name = "{name}"\nexpect.tokens = {tokens}'), encoding="utf-8")
    return path


def test_tokens_stage_in_the_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sf = parse_file(_schedule(tmp_path, 16))
    result = pipeline.run_schedule(sf, sf.schedules[0], "cpu", steps=2)
    assert result.outcome == pipeline.PASS, result.message
    stage = result.stages[-1]
    assert (stage.name, stage.status) == ("tokens", "ok")
    assert stage.detail == "16 greedy tokens equal eager's (prompt [1], reference VM)"

    late_bug(monkeypatch)
    result = pipeline.run_schedule(sf, sf.schedules[0], "cpu", steps=2)
    assert result.outcome == pipeline.FAIL
    assert [s.status for s in result.stages] == ["ok", "ok", "ok", "skipped", "failed"]
    assert result.message.startswith("greedy tokens differ at generated token ")
    assert "reference VM chose" in result.message and "not a near-tie" in result.message
    assert result.verdict.correct is False and result.verdict.latency_us is None


def test_tokens_beyond_max_seq_fails_with_the_reason(tmp_path: Path) -> None:
    sf = parse_file(_schedule(tmp_path, 40, max_seq=32))
    result = pipeline.run_schedule(sf, sf.schedules[0], "cpu", steps=2)
    assert result.outcome == pipeline.FAIL
    assert result.message.startswith("expect.tokens = 40: 1 prompt tokens + 40 new tokens need positions 0..39, "
                                     "but max_seq is 32")



def test_schedule_item_with_expect_tokens(amk: pytest.Pytester) -> None:
    text = TOY.format(model="toy", max_seq=48).replace('name = "default"', 'name = "default"\nexpect.tokens = 16')
    (amk.path / "schedules" / "toy.toml").write_text(text)
    args = ("--amk-steps=2", "--amk-device=cpu", "-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-rA")
    result = amk.runpytest(*args)
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines(["tokens *ok *16 greedy tokens equal eager's (prompt ?1?, reference VM)"])

    # The same file with a reference-VM bug past position 4 (the conftest patches it at import).
    amk.makeconftest(LATE_BUG + '\nrefvm.OPS_IMPL["ROPE_APPEND"] = rope_append_late_bug\n'
                   + 'refvm.OPS_IMPL["ROPE_ATTN_PARTIAL"] = rope_attn_late_bug\n')
    try:
        result = amk.runpytest(*args)
    finally:
        refvm.OPS_IMPL["ROPE_APPEND"] = refvm.op_rope_append
        refvm.OPS_IMPL["ROPE_ATTN_PARTIAL"] = refvm.op_rope_attn_partial
    assert result.ret == 1
    assert result.parseoutcomes() == {"failed": 1}
    result.stdout.fnmatch_lines([
        "FAIL: greedy tokens differ at generated token * (position *): reference VM chose *, eager *",
        "stage *status *seconds *detail",
        "reference *ok *",
        "tokens *failed *greedy tokens differ*",
    ])


# -- amk generate ------------------------------------------------------------------------------

def amk_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@pytest.fixture
def toy_file(tmp_path: Path) -> Path:
    path = tmp_path / "toy.toml"
    path.write_text(TOY.format(model="toy", max_seq=32) + '\n[[schedule]]\nname = "huge"\nthreads_per_block = 2048\n')
    return path


GEN_KEYS = {"schedule_id", "model", "dtype", "gpu", "device", "engine", "prompt_ids", "tokens", "latency_us",
            "max_tokens", "ok", "verify"}
VERIFY_KEYS = {"equal", "eager", "hf", "hf_note", "eager_latency_us", "vs_eager", "vs_hf"}


def test_cli_generate_verify_json(capsys: pytest.CaptureFixture[str], toy_file: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    lower_schedule = pipeline.lower_schedule
    monkeypatch.setattr(pipeline, "lower_schedule", lambda sf, s: calls.append(s.name) or lower_schedule(sf, s))
    code, out, _ = amk_cli(capsys, "generate", str(toy_file), "--prompt-ids", "1,2,3", "--max-tokens", "12",
                           "--verify", "--json")
    assert code == 0
    assert calls == ["default"]  # lowered once for all 14 steps
    r = json.loads(out)
    assert set(r) == GEN_KEYS and set(r["verify"]) == VERIFY_KEYS
    assert (r["schedule_id"], r["engine"], r["device"], r["prompt_ids"]) == ("toy.toml::default", "refvm", "cpu",
                                                                              [1, 2, 3])
    assert len(r["tokens"]) == 12 and r["ok"] is True
    assert r["verify"]["equal"] is True and r["verify"]["eager"] == r["tokens"]
    assert r["verify"]["hf"] is None and "hf: models only" in r["verify"]["hf_note"]
    assert r["verify"]["vs_eager"] == {"ok": True, "compared": 12, "first_divergence": None,
                                       "message": "12 greedy tokens equal eager's"}
    assert len(r["latency_us"]["per_token"]) == 12 and r["latency_us"]["median_per_token"] > 0

    code, out, _ = amk_cli(capsys, "generate", str(toy_file), "--prompt-ids", "1,2,3", "--max-tokens", "4")
    assert code == 0
    assert out.splitlines()[1] == "tokens: " + " ".join(map(str, r["tokens"][:4]))


def test_cli_generate_verify_mismatch_exits_1(capsys: pytest.CaptureFixture[str], toy_file: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    late_bug(monkeypatch)
    code, out, _ = amk_cli(capsys, "generate", str(toy_file), "--prompt-ids", "1", "--max-tokens", "16",
                           "--verify", "--json")
    assert code == 1
    r = json.loads(out)
    assert r["ok"] is False and r["verify"]["equal"] is False
    d = r["verify"]["vs_eager"]["first_divergence"]
    assert d["index"] >= 4 and d["got"] == r["tokens"][d["index"]] and d["expected"] == r["verify"]["eager"][d["index"]]
    assert d["near_tie"] is False
    code, out, _ = amk_cli(capsys, "generate", str(toy_file), "--prompt-ids", "1", "--max-tokens", "16", "--verify")
    assert code == 1
    assert "verify: DIFFER (exit 1)" in out and f"* {d['index']:>4}" in out


@pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers is not installed")
def test_cli_generate_verify_hf(capsys: pytest.CaptureFixture[str], tmp_path: Path, hf_config: Path) -> None:
    path = tmp_path / "hf.toml"
    path.write_text(TOY.format(model=f"hf:{hf_config}", max_seq=24).replace("max_seq", "seed = 3\nmax_seq"))
    code, out, _ = amk_cli(capsys, "generate", str(path), "--prompt-ids", "5,6", "--max-tokens", "16", "--verify",
                           "--json")
    assert code == 0, out
    r = json.loads(out)
    assert r["verify"]["hf"] == r["verify"]["eager"] == r["tokens"] and r["verify"]["hf_note"] is None
    assert r["verify"]["vs_hf"]["ok"] is True
    code, out, _ = amk_cli(capsys, "generate", str(path), "--prompt-ids", "5,6", "--max-tokens", "3", "--verify")
    assert code == 0 and "HF generate" in out and "verify: OK" in out


@pytest.mark.parametrize("args, words", [
    (("--prompt-ids", "1,x", "--max-tokens", "4"), ["--prompt-ids: 'x' is not an integer"]),
    (("--prompt-ids", "", "--max-tokens", "4"), ["--prompt-ids"]),
    (("--prompt-ids", "1,512", "--max-tokens", "4"), ["--prompt-ids: prompt token 512 is outside the vocabulary"]),
    (("--prompt-ids", "1", "--max-tokens", "0"), ["--max-tokens: must be at least 1"]),
    (("--prompt-ids", "1", "--max-tokens", "many"), ["--max-tokens: expected an integer"]),
    (("--prompt-ids", "1,2", "--max-tokens", "32"), ["--max-tokens:", "max_seq is 32", "at most 31 new tokens"]),
    (("--prompt-ids", "1", "--max-tokens", "4", "--schedule", "nope"), ["--schedule: no schedule named 'nope'"]),
])
def test_cli_generate_bad_input_exits_2(capsys: pytest.CaptureFixture[str], toy_file: Path,
                                        args: tuple[str, ...], words: list[str]) -> None:
    code, _, err = amk_cli(capsys, "generate", str(toy_file), *args)
    assert_input_error(code, err, "amk generate: error:", *words)


def test_cli_generate_missing_file_rejected_and_no_gpu(capsys: pytest.CaptureFixture[str], toy_file: Path) -> None:
    code, _, err = amk_cli(capsys, "generate", "missing.toml", "--prompt-ids", "1", "--max-tokens", "2")
    assert_input_error(code, err, "missing.toml: cannot read")
    code, _, err = amk_cli(capsys, "generate", str(toy_file), "--schedule", "huge", "--prompt-ids", "1",
                           "--max-tokens", "2")
    assert code == 1 and err.startswith("amk generate: REJECTED ") and "threads_per_block" in err
    if not torch.cuda.is_available():
        code, _, err = amk_cli(capsys, "generate", str(toy_file), "--prompt-ids", "1", "--max-tokens", "2",
                               "--device", "cuda")
        assert_input_error(code, err, "no usable GPU")


# -- the megakernel (skipped without a usable GPU) -----------------------------------------------

def _gpu_ok() -> tuple[bool, str]:
    from pytest_amk import gpu

    return gpu.available()


@pytest.mark.skipif(not _gpu_ok()[0], reason=f"GPU VM not run: {_gpu_ok()[1]}")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_megakernel_generation_equals_refvm_and_eager(dtype: str) -> None:
    program, m = toy_program("toy-4L", dtype, max_seq=40)
    got = g.generate(program, m, [1, 2], 32, "cuda")
    assert got.engine == "megakernel" and len(got.tokens) == 32
    cuda_eager = load_model("toy-4L", dtype, 0, 40)
    cuda_eager = type(cuda_eager)(cuda_eager.cfg, cuda_eager.w, 40, device="cuda")
    for ref in (g.eager_generate(m, [1, 2], 32, keep_logits=True),
                g.eager_generate(cuda_eager, [1, 2], 32, keep_logits=True)):
        check = g.compare_tokens(got, ref, dtype, got_name="megakernel")
        assert check.ok, check.message
        if dtype == "fp32":
            assert check.divergence is None, check.message
    if dtype == "fp32":
        assert got.tokens == g.generate(program, m, [1, 2], 32).tokens
    assert math.isfinite(got.median_us or math.nan)
