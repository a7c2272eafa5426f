"""Greedy generation with a lowered program: lower once, decode many.

A program's decode step reads its token, position and sequence length from input
buffers, so one lowered (and proven) program serves every position below its
``max_seq``. ``generate`` feeds the prompt one token per step (positions
0..P-1), then each new token is the program's own ``next_token`` output (the
on-device argmax) fed back at the next position. It runs on the reference VM
(``device="cpu"``: one set of buffers for all steps) or the CUDA megakernel
(``device="cuda"``: one ``GpuRunner`` for all steps, weights uploaded once).
``eager_generate`` does the same with the eager ``Llama.step`` for comparison.

P prompt tokens and N new tokens take P + N - 1 decode steps (positions
0..P+N-2: the last new token is never fed back), so N <= max_seq - P + 1.

Comparing greedy sequences (``compare_tokens``; the ``tokens`` stage of a schedule
with ``[schedule.expect] tokens = N``): tokens are compared in order up to the first
position where they differ. There the eager logits decide. If eager's logit of its
own token and of the other side's token are within the oracle's tolerance for the
dtype (``pytest_amk.oracle.TOLERANCES``: ``atol + rtol * max|logits|``, the same
rule as the oracle's top-1 agreement), the step is a near-tie that rounding may
flip: the check passes, reports the near-tie divergence, and compares no further
(the two sequences then continue from different contexts). Otherwise it FAILS,
naming the first differing position and both tokens. In fp32 the sequences are
exact; bf16 sequences can legitimately part after a near-tie.

K tokens in one launch (``tokens_per_launch`` K > 1, ``amk generate --tokens-per-launch K``)
-------------------------------------------------------------------------------------------
The per-token path pays one launch, three input writes, a synchronisation and a read of
``next_token`` per token. With K > 1 on the megakernel, the prompt is still fed one token per
step, then the new tokens come in launches of K (the last one shorter): the VM runs its queues K
times in one launch, its on-device argmax feeding the next step's token and position
(``GpuRunner.run_tokens``; the proof that a program may do so is ``pytest_amk.multistep``, the
kernel side is in vm/amk_vm.cu). Same kernels, same reduction order: the tokens equal the
per-token path's exactly. Each token's wall time is its launch's divided by its token count.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from pytest_amk.ir import Program
    from pytest_amk.models.llama import Llama
    from pytest_amk.schedule import Schedule, ScheduleFile

ENGINES = {"cpu": "refvm", "cuda": "megakernel"}
ENGINE_NAMES = {"refvm": "reference VM", "megakernel": "megakernel", "eager": "eager"}
CHECK_PROMPT = (1,)  # the fixed prompt of a schedule's "tokens" stage


class GenerationError(ValueError):
    """Bad generation input (empty prompt, token outside the vocabulary, positions past max_seq)."""


@dataclass
class Generation:
    """The new tokens of one greedy decode and the wall time of each decode step."""

    engine: str  # "refvm" | "megakernel" | "eager"
    prompt: list[int]
    tokens: list[int]
    step_us: list[float] = field(default_factory=list)  # every step, prompt steps first
    logits: list[torch.Tensor] | None = None  # logits[i] chose tokens[i] (keep_logits=True)
    tokens_per_launch: int = 1  # K > 1: new tokens came in K-token launches (step_us: launch time / K)

    @property
    def token_us(self) -> list[float]:
        """Wall time of the steps that produced a new token (the last prompt step on)."""
        return self.step_us[len(self.prompt) - 1:] if self.tokens else []

    @property
    def median_us(self) -> float | None:
        return statistics.median(self.token_us) if self.token_us else None

    def to_json(self) -> dict[str, Any]:
        med = self.median_us
        return {"engine": self.engine, "prompt_ids": self.prompt, "tokens": self.tokens,
                "latency_us": {"median_per_token": None if med is None else round(med, 1),
                               "per_token": [round(t, 1) for t in self.token_us],
                               "tokens_per_launch": self.tokens_per_launch}}


# -- decoders: one decode step each, returning the next token -------------------------

class Decoder(Protocol):
    engine: str
    max_seq: int
    vocab: int

    def step(self, token: int, pos: int) -> tuple[int, torch.Tensor]:
        """Feed ``token`` at ``pos``; returns (next token, fp32 logits)."""
        ...


def _program_limits(program: Program) -> tuple[int, int]:
    """(max_seq, vocab) of a lowered program."""
    return int(program.meta["max_seq"]), program.buffer("logits").numel


class RefVmDecoder:
    """The reference VM: one set of buffers, the model's weights bound once."""

    engine = "refvm"

    def __init__(self, program: Program, model: Llama) -> None:
        from pytest_amk import refvm

        self.program = program
        self.max_seq, self.vocab = _program_limits(program)
        self.bufs = refvm.alloc_buffers(program, refvm.bind_weights(program, model))
        self._next = program.buffer("next_token").id

    def step(self, token: int, pos: int) -> tuple[int, torch.Tensor]:
        from pytest_amk import refvm

        logits = refvm.run_step(self.program, self.bufs, token, pos)
        return int(self.bufs[self._next][0]), logits


class GpuDecoder:
    """The CUDA megakernel: one ``GpuRunner`` (weights on the GPU) for every step."""

    engine = "megakernel"

    def __init__(self, program: Program, model: Llama | None = None, runner: Any = None,
                 validate: bool = False) -> None:
        self.program = program
        self.max_seq, self.vocab = _program_limits(program)
        if runner is None:
            if model is None:
                raise ValueError("GpuDecoder needs a model (weights) or a runner")
            from pytest_amk import gpu, refvm

            dev = f"cuda:{gpu.device_info().index}"
            bufs = refvm.alloc_buffers(program, refvm.bind_weights(program, model), dev)
            runner = gpu.GpuRunner(program, bufs, validate=validate)
        self.runner = runner

    def step(self, token: int, pos: int) -> tuple[int, torch.Tensor]:
        logits = self.runner.run_step(token, pos)
        nt = self.runner.next_token()
        return (int(logits.argmax()) if nt is None else nt), logits

    def steps(self, token: int, pos: int, k: int) -> list[int]:
        """``k`` greedy tokens from ``token`` at ``pos`` in one launch (``GpuRunner.run_tokens``)."""
        return self.runner.run_tokens(token, pos, k)


class EagerDecoder:
    """Eager ``Llama.step`` (its KV cache is reset first); the next token is the argmax."""

    engine = "eager"

    def __init__(self, model: Llama) -> None:
        self.model = model
        self.max_seq, self.vocab = model.max_seq, model.cfg.vocab
        model.reset()

    def step(self, token: int, pos: int) -> tuple[int, torch.Tensor]:
        logits = self.model.step(token, pos)
        return int(logits.argmax()), logits


# -- the loop -------------------------------------------------------------------------------

def check_request(prompt: Sequence[int], max_new_tokens: int, max_seq: int, vocab: int) -> list[int]:
    """The prompt as a list of ints; raises GenerationError for input a decode cannot take."""
    ids = list(prompt)
    if not ids:
        raise GenerationError("needs at least one prompt token")
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
            raise GenerationError(f"prompt token {t!r} is outside the vocabulary [0, {vocab})")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise GenerationError(f"max new tokens must be a non-negative integer, got {max_new_tokens!r}")
    last = len(ids) + max_new_tokens - 2
    if last >= max_seq:
        raise GenerationError(
            f"{len(ids)} prompt tokens + {max_new_tokens} new tokens need positions 0..{last}, but max_seq is "
            f"{max_seq} (positions 0..{max_seq - 1}): at most {max_seq - len(ids) + 1} new tokens")
    return ids


def decode(decoder: Decoder, prompt: Sequence[int], max_new_tokens: int, *,
           keep_logits: bool = False, tokens_per_launch: int = 1) -> Generation:
    """Greedy decode with any decoder: the prompt one token per step, then its own tokens
    (``tokens_per_launch`` > 1: in launches of that many, with a ``GpuDecoder``)."""
    ids = check_request(prompt, max_new_tokens, decoder.max_seq, decoder.vocab)
    k = parse_count(tokens_per_launch, "tokens per launch") if tokens_per_launch != 1 else 1
    out = Generation(decoder.engine, ids, [], [], [] if keep_logits else None, k)
    if max_new_tokens == 0:
        return out
    if k > 1:
        return _decode_launches(decoder, out, max_new_tokens, k)
    feed = ids[0]
    for pos in range(len(ids) + max_new_tokens - 1):
        t0 = time.perf_counter()
        nxt, logits = decoder.step(feed, pos)
        out.step_us.append((time.perf_counter() - t0) * 1e6)
        if pos + 1 < len(ids):
            feed = ids[pos + 1]
            continue
        out.tokens.append(nxt)
        if out.logits is not None:
            out.logits.append(logits)
        feed = nxt
    return out


def _decode_launches(decoder: Any, out: Generation, n: int, k: int) -> Generation:
    """The K-token path of ``decode``: prompt tokens but the last one step each (their outputs are
    unused), then launches of up to ``k`` steps from the last prompt token."""
    if not hasattr(decoder, "steps"):
        raise GenerationError(f"{k} tokens per launch need the megakernel (device cuda), not the "
                              f"{ENGINE_NAMES.get(decoder.engine, decoder.engine)}")
    if out.logits is not None:
        raise GenerationError("a K-token launch keeps the last step's logits only: keep_logits needs 1 token "
                              "per launch")
    ids = out.prompt
    for pos in range(len(ids) - 1):
        t0 = time.perf_counter()
        decoder.step(ids[pos], pos)
        out.step_us.append((time.perf_counter() - t0) * 1e6)
    feed, pos = ids[-1], len(ids) - 1
    while len(out.tokens) < n:
        m = min(k, n - len(out.tokens))
        t0 = time.perf_counter()
        got = decoder.steps(feed, pos, m)
        dt = (time.perf_counter() - t0) * 1e6 / m
        if len(got) != m:
            raise RuntimeError(f"a {m}-token launch returned {len(got)} tokens")
        out.step_us += [dt] * m
        out.tokens += got
        feed, pos = got[-1], pos + m
    return out


def generate(program: Program, model: Llama | None, prompt: Sequence[int], max_new_tokens: int,
             device: str = "cpu", *, runner: Any = None, keep_logits: bool = False,
             tokens_per_launch: int = 1) -> Generation:
    """Greedy tokens from one lowered program: on the reference VM (``cpu``) or the megakernel
    (``cuda``; pass ``runner`` to reuse a ``GpuRunner`` whose weights are already on the GPU).
    ``tokens_per_launch`` > 1 (cuda only) decodes the new tokens in launches of that many."""
    if tokens_per_launch != 1 and device != "cuda":
        raise GenerationError(f"{tokens_per_launch} tokens per launch need device cuda (the megakernel)")
    if device == "cpu":
        if model is None:
            raise ValueError("the reference VM needs the model's weights")
        dec: Decoder = RefVmDecoder(program, model)
    elif device == "cuda":
        dec = GpuDecoder(program, model, runner)
    else:
        raise ValueError(f"device {device!r} is not one of cpu, cuda")
    return decode(dec, prompt, max_new_tokens, keep_logits=keep_logits, tokens_per_launch=tokens_per_launch)


def eager_generate(model: Llama, prompt: Sequence[int], n: int, *, keep_logits: bool = False) -> Generation:
    """Greedy tokens from the eager model (``Llama.step``), for comparison."""
    return decode(EagerDecoder(model), prompt, n, keep_logits=keep_logits)


# -- comparison ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Divergence:
    """The first generated token where two greedy sequences differ."""

    index: int  # into the new tokens
    pos: int  # the decode position whose logits chose it
    got: int
    expected: int
    gap: float | None  # eager logit of ``expected`` minus that of ``got`` (None: no logits)
    tolerance: float | None
    near_tie: bool

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class TokenCheck:
    ok: bool  # equal, or the first difference is a near-tie
    compared: int  # tokens compared (up to and including a divergence)
    divergence: Divergence | None
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "compared": self.compared, "message": self.message,
                "first_divergence": self.divergence.to_json() if self.divergence else None}


def near_tie(ref_logits: torch.Tensor, chosen: int, other: int, dtype: str) -> tuple[bool, float, float]:
    """Whether the reference logits cannot tell ``chosen`` (their argmax) from ``other``:
    (near-tie, gap, tolerance), with the oracle's tolerance for ``dtype``."""
    from pytest_amk.oracle import TOLERANCES

    ref = ref_logits.float().reshape(-1)
    atol, rtol = TOLERANCES[dtype]
    tol = atol + rtol * float(ref.abs().max())
    gap = float(ref[chosen] - ref[other]) if 0 <= other < ref.numel() else float("inf")
    return gap <= tol, gap, tol


def compare_tokens(got: Generation | Sequence[int], ref: Generation, dtype: str, *,
                   got_name: str | None = None, ref_name: str | None = None) -> TokenCheck:
    """Compare greedy tokens with a reference generation (the rule is in the module docstring).
    ``ref.logits`` (keep_logits=True) enable the near-tie rule; without them any difference fails."""
    got_tokens = list(got.tokens if isinstance(got, Generation) else got)
    gname = got_name or (ENGINE_NAMES.get(got.engine, got.engine) if isinstance(got, Generation) else "got")
    rname = ref_name or ENGINE_NAMES.get(ref.engine, ref.engine)
    first = len(ref.prompt) - 1
    n = min(len(got_tokens), len(ref.tokens))
    for i in range(n):
        a, b = got_tokens[i], ref.tokens[i]
        if a == b:
            continue
        where = f"generated token {i} (position {first + i})"
        if ref.logits is None:
            d = Divergence(i, first + i, a, b, None, None, False)
            return TokenCheck(False, i + 1, d, f"greedy tokens differ at {where}: {gname} chose {a}, {rname} {b}")
        tie, gap, tol = near_tie(ref.logits[i], b, a, dtype)
        d = Divergence(i, first + i, a, b, gap, tol, tie)
        logit_a = float(ref.logits[i].reshape(-1)[a]) if 0 <= a < ref.logits[i].numel() else float("nan")
        logits = (f"{rname}'s logits {logit_a:.5g} vs {float(ref.logits[i].reshape(-1)[b]):.5g}, "
                  f"gap {gap:.3g} {'<=' if tie else '>'} tolerance {tol:.3g} ({dtype})")
        if tie:
            return TokenCheck(True, i + 1, d, f"{i} greedy tokens equal {rname}'s, then a near-tie divergence at "
                                              f"{where}: {gname} chose {a}, {rname} {b} ({logits}); "
                                              "later tokens not compared")
        return TokenCheck(False, i + 1, d, f"greedy tokens differ at {where}: {gname} chose {a}, {rname} {b} "
                                           f"({logits}: not a near-tie)")
    if len(got_tokens) != len(ref.tokens):
        return TokenCheck(False, n, None, f"{gname} gave {len(got_tokens)} tokens, {rname} {len(ref.tokens)}")
    return TokenCheck(True, n, None, f"{n} greedy tokens equal {rname}'s")


# -- schedules --------------------------------------------------------------------------------

def schedule_model(sf: ScheduleFile) -> Llama:
    """The schedule's eager model (shared with the pipeline's cache)."""
    from pytest_amk.pipeline import eager_model

    m = sf.model
    return eager_model(m.id, m.dtype, m.seed, m.max_seq)


def lower_and_prove(sf: ScheduleFile, sched: Schedule) -> Program:
    """Lower once and prove the program safe; raises ``pipeline.Rejected``."""
    from pytest_amk.ir import get_target
    from pytest_amk.pipeline import lower_schedule, prove

    program = lower_schedule(sf, sched)
    prove(program, get_target(sf.gpu))
    return program


def check_schedule_tokens(sf: ScheduleFile, program: Program, n: int, on_gpu: bool) -> TokenCheck:
    """The ``tokens`` stage: ``n`` greedy tokens from the prompt ``CHECK_PROMPT`` on the megakernel
    (``on_gpu``; the pipeline's cached runner) or the reference VM, against eager."""
    m = sf.model
    prompt = list(CHECK_PROMPT)
    try:
        check_request(prompt, n, m.max_seq, 1 << 62)
    except GenerationError as e:
        return TokenCheck(False, 0, None, f"expect.tokens = {n}: {e}")
    model = schedule_model(sf)
    runner = None
    if on_gpu:
        from pytest_amk.gpu.harness import runner_for

        runner = runner_for(program, sf)
    got = generate(program, model, prompt, n, "cuda" if on_gpu else "cpu", runner=runner)
    ref = eager_generate(model, prompt, n, keep_logits=True)
    check = compare_tokens(got, ref, m.dtype)
    if check.ok and check.divergence is None:
        return TokenCheck(True, check.compared, None, f"{check.message} (prompt {prompt}, "
                                                      f"{ENGINE_NAMES[got.engine]})")
    return check


# -- the `amk generate` command ---------------------------------------------------------------

def parse_prompt_ids(text: str) -> list[int]:
    """``"1,2,3"`` -> [1, 2, 3]; GenerationError naming ``--prompt-ids`` otherwise."""
    ids: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            ids.append(int(part))
        except ValueError:
            shown = part if len(part) <= 40 else part[:40] + "..."
            raise GenerationError(f"--prompt-ids: {shown!r} is not an integer (expected ids like 1,2,3)") from None
    return ids


def parse_count(text: str | int, option: str = "--max-tokens") -> int:
    try:
        n = int(text)
    except ValueError:
        raise GenerationError(f"{option}: expected an integer, got {str(text)[:40]!r}") from None
    if n < 1:
        raise GenerationError(f"{option}: must be at least 1, got {n}")
    return n


def _hf_tokens(sf: ScheduleFile, prompt: list[int], n: int) -> tuple[list[int] | None, str | None]:
    """HF ``generate``'s tokens for an ``hf:`` model, or (None, why not)."""
    import importlib.util

    if not sf.model.id.startswith("hf:"):
        return None, "HF generate runs for hf: models only"
    if importlib.util.find_spec("transformers") is None:
        return None, "HF generate not run: transformers is not installed"
    from pytest_amk.models.hf import HfModelError, hf_generate

    try:
        return hf_generate(sf.model.id, prompt, n, dtype=sf.model.dtype, seed=sf.model.seed), None
    except HfModelError as e:
        raise GenerationError(str(e)) from None


def generate_report(sf: ScheduleFile, sched: Schedule, prompt_ids: str, max_tokens: str | int,
                    device: str = "cpu", verify: bool = False, tokens_per_launch: str | int = 1) -> dict[str, Any]:
    """What ``amk generate`` prints (as JSON with ``--json``). Raises GenerationError for bad
    input, ``pipeline.Rejected`` for a schedule that cannot be lowered or proven safe (with
    ``tokens_per_launch`` K > 1: also safe for K-token launches).
    ``ok`` is False when ``verify`` found sequences that differ (any difference, near-tie or not)."""
    from pathlib import Path

    from pytest_amk.models import HfModelError

    prompt = parse_prompt_ids(prompt_ids)
    n = parse_count(max_tokens)
    k = parse_count(tokens_per_launch, "--tokens-per-launch")
    if k > 1 and device != "cuda":
        raise GenerationError(f"--tokens-per-launch: {k} tokens per launch need --device cuda (the megakernel)")
    program = lower_and_prove(sf, sched)  # once, for every token
    if k > 1:
        from pytest_amk import multistep
        from pytest_amk.ir import get_target
        from pytest_amk.pipeline import Rejected

        try:
            multistep.prove(program, get_target(sf.gpu))  # cached: the runner's check reuses it
        except multistep.MultiStepError as e:
            raise Rejected(f"--tokens-per-launch {k}: {e}") from None
    max_seq, vocab = _program_limits(program)
    for option, count in (("--prompt-ids", 0), ("--max-tokens", n)):
        try:
            check_request(prompt, count, max_seq, vocab)
        except GenerationError as e:
            raise GenerationError(f"{option}: {e}") from None
    try:
        model = schedule_model(sf)
    except HfModelError as e:
        raise GenerationError(str(e)) from None
    gen = generate(program, model, prompt, n, device, tokens_per_launch=k)
    m = sf.model
    report: dict[str, Any] = {
        "schedule_id": f"{Path(sf.path).name}::{sched.name}", "model": m.id, "dtype": m.dtype, "gpu": sf.gpu,
        "device": device, **gen.to_json(), "max_tokens": n, "ok": True, "verify": None}
    if verify:
        eager = eager_generate(model, prompt, n, keep_logits=True)
        hf, hf_note = _hf_tokens(sf, prompt, n)
        vs_eager = compare_tokens(gen, eager, m.dtype)
        vs_hf = compare_tokens(gen, Generation("hf", prompt, hf), m.dtype, ref_name="HF generate") \
            if hf is not None else None
        same = gen.tokens == eager.tokens and (hf is None or hf == gen.tokens)
        report["ok"] = same
        report["verify"] = {"equal": same, "eager": eager.tokens, "hf": hf, "hf_note": hf_note,
                            "eager_latency_us": eager.to_json()["latency_us"]["median_per_token"],
                            "vs_eager": vs_eager.to_json(), "vs_hf": vs_hf.to_json() if vs_hf else None}
    return report


def _us(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.2f} ms" if value >= 1000 else f"{value:.1f} us"


def format_report(report: dict[str, Any]) -> str:
    """The text form of ``generate_report``: the ids, latency, and with --verify the sequences side
    by side (differing rows marked ``*``)."""
    engine = ENGINE_NAMES[report["engine"]]
    lines = [f"{report['schedule_id']} ({report['model']}/{report['dtype']}), {engine} on {report['device']}, "
             f"prompt {report['prompt_ids']}",
             "tokens: " + " ".join(map(str, report["tokens"])),
             f"latency: median {_us(report['latency_us']['median_per_token'])} per token "
             + (f"({len(report['tokens'])} tokens, wall clock per decode step)"
                if report["latency_us"].get("tokens_per_launch", 1) == 1 else
                f"({len(report['tokens'])} tokens, up to {report['latency_us']['tokens_per_launch']} per launch: "
                "wall clock per launch / its tokens)")]
    v = report["verify"]
    if v is None:
        return "\n".join(lines)
    cols = [(engine, report["tokens"]), ("eager", v["eager"])] + ([("HF generate", v["hf"])] if v["hf"] else [])
    widths = [max(6, len(name)) for name, _ in cols]
    first = len(report["prompt_ids"]) - 1
    lines.append("")
    names = [name for name, _ in cols]
    lines.append(f"  {'i':>4} {'pos':>5}  " + "  ".join(f"{n:>{w}}" for n, w in zip(names, widths, strict=True)))
    for i in range(len(report["tokens"])):
        row = [seq[i] if i < len(seq) else "-" for _, seq in cols]
        mark = "*" if len(set(row)) > 1 else " "
        cells = "  ".join(f"{t!s:>{w}}" for t, w in zip(row, widths, strict=True))
        lines.append(f"{mark} {i:>4} {first + i:>5}  {cells}")
    lines.append("")
    lines.append(f"eager latency: median {_us(v['eager_latency_us'])} per token")
    for key, name in (("vs_eager", "eager"), ("vs_hf", "HF generate")):
        if v[key] is not None:
            lines.append(f"vs {name}: {v[key]['message']}")
    if v["hf_note"]:
        lines.append(v["hf_note"])
    lines.append("verify: " + ("OK, the sequences are equal" if v["equal"] else "DIFFER (exit 1)"))
    return "\n".join(lines)
