"""The CUDA VM against the reference VM on a real GPU; watchdog fault injection.

Skipped (with the reason) where there is no CUDA device, torch with CUDA, PyCUDA or nvcc.
"""

from __future__ import annotations

import time

import pytest

from pytest_amk import gpu
from pytest_amk.gpu import testing as T
from pytest_amk.schedule import FUSIONS

OK, WHY = gpu.available()
pytestmark = pytest.mark.skipif(not OK, reason=f"GPU VM not run: {WHY}")

WATCHDOG_S = 0.2


def _check_steps(results: list[T.StepResult]) -> None:
    for r in results:
        assert r.ok, r.message
        # The reference's own choice, unless the reference logits cannot tell them apart.
        assert r.gpu_next == r.ref_next or r.max_abs_err <= r.tolerance, r.message
        print(f"pos {r.pos}: max |logit err| {r.max_abs_err:.3g} (tol {r.tolerance:.3g})")


def test_trace_mark_ends_the_timed_run_inside_the_op() -> None:
    """A traced launch records ordered points for every task; with trace_mark=gemv_staged a GEMV
    task's run stops once its input is staged, before its rows: shorter than the whole op."""
    import numpy as np

    from pytest_amk import refvm

    prog = T.lowered("toy-4L", "bf16", max_seq=64, threads_per_block=256)
    w = T.random_weights(prog, seed=2)
    runs = {}
    for mark in ("", "gemv_staged"):
        bufs = refvm.alloc_buffers(prog, w, f"cuda:{gpu.device_info().index}")
        build = {"trace_mark": mark} if mark else None
        runner = gpu.GpuRunner(prog, bufs, validate=False, trace=True, build=build)
        runner.run_step(1, 5)
        tr = runner.read_trace()[:, :, 0]
        assert (tr[:, 0] <= tr[:, 1]).all() and (tr[:, 1] <= tr[:, 2]).all()
        gemv = np.array([t.op == "GEMV" for t in runner.order])
        runs[mark] = float(np.mean(tr[gemv, 2] - tr[gemv, 1]))
    assert runs["gemv_staged"] < runs[""], runs


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("model", ["toy", "toy-4L"])
def test_presets_match_refvm(model: str, dtype: str) -> None:
    prog = T.lowered(model, dtype, max_seq=64)
    _check_steps(T.compare_with_refvm(prog, T.random_weights(prog, seed=3), steps=3))


ALL_FUSED = [list(f) for f in FUSIONS]  # the default plus the combine inside the O projection


@pytest.mark.parametrize("fusion", [[], T.knobs()["fusion"], ALL_FUSED], ids=["unfused", "fused", "all-fused"])
@pytest.mark.parametrize("sm_count", [1, 7, 0])
def test_schedules_match_refvm(sm_count: int, fusion: list[list[str]]) -> None:
    # Unfused programs run the standalone RMSNORM, ADD and SILU_MUL ops; kv_block 8 with
    # 20 steps makes several attention blocks, some empty, for the combine step.
    prog = T.lowered("toy", "bf16", max_seq=24, sm_count=sm_count, fusion=fusion,
                     tiling__attention__kv_block=8, tiling__gemv__n_tile=16)
    _check_steps(T.compare_with_refvm(prog, T.random_weights(prog, seed=5), steps=20))


@pytest.mark.parametrize("seed", range(12))
def test_random_programs_match_refvm(seed: int) -> None:
    cfg, kn, dtype, max_seq = T.random_case(seed)
    prog = T.lowered(cfg, dtype, max_seq=max_seq, **{k.replace(".", "__"): v for k, v in kn.items()})
    _check_steps(T.compare_with_refvm(prog, T.random_weights(prog, seed=seed), steps=3))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_argmax_ties_pick_smallest_index(dtype: str) -> None:
    import torch

    from pytest_amk import refvm

    prog, weights = T.argmax_tie_program(dtype)
    ref = refvm.alloc_buffers(prog, weights)
    for task in refvm.schedule_order(prog):
        refvm.execute(task, ref)
    bufs = refvm.alloc_buffers(prog, weights, f"cuda:{gpu.device_info().index}")
    runner = gpu.GpuRunner(prog, bufs, validate=False)
    runner.launch()
    runner.check()
    logits, want = bufs[3].cpu(), ref[3]
    assert torch.allclose(logits, want, rtol=1e-4, atol=1e-4)
    expected = int(torch.argmax(logits))  # first occurrence
    assert expected < 8  # the max repeats every 8 rows; the first one wins
    assert runner.next_token() == int(ref[5][0]) == expected


def _expect_watchdog(prog: object, cycle: set[int]) -> gpu.WatchdogTimeout:
    runner = gpu.GpuRunner(prog, {}, validate=False, watchdog_s=WATCHDOG_S)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    with pytest.raises(gpu.WatchdogTimeout) as info:
        runner.run_step(0, 0)
    elapsed = time.perf_counter() - t0
    e = info.value
    assert e.task in cycle and e.op == "NOP", str(e)
    assert e.value is not None and e.threshold is not None and e.value < e.threshold
    assert elapsed < WATCHDOG_S + 2.0, f"abort took {elapsed:.2f} s"
    return e


def test_unsatisfiable_wait_is_a_clean_error_and_next_program_runs() -> None:
    e = _expect_watchdog(T.unsatisfiable_wait_program(), {1})
    assert (e.task, e.sm, e.counter, e.value, e.threshold) == (1, 0, 0, 1, 5)
    assert "watchdog" in str(e) and "counter 0 >= 5" in str(e)
    prog = T.lowered("toy", "bf16", max_seq=16, sm_count=8)
    _check_steps(T.compare_with_refvm(prog, T.random_weights(prog), steps=1))


def test_cyclic_queues_are_a_clean_error_and_next_program_runs() -> None:
    _expect_watchdog(T.cyclic_program(), {0, 1, 2})
    _expect_watchdog(T.cyclic_program(), {0, 1, 2})  # twice: the context stays usable
    prog = T.lowered("toy", "fp16", max_seq=16)
    _check_steps(T.compare_with_refvm(prog, T.random_weights(prog), steps=1))


def test_grid_that_cannot_be_resident_is_refused() -> None:
    prog = T.nop_program([(0, [], None)], 1, num_sms=100_000)
    with pytest.raises(gpu.ResidencyError, match="co-resident"):
        gpu.GpuRunner(prog, {}, validate=False)


def test_runners_of_one_build_keep_their_shared_memory() -> None:
    # Two programs of one build: the later runner's smaller need must not lower the limit the
    # shared kernel function was given for the earlier one (cuLaunchKernel: invalid argument).
    from pytest_amk import ir, refvm

    big = T.lowered("toy", "bf16", max_seq=64, tiling__attention__kv_block=64)
    small = T.lowered("toy", "bf16", max_seq=64, tiling__attention__kv_block=8)
    assert ir.program_smem_bytes(big) > ir.program_smem_bytes(small)
    dev = f"cuda:{gpu.device_info().index}"
    runners = [gpu.GpuRunner(p, refvm.alloc_buffers(p, T.random_weights(p), dev), validate=False)
               for p in (big, small)]
    assert runners[0].kernel is runners[1].kernel
    for r in reversed(runners + runners):
        r.run_step(1, 3)


def test_out_of_range_inputs_are_refused_on_the_host() -> None:
    prog = T.lowered("toy", "bf16", max_seq=16, sm_count=4)
    from pytest_amk import refvm

    bufs = refvm.alloc_buffers(prog, T.random_weights(prog), f"cuda:{gpu.device_info().index}")
    runner = gpu.GpuRunner(prog, bufs, validate=False)
    with pytest.raises(ValueError, match="position"):
        runner.run_step(1, 16)
    with pytest.raises(ValueError, match="token"):
        runner.run_step(10_000, 0)


def test_timing_gives_a_median() -> None:
    from pytest_amk import refvm

    prog = T.lowered("toy-4L", "bf16", max_seq=64)
    bufs = refvm.alloc_buffers(prog, T.random_weights(prog), f"cuda:{gpu.device_info().index}")
    t = gpu.GpuRunner(prog, bufs, validate=False).time_step(1, 0, warmup=2, iters=5)
    assert t.median_us > 0 and len(t.samples_us) == 5
    print(f"toy-4L bf16: {t.median_us:.1f} us on {t.device_name}")


def test_runner_for_reuses_the_tensors_for_the_sync_skeleton() -> None:
    from helpers import toy_toml

    from pytest_amk import pipeline
    from pytest_amk.gpu import harness
    from pytest_amk.schedule import parse_text

    sf = parse_text(toy_toml('name = "a"', 'name = "b"\ntiling.attention.kv_block = 16'))
    prog, other = (pipeline.lower_schedule(sf, s) for s in sf.schedules)
    runner = harness.runner_for(prog, sf)
    skel = harness.runner_for(prog.sync_skeleton(), sf)
    assert skel is not runner and skel.tensors is runner.tensors
    assert skel.time_step(1, 0, warmup=1, iters=3).median_us > 0
    assert harness.runner_for(other, sf).tensors is not runner.tensors


def test_sync_skeleton_and_work_alone_run_and_are_faster_than_the_step() -> None:
    from pytest_amk import refvm

    prog = T.lowered("toy-4L", "bf16", max_seq=64)
    bufs = refvm.alloc_buffers(prog, T.random_weights(prog), f"cuda:{gpu.device_info().index}")
    step = gpu.GpuRunner(prog, bufs, validate=False).time_step(1, 0, warmup=2, iters=9).median_us
    skel = gpu.GpuRunner(prog.sync_skeleton(), bufs, validate=False).time_step(1, 0, warmup=2, iters=9).median_us
    work = gpu.GpuRunner(prog.without_waits(), bufs, validate=False).time_step(1, 0, warmup=2, iters=9).median_us
    assert 0 < skel < step and 0 < work < step, (skel, work, step)
    print(f"toy-4L bf16: step {step:.1f} us, sync skeleton {skel:.1f} us, work alone {work:.1f} us")
