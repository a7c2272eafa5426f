"""K tokens in one launch (pytest_amk.multistep, GpuRunner.run_tokens, generate --tokens-per-launch).

CPU: the proof accepts lowered programs and refuses ones where a task does not happen-before the
argmax or the argmax does not signal; the two-step unrolled program validates, and without the
step barrier or with the input update after the argmax's signal it does not (the model matters);
bad K and K past max_seq are refused; the kernel's ABI matches the launcher's. GPU (skipped
without one): K-token launches give exactly the per-token path's tokens.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from pytest_amk import ir, multistep
from pytest_amk.gpu import build
from pytest_amk.gpu import testing as T
from pytest_amk.multistep import MultiStepError
from pytest_amk.validate import validate


def _toy(model: str = "toy", dtype: str = "bf16", max_seq: int = 32, **kn: Any) -> ir.Program:
    return T.lowered(model, dtype, max_seq=max_seq, **kn)


def _with_orphan_task(prog: ir.Program) -> ir.Program:
    """A NOP at the end of a queue other than the argmax's, signalling a counter nobody waits for:
    one step is still valid, but step k + 1 could start before it finished."""
    bad = copy.deepcopy(prog)
    am = next(t for t in bad.tasks if t.op == "ARGMAX")
    c = len(bad.counters)
    bad.counters.append(ir.Counter(c, "orphan"))
    sm = (am.sm + 1) % bad.num_sms
    bad.tasks.append(ir.Task(len(bad.tasks), "NOP", sm, [], [], [], c, {}))
    return bad


def _drop(prog: ir.Program, drop: set[int]) -> ir.Program:
    tasks = [dataclasses.replace(t, id=i) for i, t in enumerate(t for t in prog.tasks if t.id not in drop)]
    return ir.Program(prog.buffers, prog.counters, tasks, prog.meta)


# -- (a) every task happens-before the argmax ------------------------------------------------------

@pytest.mark.parametrize(("model", "kn"), [
    ("toy", {}),
    ("toy-4L", {}),
    ("toy", {"fusion": [], "sm_count": 7, "sm_assignment": "balanced"}),
    ("toy", {"sm_count": 1, "tiling__attention__kv_block": 8}),
    ("toy-4L", {"tiling__gemv__n_tile": 64, "tiling__lm_head__n_tile": 256, "threads_per_block": 512}),
], ids=["toy", "toy-4L", "toy-unfused-7sm", "toy-1sm", "toy-4L-wide"])
def test_lowered_programs_are_proven(model: str, kn: dict[str, Any]) -> None:
    prog = _toy(model, **kn)
    plan = multistep.prove(prog)
    am = next(t for t in prog.tasks if t.op == "ARGMAX")
    assert plan.argmax_task == am.id and plan.barrier_counter == am.signal
    assert plan.next_token == prog.buffer("next_token").id
    assert plan.inputs == {n: prog.buffer(n).id for n in ("token", "pos", "seq_len")}
    assert plan.max_seq == 32
    for c in prog.counters:
        assert plan.counter_step[c.id] == sum(1 for t in prog.tasks if t.signal == c.id)
    assert plan.counter_step[plan.barrier_counter] == 1


@pytest.mark.parametrize("seed", range(4))
def test_random_programs_are_proven(seed: int) -> None:
    cfg, kn, dtype, max_seq = T.random_case(seed)
    prog = T.lowered(cfg, dtype, max_seq=max_seq, **{k.replace(".", "__"): v for k, v in kn.items()})
    multistep.prove(prog)


def test_task_not_before_argmax_is_refused() -> None:
    bad = _with_orphan_task(_toy())
    assert validate(bad).ok  # one step is fine
    with pytest.raises(MultiStepError) as info:
        multistep.prove(bad)
    msg = str(info.value)
    assert "1 task(s) do not happen-before the argmax" in msg
    assert f"task {len(bad.tasks) - 1} (NOP" in msg and "'orphan'" in msg and "waits for" in msg


def test_unsignalling_or_missing_or_shared_argmax_is_refused() -> None:
    prog = _toy()
    am = next(t for t in prog.tasks if t.op == "ARGMAX")
    bad = copy.deepcopy(prog)
    bad.tasks[am.id].signal = None
    with pytest.raises(MultiStepError, match="signals no counter"):
        multistep.step_plan(bad)

    bad = copy.deepcopy(prog)
    bad.tasks = [t for t in bad.tasks if t.op != "ARGMAX"]
    with pytest.raises(MultiStepError, match="exactly one ARGMAX task.*has 0"):
        multistep.step_plan(bad)

    bad = copy.deepcopy(prog)
    bad.tasks.append(dataclasses.replace(bad.tasks[am.id], id=len(bad.tasks), params=dict(am.params)))
    with pytest.raises(MultiStepError, match="has 2"):
        multistep.step_plan(bad)

    bad = copy.deepcopy(prog)  # a NOP after the argmax on its queue, signalling its counter
    bad.tasks.append(ir.Task(len(bad.tasks), "NOP", am.sm, [], [], [], am.signal, {}))
    with pytest.raises(MultiStepError, match="also signalled by"):
        multistep.step_plan(bad)


def test_partial_wait_does_not_order_a_signaller() -> None:
    # The final stage's consumers wait for all but one of its signals: that one may still run.
    bad = _toy(sm_count=4)
    for t in bad.tasks:
        if t.op == "ARGMAX":
            t.waits = [ir.Wait(w.counter, w.threshold - 1) for w in t.waits]
    with pytest.raises(MultiStepError, match="do not happen-before the argmax"):
        multistep.step_plan(bad)


# -- (b) the two-step unrolled program ---------------------------------------------------------------

def test_unrolled_program_shape_and_validation() -> None:
    prog = _toy(sm_count=5)
    plan = multistep.step_plan(prog)
    u = multistep.unroll(prog, plan)
    n = len(prog.tasks)
    assert len(u.tasks) == 2 * (n + 3) + 5  # two steps, 3 input updates each, one barrier per queue
    assert [t.id for t in u.tasks] == list(range(len(u.tasks)))
    assert {u.buffers[b].kind for b in plan.inputs.values() if b is not None} == {ir.BufferKind.KV}
    barriers = [t for t in u.tasks if t.op == "NOP"]
    assert sorted(t.sm for t in barriers) == list(range(5))
    assert all(t.waits == [ir.Wait(plan.barrier_counter, 1)] for t in barriers)
    step2 = u.tasks[n + 3 + 5:]
    first = [t for t in prog.tasks if t.op == "LM_HEAD"][0]
    twin = next(t for t in step2 if t.op == "LM_HEAD" and t.params == first.params)
    assert twin.waits == [ir.Wait(w.counter, w.threshold + plan.counter_step[w.counter]) for w in first.waits]
    # The argmax's signal moved to the last input update, after its writes of token, pos, seq_len.
    am = [t for t in u.tasks if t.op == "ARGMAX"]
    assert [t.signal for t in am[:4]] == [None, None, None, plan.barrier_counter]
    assert [t.writes[0].buffer for t in am[1:4]] == [plan.inputs["token"], plan.inputs["pos"], plan.inputs["seq_len"]]
    res = validate(u)
    assert res.ok, res.summary()


def test_unrolled_model_needs_the_barrier_and_the_update_before_the_signal() -> None:
    prog = _toy(sm_count=5)
    plan = multistep.step_plan(prog)
    u = multistep.unroll(prog, plan)
    no_barrier = _drop(u, {t.id for t in u.tasks if t.op == "NOP"})
    res = validate(no_barrier)
    assert not res.ok and "race" in res.codes(), res.summary()

    late = copy.deepcopy(u)  # signal before the input update: step 2 may read the old token
    am = [t for t in late.tasks if t.op == "ARGMAX"][:4]
    am[0].signal, am[3].signal = plan.barrier_counter, None
    res = validate(late)
    assert not res.ok and "race" in res.codes(), res.summary()
    assert any("'token'" in e.message or "'pos'" in e.message for e in res.errors)


# -- requests ----------------------------------------------------------------------------------------

def test_bad_k_and_past_max_seq_are_refused() -> None:
    plan = multistep.step_plan(_toy(max_seq=32))
    for k in (0, -1, 1.5, True, "4"):
        with pytest.raises(MultiStepError, match="tokens per launch must be an integer >= 1"):
            multistep.check_request(plan, 0, k)  # type: ignore[arg-type]
    with pytest.raises(MultiStepError, match="position must be"):
        multistep.check_request(plan, -1, 2)
    multistep.check_request(plan, 0, 32)
    multistep.check_request(plan, 28, 4)
    with pytest.raises(MultiStepError, match=r"need positions 28\.\.32, but max_seq is 32: at most 4 tokens"):
        multistep.check_request(plan, 28, 5)
    with pytest.raises(MultiStepError, match="max_seq"):
        multistep.check_request(plan, 0, 33)
    huge = dataclasses.replace(plan, max_seq=None)
    with pytest.raises(MultiStepError, match="int32"):
        multistep.check_request(huge, 0, 2**31 // max(plan.counter_step) + 2)


def test_kernel_abi_matches_the_launcher() -> None:
    """The K-step arguments are part of every build (the compile tests of tests/test_vm_compile.py
    build this kernel): the kernel's parameter list and the launcher's format agree."""
    from pytest_amk.gpu.runtime import ARG_FORMAT

    src = (build.vm_dir() / build.MAIN_SOURCE).read_text()
    sig = re.search(r"amk_vm\((.*?)\)\s*\{", src, re.S)
    assert sig is not None
    params = [p.strip() for p in sig.group(1).split(",")]
    assert len(params) == len(ARG_FORMAT)
    for p, f in zip(params, ARG_FORMAT, strict=True):
        assert ("*" in p) == (f == "P"), (p, f)
        if f == "q":
            assert p.startswith("long long")
    names = [p.split()[-1].lstrip("*") for p in params]
    assert names[9:] == ["steps", "counter_step", "tokens_out", "barrier_counter", "token_buf", "pos_buf",
                         "seq_len_buf"]


# -- generate ------------------------------------------------------------------------------------------

class FakeDecoder:
    """Next token = f(token, pos); ``steps`` runs the same chain as K single steps."""

    engine = "megakernel"
    max_seq, vocab = 40, 1000

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int]] = []

    @staticmethod
    def f(token: int, pos: int) -> int:
        return (7 * token + 3 * pos + 1) % 1000

    def step(self, token: int, pos: int) -> tuple[int, Any]:
        import torch

        self.calls.append((token, pos, 1))
        return self.f(token, pos), torch.zeros(self.vocab)

    def steps(self, token: int, pos: int, k: int) -> list[int]:
        self.calls.append((token, pos, k))
        out = []
        for i in range(k):
            token = self.f(token, pos + i)
            out.append(token)
        return out


def test_decode_in_launches_equals_per_token() -> None:
    from pytest_amk import generate as g

    one = g.decode(FakeDecoder(), [5, 6, 7], 10)
    dec = FakeDecoder()
    got = g.decode(dec, [5, 6, 7], 10, tokens_per_launch=4)
    assert got.tokens == one.tokens and got.tokens_per_launch == 4
    t = one.tokens
    assert dec.calls == [(5, 0, 1), (6, 1, 1), (7, 2, 4), (t[3], 6, 4), (t[7], 10, 2)]
    assert len(got.step_us) == 2 + 10 and len(got.token_us) == 10
    assert got.to_json()["latency_us"]["tokens_per_launch"] == 4
    assert g.decode(FakeDecoder(), [5], 39, tokens_per_launch=64).tokens == g.decode(FakeDecoder(), [5], 39).tokens
    with pytest.raises(g.GenerationError, match="at most 40 new tokens"):
        g.decode(FakeDecoder(), [5], 41, tokens_per_launch=8)
    with pytest.raises(g.GenerationError, match="keep_logits"):
        g.decode(FakeDecoder(), [5], 4, tokens_per_launch=2, keep_logits=True)
    with pytest.raises(g.GenerationError, match="tokens per launch: must be at least 1"):
        g.decode(FakeDecoder(), [5], 4, tokens_per_launch=0)


def test_generate_refuses_launches_on_the_reference_vm(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from pytest_amk import generate as g
    from pytest_amk.cli import main

    with pytest.raises(g.GenerationError, match="need device cuda"):
        g.generate(_toy(), None, [1], 4, "cpu", tokens_per_launch=4)
    path = tmp_path / "toy.toml"
    path.write_text('[model]\nid = "toy"\ndtype = "fp32"\nmax_seq = 16\n\n[target]\ngpu = "h100"\n\n'
                    '[[schedule]]\nname = "default"\n')
    for k, words in (("4", "need --device cuda"), ("0", "must be at least 1"), ("x", "expected an integer")):
        code = main(["generate", str(path), "--prompt-ids", "1", "--max-tokens", "4", "--tokens-per-launch", k])
        err = capsys.readouterr().err
        assert code == 2 and "--tokens-per-launch" in err and words in err, err
        assert len(err.strip().splitlines()) == 1
    code = main(["generate", str(path), "--prompt-ids", "1", "--max-tokens", "3", "--tokens-per-launch", "1",
                 "--json"])
    assert code == 0


# -- on a GPU -------------------------------------------------------------------------------------------

def _gpu_ok() -> tuple[bool, str]:
    from pytest_amk import gpu

    return gpu.available()


needs_gpu = pytest.mark.skipif(not _gpu_ok()[0], reason=f"GPU VM not run: {_gpu_ok()[1]}")


def _runner(prog: ir.Program, seed: int = 3) -> Any:
    from pytest_amk import gpu, refvm

    bufs = refvm.alloc_buffers(prog, T.random_weights(prog, seed=seed), f"cuda:{gpu.device_info().index}")
    return gpu.GpuRunner(prog, bufs, validate=False)


def _per_token(runner: Any, token: int, pos: int, n: int) -> list[int]:
    out = []
    for i in range(n):
        runner.run_step(token, pos + i)
        token = runner.next_token()
        out.append(token)
    return out


@needs_gpu
@pytest.mark.parametrize(("model", "dtype"), [("toy", "fp32"), ("toy-4L", "fp32"), ("toy-4L", "bf16")])
def test_k_token_launch_equals_per_token_path(model: str, dtype: str) -> None:
    import torch

    prog = _toy(model, dtype, max_seq=48, sm_count=0)
    runner = _runner(prog)
    want = _per_token(runner, 1, 0, 32)
    last_logits = runner.tensors[prog.buffer("logits").id].clone()
    assert runner.run_tokens(1, 0, 32) == want
    # The last step's logits stay behind, as after the per-token path's last step.
    assert torch.equal(runner.tensors[prog.buffer("logits").id], last_logits)
    assert runner.run_tokens(1, 0, 1) == want[:1]
    chunks: list[int] = []
    token, pos = 1, 0
    for k in (5, 8, 16, 3):
        chunks += runner.run_tokens(token, pos, k)
        token, pos = chunks[-1], pos + k
    assert chunks == want
    # Continue past the 32: a launch from the middle of the sequence.
    more = _per_token(runner, want[-1], 32, 16)
    assert runner.run_tokens(want[-1], 32, 16) == more


@needs_gpu
def test_k_token_launch_across_schedules() -> None:
    for kn in ({"sm_count": 1}, {"sm_count": 7, "fusion": [], "tiling__attention__kv_block": 8}):
        prog = _toy("toy", "fp32", max_seq=24, **kn)
        runner = _runner(prog, seed=5)
        assert runner.run_tokens(3, 0, 24) == _per_token(runner, 3, 0, 24)


@needs_gpu
def test_k_token_launch_refused_without_proof_or_past_max_seq() -> None:
    prog = _toy("toy", "fp32", max_seq=16, sm_count=4)
    runner = _runner(prog)
    with pytest.raises(MultiStepError, match="max_seq is 16"):
        runner.run_tokens(1, 10, 7)
    with pytest.raises(MultiStepError, match="tokens per launch"):
        runner.run_tokens(1, 0, 0)
    assert len(runner.run_tokens(1, 10, 6)) == 6
    bad = _runner(_with_orphan_task(prog))
    bad.run_step(1, 0)  # one step at a time is fine
    with pytest.raises(MultiStepError, match="do not happen-before the argmax"):
        bad.run_tokens(1, 0, 4)


@needs_gpu
def test_generate_with_tokens_per_launch_equals_per_token() -> None:
    from pytest_amk import generate as g
    from pytest_amk.models import load_model

    m = load_model("toy-4L", "fp32", 0, 40)
    prog = T.lowered(m.cfg, "fp32", max_seq=40)
    per_token = g.generate(prog, m, [1, 2], 32, "cuda")
    for k in (4, 32):
        got = g.generate(prog, m, [1, 2], 32, "cuda", tokens_per_launch=k)
        assert got.tokens == per_token.tokens and got.tokens_per_launch == k


@needs_gpu
def test_k_token_timing_per_token() -> None:
    runner = _runner(_toy("toy-4L", "bf16", max_seq=64))
    t = runner.time_tokens(1, 0, 16, warmup=1, iters=3)
    assert t.extra["k"] == 16 and len(t.samples_us) == 3
    assert t.median_us > 0 and abs(t.extra["launch_us"] / 16 - t.median_us) < 1e-6
    one = runner.time_step(1, 0, warmup=1, iters=3)
    print(f"toy-4L bf16: {t.median_us:.1f} us/token in 16-token launches, {one.median_us:.1f} us per step "
          f"on {t.device_name}")
