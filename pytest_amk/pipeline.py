"""The stages every schedule goes through, without pytest: lower, validate, reference
check against eager, GPU check against the reference VM, timing. Produces the
verdict (DESIGN §4). The pytest items and the ``amk`` CLI are thin layers over this.
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pytest_amk.ir import GpuTarget, Program, get_target
from pytest_amk.schedule import Schedule, ScheduleFile, parse_file

PASS, FAIL, REJECTED, XREJECTED = "passed", "failed", "rejected", "expected-rejected"
DEFAULT_STEPS = 4


class Rejected(Exception):
    """The schedule cannot be lowered or was proven unsafe."""


@dataclass
class Verdict:
    """The agent-facing result (DESIGN §4)."""

    valid: bool = False
    rejected_reason: str | None = None
    correct: bool | None = None
    max_abs_err: float | None = None
    top1_agreement: float | None = None
    latency_us: float | None = None
    latency_kind: str | None = None  # "measured-gpu" | "predicted" | None
    pct_of_roofline: float | None = None
    bound_us: float | None = None
    schedule_id: str = ""
    tasks: int | None = None
    weight_mb: float | None = None
    gpu: str = ""
    model: str = ""
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def set_latency(self, latency_us: float, kind: str, bound_us: float) -> None:
        """Record a latency only when correct, and never one below the floor."""
        self.bound_us = bound_us
        if not self.correct:
            return
        if latency_us < bound_us * 0.999:
            self.notes.append(f"{kind} latency {latency_us:.1f} us is below the floor {bound_us:.1f} us: withheld")
            return
        self.latency_us, self.latency_kind = latency_us, kind
        self.pct_of_roofline = 100.0 * bound_us / latency_us


@dataclass
class StageReport:
    name: str
    status: str  # "ok", "failed", "skipped", "rejected"
    detail: str = ""
    seconds: float = 0.0


@dataclass
class ItemResult:
    outcome: str
    message: str
    verdict: Verdict
    stages: list[StageReport]
    timing: Any = None  # gpu.harness.GpuTiming when the time stage ran (fed to pytest-benchmark)


def schedule_id(sf: ScheduleFile, sched: Schedule) -> str:
    return f"{Path(sf.path).name}::{sched.name}"


def lower_schedule(sf: ScheduleFile, sched: Schedule) -> Program:
    """Lower; a schedule the target cannot hold raises Rejected."""
    from pytest_amk.lower import LoweringError, lower
    from pytest_amk.models import HfModelError, config_for

    try:
        cfg = config_for(sf.model.id)
    except (HfModelError, KeyError) as e:  # unsupported or unreadable model: cannot be lowered
        raise Rejected(str(e).strip("'\"")) from None
    except (OSError, ValueError, TypeError, RecursionError) as e:  # a path or config.json beyond reading
        raise Rejected(f"{sf.model.id[:200]!r}: cannot read the model config: {type(e).__name__}: {e}"[:600]) from None
    try:
        return lower(cfg, get_target(sf.gpu), sched.knobs, sf.model.dtype, sf.model.max_seq)
    except LoweringError as e:
        raise Rejected(str(e)) from None


def prove(program: Program, target: GpuTarget) -> str:
    """Validate; raises Rejected with the first errors. Returns a summary line."""
    from pytest_amk.validate import validate

    result = validate(program, target)
    if not result.ok:
        shown = "; ".join(e.message for e in result.errors[:5])
        more = f" (+{len(result.errors) - 5} more)" if len(result.errors) > 5 else ""
        raise Rejected(f"validator: {shown}{more}")
    return f"{len(program.tasks)} tasks, {len(program.counters)} counters proven safe"


@functools.lru_cache(maxsize=2)
def eager_model(model_id: str, dtype: str, seed: int, max_seq: int) -> Any:
    from pytest_amk.models import load_model

    return load_model(model_id, dtype, seed, max_seq)


@functools.lru_cache(maxsize=8)
def eager_trace(model_id: str, dtype: str, seed: int, max_seq: int, steps: int) -> tuple[list[int], list[Any]]:
    """Tokens fed at positions 0..steps-1 (greedy from token 1) and eager logits at each."""
    model = eager_model(model_id, dtype, seed, max_seq)
    model.reset()
    tokens, logits = [1], []
    for pos in range(steps):
        out = model.step(tokens[-1], pos)
        logits.append(out)
        tokens.append(int(out.argmax()))
    return tokens[:steps], logits


def reference_check(sf: ScheduleFile, program: Program, steps: int) -> tuple[list[Any], Any]:
    """Run the reference VM for ``steps`` positions; returns its logits and the comparison."""
    from pytest_amk import refvm
    from pytest_amk.oracle import compare_logits

    m = sf.model
    steps = min(steps, m.max_seq)
    tokens, expected = eager_trace(m.id, m.dtype, m.seed, m.max_seq, steps)
    model = eager_model(m.id, m.dtype, m.seed, m.max_seq)
    bufs = refvm.alloc_buffers(program, refvm.bind_weights(program, model))
    got, worst = [], None
    for pos, token in enumerate(tokens):
        logits = refvm.run_step(program, bufs, token, pos)
        got.append(logits)
        cmp = compare_logits(logits, expected[pos], m.dtype, f"reference VM vs eager, position {pos}")
        if worst is None or (worst.ok and (not cmp.ok or cmp.max_abs_err > worst.max_abs_err)):
            worst = cmp
        nt = int(bufs[program.buffer("next_token").id][0])
        if nt != int(logits.argmax()):
            raise AssertionError(f"position {pos}: next_token {nt} != argmax of logits {int(logits.argmax())}")
    return got, worst


def gpu_status(device: str) -> tuple[bool, str]:
    """Whether the GPU stage runs: (run, reason if not)."""
    if device == "cpu":
        return False, "GPU stage not run: --amk-device=cpu"
    from pytest_amk import gpu

    ok, reason = gpu.available()
    if not ok and device == "cuda":
        raise RuntimeError(f"--amk-device=cuda but no usable GPU: {reason}")
    return ok, "" if ok else f"GPU stage not run: {reason}"


def run_schedule(sf: ScheduleFile, sched: Schedule, device: str = "auto", steps: int = DEFAULT_STEPS,
                 time_gpu: bool = True) -> ItemResult:
    """All stages for one schedule; the outcome follows DESIGN §3."""
    from pytest_amk.cost import predict_us

    target = get_target(sf.gpu)
    v = Verdict(schedule_id=schedule_id(sf, sched), gpu=sf.gpu, model=f"{sf.model.id}/{sf.model.dtype}")
    stages: list[StageReport] = []

    def stage(name: str) -> _Stage:
        return _Stage(stages, name)

    try:
        with stage("lower") as s:
            program = lower_schedule(sf, sched)
            s.detail = f"{len(program.tasks)} tasks on {program.num_sms} SMs"
        with stage("validate") as s:
            s.detail = prove(program, target)
    except Rejected as e:
        stages[-1].status = "rejected"
        v.rejected_reason = str(e)
        return _finish(sched, v, stages, REJECTED, str(e))
    v.valid, v.tasks = True, len(program.tasks)
    v.weight_mb = program.weight_bytes() / 1e6

    with stage("reference") as s:
        ref_logits, cmp = reference_check(sf, program, steps)
        s.detail = cmp.message
        v.max_abs_err, v.correct = cmp.max_abs_err, cmp.ok
        v.top1_agreement = 1.0 if cmp.top1_agree else 0.0
    if not v.correct:
        stages[-1].status = "failed"
        return _finish(sched, v, stages, FAIL, cmp.message)

    run_gpu, why = gpu_status(device)
    if not run_gpu:
        stages.append(StageReport("gpu", "skipped", why))
        v.notes.append(why)
        failed = _tokens_stage(stages, sf, sched, program, v, on_gpu=False)
        if failed is not None:
            return _finish(sched, v, stages, FAIL, failed)
        v.set_latency(predict_us(program, target), "predicted", _floor(program, target))
        return _finish(sched, v, stages, PASS, why)

    from pytest_amk import gpu

    v.device = "cuda"
    with stage("gpu") as s:
        result = gpu.check_against_reference(program, sf, ref_logits, steps)
        s.detail = result.message
        v.max_abs_err = max(v.max_abs_err or 0.0, result.max_abs_err)
        v.correct = result.ok
    if not v.correct:
        stages[-1].status = "failed"
        return _finish(sched, v, stages, FAIL, result.message)
    failed = _tokens_stage(stages, sf, sched, program, v, on_gpu=True)
    if failed is not None:
        return _finish(sched, v, stages, FAIL, failed)
    lat = None
    if time_gpu:
        with stage("time") as s:
            lat = gpu.time_program(program, sf)
            v.set_latency(lat.median_us, "measured-gpu", lat.floor_us)
            s.detail = (f"median {lat.median_us:.1f} us of {lat.rounds} launches, floor {lat.floor_us:.1f} us "
                        f"on {lat.device_name}" + (f" (AMK_TEST_SLOWDOWN_US={lat.slowdown_us:g}: test only)"
                                                    if lat.slowdown_us else ""))
    result = _finish(sched, v, stages, PASS, "")
    result.timing = lat
    return result


def _tokens_stage(stages: list[StageReport], sf: ScheduleFile, sched: Schedule, program: Program, v: Verdict,
                  on_gpu: bool) -> str | None:
    """The "tokens" stage when ``[schedule.expect] tokens = N``: N greedy tokens of the megakernel
    (or, without a GPU, the reference VM) against eager's; a near-tie divergence passes with a note
    (pytest_amk.generate). Returns the failure message, or None."""
    if not sched.expect.tokens:
        return None
    from pytest_amk.generate import check_schedule_tokens

    with _Stage(stages, "tokens") as s:
        check = check_schedule_tokens(sf, program, sched.expect.tokens, on_gpu)
        s.detail = check.message
    if not check.ok:
        stages[-1].status = "failed"
        v.correct = False
        return check.message
    if check.divergence is not None:
        v.notes.append(check.message)
    return None


def _floor(program: Program, target: GpuTarget) -> float:
    from pytest_amk.cost import floor_us

    return floor_us(program, target.hbm_gbps)


def _finish(sched: Schedule, v: Verdict, stages: list[StageReport], outcome: str, message: str) -> ItemResult:
    exp = sched.expect
    if exp.outcome == "rejected":
        if outcome == REJECTED:
            reason = v.rejected_reason or ""
            if exp.reason and exp.reason.lower() not in reason.lower():
                return ItemResult(FAIL, f"REJECTED as expected, but the reason {reason!r} does not contain "
                                  f"the expected {exp.reason!r}", v, stages)
            return ItemResult(XREJECTED, f"expected REJECTED: {reason}", v, stages)
        return ItemResult(FAIL, f"expected REJECTED ({exp.reason or 'any reason'}) but the schedule was "
                          f"{'valid' if v.valid else outcome}", v, stages)
    return ItemResult(outcome, message, v, stages)


class _Stage:
    """Times one stage and records its report; exceptions other than Rejected propagate."""

    def __init__(self, stages: list[StageReport], name: str) -> None:
        self.report = StageReport(name, "ok")
        stages.append(self.report)
        self.t0 = 0.0

    @property
    def detail(self) -> str:
        return self.report.detail

    @detail.setter
    def detail(self, value: str) -> None:
        self.report.detail = value

    def __enter__(self) -> _Stage:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.report.seconds = time.perf_counter() - self.t0
        if exc[0] is not None and not issubclass(exc[0], Rejected):  # type: ignore[arg-type]
            self.report.status = "failed"


def evaluate(path: str | Path, schedule: str | None = None, gpu: str | None = None, device: str = "auto",
             steps: int = DEFAULT_STEPS) -> Verdict:
    """The verdict for one schedule of a file (the first when ``schedule`` is None).
    Raises ScheduleError for a malformed file, KeyError for an unknown schedule name."""
    sf = parse_file(path, gpu)
    scheds = [s for s in sf.schedules if schedule is None or s.name == schedule]
    if not scheds:
        raise KeyError(f"{path}: no schedule named {schedule!r}; have: {', '.join(s.name for s in sf.schedules)}")
    return run_schedule(sf, scheds[0], device, steps).verdict
