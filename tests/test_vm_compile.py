"""The CUDA VM compiles for the supported GPUs without spills and fits one block
per SM; the launcher's memory-safety checks accept lowered programs and reject
out-of-bounds ones. Needs nvcc, no GPU (runs in CI)."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pytest_amk import ir
from pytest_amk.gpu import abi, build
from pytest_amk.gpu.checks import check_program

NVCC = build.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, $CUDA_HOME): CUDA build not checked")

# sm_90 (H100/H200) in every model dtype; one dtype each elsewhere keeps CI time moderate.
BUILDS = [
    ("sm_90", "fp32", 256, 2),
    ("sm_90", "fp16", 256, 2),
    ("sm_90", "bf16", 256, 2),
    ("sm_90", "fp32", 1024, 8),  # largest block (64-register cap) with the deepest pipelining
    ("sm_90", "bf16", 128, 16),  # most registers per thread the VM asks for
    ("sm_80", "fp16", 256, 4),
    ("sm_120", "bf16", 512, 4),
]


@pytest.fixture(scope="session")
def vm_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A fresh cache: these tests must really run nvcc, not read an old cubin.
    return tmp_path_factory.mktemp("amk-vm-cache")


def _arch_supported(arch: str) -> bool:
    out = subprocess.run([str(NVCC), "--list-gpu-arch"], capture_output=True, text=True, check=False)
    return out.returncode != 0 or f"compute_{arch[3:]}" in out.stdout


@needs_nvcc
@pytest.mark.parametrize(("arch", "dtype", "threads", "pipe"), BUILDS,
                         ids=[f"{a}-{d}-t{t}-p{p}" for a, d, t, p in BUILDS])
def test_vm_builds_without_spills(vm_cache: Path, arch: str, dtype: str, threads: int, pipe: int) -> None:
    if not _arch_supported(arch):
        pytest.skip(f"{NVCC} cannot target {arch}")
    res = build.build_cubin(build.BuildConfig(dtype, threads, pipe, arch), cache=vm_cache)
    r = res.report
    assert res.cubin.stat().st_size > 0
    assert (r.spill_stores, r.spill_loads) == (0, 0), f"spills: {r}\n{res.log}"
    assert r.stack_frame == 0, f"local-memory stack frame: {r}"
    # One block per SM must stay resident: registers within the per-SM file.
    assert r.registers * threads <= 65536, f"{r.registers} registers x {threads} threads"


def _shipped_builds() -> list[tuple[str, str, int, int]]:
    """(arch, dtype, threads, pipelining) of every passing schedule under schedules/."""
    from pytest_amk.schedule import parse_file

    out = set()
    for path in sorted((Path(__file__).resolve().parent.parent / "schedules").glob("*.toml")):
        sf = parse_file(path)
        for s in sf.schedules:
            if s.expect.outcome == "pass":
                out.add((ir.get_target(sf.gpu).arch, sf.model.dtype, s.knobs["threads_per_block"],
                         s.knobs["pipelining_depth"]))
    return sorted(out)


@needs_nvcc
@pytest.mark.parametrize(("arch", "dtype", "threads", "pipe"), _shipped_builds(),
                         ids=[f"{a}-{d}-t{t}-p{p}" for a, d, t, p in _shipped_builds()])
def test_shipped_schedules_build_without_spills(vm_cache: Path, arch: str, dtype: str, threads: int,
                                                pipe: int) -> None:
    """The builds the shipped schedules run (ptxas allocates each (threads, pipelining) on its
    own: bf16 at 512 threads spilled at pipelining 4 but not at the cap of 5)."""
    if not _arch_supported(arch):
        pytest.skip(f"{NVCC} cannot target {arch}")
    r = build.build_cubin(build.BuildConfig(dtype, threads, pipe, arch), cache=vm_cache).report
    assert (r.spill_stores, r.spill_loads, r.stack_frame) == (0, 0, 0), f"spills: {r}"


@needs_nvcc
def test_build_cache_is_keyed_on_config(vm_cache: Path) -> None:
    cfg = build.BuildConfig("bf16", 256, 2, "sm_90")
    first = build.build_cubin(cfg, cache=vm_cache)
    again = build.build_cubin(cfg, cache=vm_cache)
    assert again.cached and again.cubin == first.cubin and again.report == first.report
    other = build.build_key(build.BuildConfig("bf16", 256, 4, "sm_90"), str(NVCC))
    assert other != build.build_key(cfg, str(NVCC))


def test_header_is_generated_not_checked_in() -> None:
    vm = build.vm_dir()
    assert not (vm / build.HEADER_NAME).exists(), "amk_ir.h must be generated from ir.py at build time"
    header = abi.cuda_header()
    for op in ir.OPS:
        assert f"#define OP_{op.name} {op.code}" in header
    # The VM relies on GEMV and LM_HEAD sharing the first param slots.
    gemv, lm = ir.OPS_BY_NAME["GEMV"].params, ir.OPS_BY_NAME["LM_HEAD"].params
    assert gemv[:6] == lm[:6]


def test_trace_marks_are_in_the_header_and_the_sources() -> None:
    """Each abi.TRACE_MARKS name is defined in the generated header and placed in vm/ exactly once
    (a mark without an AMK_TRACE_AT would silently time the whole op)."""
    header = abi.cuda_header()
    sources = "".join(p.read_text() for p in sorted(build.vm_dir().glob("*.cu*")))
    for i, mark in enumerate(abi.TRACE_MARKS):
        assert f"#define AMK_MARK_{mark.upper()} {i + 1}" in header
        assert sources.count(f"AMK_TRACE_AT(AMK_MARK_{mark.upper()},") == 1, mark


def test_trace_mark_needs_a_traced_build_and_a_known_name() -> None:
    assert "-DAMK_TRACE_MARK=0" in build.BuildConfig().defines()
    cfg = build.BuildConfig(trace=True, trace_mark=abi.TRACE_MARKS[1])
    assert "-DAMK_TRACE_MARK=2" in cfg.defines()
    for bad in (dict(trace=True, trace_mark="no_such_mark"), dict(trace_mark=abi.TRACE_MARKS[0])):
        with pytest.raises(build.BuildError, match="trace_mark"):
            build.BuildConfig(**bad)


@needs_nvcc
def test_traced_build_with_a_mark_compiles_without_spills(vm_cache: Path) -> None:
    cfg = build.BuildConfig("bf16", 512, 4, "sm_90", trace=True, trace_mark="attn_prologue")
    r = build.build_cubin(cfg, cache=vm_cache)
    assert "-attn_prologue-" in r.cubin.name
    assert (r.report.spill_stores, r.report.spill_loads) == (0, 0), r.report


@needs_nvcc
def test_sync_level_micro_benchmark_compiles(tmp_path: Path) -> None:
    """tools/sync_level_bench.cu (PERFORMANCE.md's stand-alone sync level) builds for sm_90, every mode."""
    src = Path(__file__).resolve().parent.parent / "tools" / "sync_level_bench.cu"
    out = tmp_path / "sync_level_bench.cubin"
    r = subprocess.run([str(NVCC), "-arch=sm_90", "-O3", "--resource-usage", "-cubin", "-o", str(out), str(src)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 0
    assert r.stderr.count("Compiling entry function") == 13, r.stderr  # one per (mode, copies) it times
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
    assert len(frames) == 13 and all(f == ("0", "0", "0") for f in frames), frames


def test_ptxas_report_parse() -> None:
    log = ("ptxas info    : Compiling entry function 'amk_vm' for 'sm_90'\n"
           "ptxas info    : Function properties for amk_vm\n"
           "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 96 registers, used 1 barriers, 368 bytes smem, 400 bytes cmem[0]\n")
    assert build.PtxasReport.parse(log) == build.PtxasReport(96, 4, 12, 8, 368)
    with pytest.raises(build.BuildError):
        build.PtxasReport.parse("nothing here")


def test_build_config_rejects_bad_settings() -> None:
    for kw in ({"dtype": "int8"}, {"threads": 100}, {"threads": 2048}, {"pipe": 0}, {"arch": "hopper"}):
        with pytest.raises(build.BuildError):
            build.BuildConfig(**kw)  # type: ignore[arg-type]


def test_import_is_light() -> None:
    code = ("import sys, pytest_amk.gpu as g; g.GpuError; "
            "assert 'torch' not in sys.modules and 'pycuda' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- memory-safety checks (no GPU) -------------------------------------------------

def _lowered(model: str = "toy", **knobs: object) -> ir.Program:
    from pytest_amk.lower import lower
    from pytest_amk.models import config_for
    from pytest_amk.schedule import KNOBS

    k = {name: knob.default for name, knob in KNOBS.items()}
    k.update({name.replace("__", "."): v for name, v in knobs.items()})
    return lower(config_for(model), ir.get_target("h100"), k, "bf16", 64)


@pytest.mark.parametrize("model", ["toy", "toy-4L"])
def test_lowered_programs_pass_checks(model: str) -> None:
    assert check_program(_lowered(model)) == []


def test_checks_catch_out_of_bounds_and_dtypes() -> None:
    prog = _lowered("toy")
    gemv = next(t for t in prog.tasks if t.op == "GEMV")
    bad = copy.deepcopy(prog)
    bad.tasks[gemv.id].params["n_hi"] += 10_000
    assert any("outside buffer" in e for e in check_program(bad))

    bad = copy.deepcopy(prog)
    bad.tasks[gemv.id].params["weight"] = prog.buffer("rope").id  # fp32 buffer as a bf16 weight
    assert any("the VM reads bf16" in e for e in check_program(bad))

    bad = copy.deepcopy(prog)
    attn = next(t for t in bad.tasks if t.op in ("ATTN_PARTIAL", "ROPE_ATTN_PARTIAL"))
    attn.params["head_dim"] = 512
    assert any("head_dim" in e for e in check_program(bad))

    bad = copy.deepcopy(prog)
    bad.tasks[0].waits.append(ir.Wait(999, 1))
    assert any("counter 999" in e for e in check_program(bad))

    bad = copy.deepcopy(prog)
    bad.tasks[0].op = "FROB"
    assert any("unknown opcode" in e for e in check_program(bad))


def _fake_ptrs(prog: ir.Program) -> Any:
    """Buffer id -> a fake, 16-byte aligned device address (numpy int64 array)."""
    np = pytest.importorskip("numpy")
    return np.array([(1 << 32) + (b.id << 24) for b in prog.buffers], dtype=np.int64)


def test_prefetch_table_splits_the_budget_over_weight_ranges() -> None:
    """The L2 prefetch budget is per instruction: a SiLU-mul GEMV's gate and up ranges get half
    each, other weight tasks one range of the whole budget (capped by their rows), every range
    16-byte aligned and inside its weight rows; other ops prefetch nothing."""
    from pytest_amk.gpu.prefetch import prefetch_table

    prog = _lowered("toy")
    order = [t for q in prog.queues() for t in q]
    ptrs = _fake_ptrs(prog)
    sizes = {b.id: b.dtype.nbytes for b in prog.buffers}
    cap = 1024
    pf = prefetch_table(prog, order, ptrs, cap)
    seen = set()
    for i, t in enumerate(order):
        if t.op not in ("GEMV", "LM_HEAD"):
            assert not pf[i].any(), t.op
            continue
        p = t.params
        act = t.op == "GEMV" and p["act"] == 1
        row_bytes = p["k"] * sizes[p["weight"]]
        task_bytes = (p["n_hi"] - p["n_lo"]) * row_bytes
        assert int(pf[i, :, 1].sum()) <= cap
        for r, first_row in enumerate([p["n_lo"]] + ([p["up_row"] + p["n_lo"]] if act else [])):
            addr, n = (int(v) for v in pf[i, r])
            start = int(ptrs[p["weight"]]) + first_row * row_bytes
            assert addr % 16 == 0 and n % 16 == 0
            assert n == min(cap // (2 if act else 1), task_bytes) // 16 * 16
            assert start <= addr and addr + n <= start + task_bytes
        if not act:
            assert not pf[i, 1].any()
        seen.add(act)
    assert seen == {True, False}, "the toy program has both kinds of weight task"
    assert not pf[:, 2:].any(), "no lookahead unless asked for"
    assert not prefetch_table(prog, order, ptrs, 0).any()


def test_prefetch_lookahead_goes_out_between_big_tasks() -> None:
    """A big task's lookahead ranges sit in an earlier instruction of its own queue, three past
    the big task before it, exactly when at least LOOKAHEAD_MIN_GAP small tasks lie between the
    two and the one before that instruction is an attention task; they cover the start of its
    weight ranges and its own slots continue where they end."""
    from pytest_amk.gpu.prefetch import LOOKAHEAD_AFTER, LOOKAHEAD_MIN_GAP, _weight_ranges, prefetch_table

    prog = _lowered("toy")
    order = [t for q in prog.queues() for t in q]
    ptrs = _fake_ptrs(prog)
    nbytes = [sum(e - s for s, e in _weight_ranges(prog, t, ptrs)) for t in order]
    big = sorted(nbytes)[len(nbytes) * 3 // 4]  # the largest quarter of the tasks count as big
    la, cap = 1024, 512
    pf = prefetch_table(prog, order, ptrs, cap, la, big)
    found = skipped = 0
    for sm in {t.sm for t in order}:
        q = [i for i, t in enumerate(order) if t.sm == sm]
        bigs = [p for p, i in enumerate(q) if nbytes[i] >= big]
        served = set()
        for p, i in enumerate(q):
            if not pf[i, 2:].any():
                continue
            nxt = min(b for b in bigs if b > p)  # the big task it serves: the next one
            prev = max((b for b in bigs if b < nxt), default=-1)
            assert p == prev + 3 and nxt - prev - 1 >= LOOKAHEAD_MIN_GAP, (sm, p, prev, nxt)
            assert order[q[p - 1]].op in LOOKAHEAD_AFTER
            served.add(nxt)
            target = q[nxt]
            for r, (start, end) in enumerate(_weight_ranges(prog, order[target], ptrs)):
                a, n = (int(v) for v in pf[i, 2 + r])
                assert a == start and 0 < n <= la and a + n <= end
                own_a, own_n = (int(v) for v in pf[target, r])
                assert own_a == a + n or (own_n == 0 and a + n == end)
            found += 1
        for prev, b in zip([-1] + bigs, bigs, strict=False):  # every big task with room gets one
            room = b - prev - 1 >= LOOKAHEAD_MIN_GAP and order[q[prev + 2]].op in LOOKAHEAD_AFTER
            assert (b in served) == room, (sm, prev, b)
            skipped += b not in served
    assert found > 0, "no lookahead in the toy program: the test checks nothing"
    assert skipped > 0, "no big task without room for a lookahead: the test checks half"


def test_lookahead_default_follows_the_card() -> None:
    """The lookahead is off on the cards where it measured slower, and the default elsewhere."""
    from pytest_amk.gpu.prefetch import DEFAULT_LOOKAHEAD_BYTES, default_lookahead_bytes

    assert DEFAULT_LOOKAHEAD_BYTES > 0
    assert default_lookahead_bytes("NVIDIA H100 80GB HBM3") == DEFAULT_LOOKAHEAD_BYTES
    assert default_lookahead_bytes("NVIDIA H200") == 0
    assert default_lookahead_bytes("NVIDIA H200 NVL") == 0
    assert default_lookahead_bytes("Some Future GPU") == DEFAULT_LOOKAHEAD_BYTES


def test_prefetch_sizes_come_from_the_schedule_knobs() -> None:
    """The prefetch.* knobs reach the runner through the program's meta: -1 (the default) leaves
    the lookahead to the card, explicit runner arguments win, and a program without the entry
    (older JSON) gets the defaults; a malformed entry is a clean ProgramCheckError."""
    from pytest_amk.gpu.errors import ProgramCheckError
    from pytest_amk.gpu.prefetch import DEFAULT_LOOKAHEAD_BYTES, DEFAULT_PREFETCH_BYTES, prefetch_sizes

    h100, h200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"
    auto = _lowered("toy").meta
    assert prefetch_sizes(auto, h100) == (DEFAULT_PREFETCH_BYTES, DEFAULT_LOOKAHEAD_BYTES)
    assert prefetch_sizes(auto, h200) == (DEFAULT_PREFETCH_BYTES, 0)
    set_ = _lowered("toy", **{"prefetch.own_kb": 32, "prefetch.lookahead_kb": 128}).meta
    assert prefetch_sizes(set_, h200) == (32 << 10, 128 << 10)
    assert prefetch_sizes(_lowered("toy", **{"prefetch.lookahead_kb": 0}).meta, h100)[1] == 0
    assert prefetch_sizes(set_, h100, prefetch_bytes=0, lookahead_bytes=64) == (0, 64)
    assert prefetch_sizes({}, h100) == (DEFAULT_PREFETCH_BYTES, DEFAULT_LOOKAHEAD_BYTES)
    for bad in ({"prefetch": 5}, {"prefetch": {"own_bytes": -1}}, {"prefetch": {"lookahead_bytes": "big"}}):
        with pytest.raises(ProgramCheckError, match="meta.prefetch"):
            prefetch_sizes(bad, h100)


@pytest.mark.parametrize("key", sorted(ir.FIXED_DTYPES), ids=lambda k: f"{k[0]}.{k[1]}")
def test_fixed_dtypes_are_enforced_by_validator_and_launcher(key: tuple[str, str]) -> None:
    """ir.FIXED_DTYPES is the one table of fixed buffer dtypes: giving such a buffer another
    dtype makes both the validator (malformed) and the launcher's checks reject the program."""
    from pytest_amk.schedule import ALL_FUSIONS
    from pytest_amk.validate import validate

    op, name = key
    progs = [_lowered("toy", fusion=[]), _lowered("toy", fusion=ALL_FUSIONS)]
    prog = next(p for p in progs if any(t.op == op for t in p.tasks))
    task = next(t for t in prog.tasks if t.op == op)
    bad = copy.deepcopy(prog)
    bid = task.params[name]
    b = bad.buffers[bid]
    other = ir.DType.FP16 if ir.FIXED_DTYPES[key] is not ir.DType.FP16 else ir.DType.FP32
    bad.buffers[bid] = ir.Buffer(b.id, b.name, b.kind, other, b.shape)
    assert check_program(prog) == [] and validate(prog, ir.get_target("h100")).ok
    assert any(f"{name} is buffer" in e for e in check_program(bad)), check_program(bad)[:3]
    res = validate(bad, ir.get_target("h100"))
    assert not res.ok and any(e.code == "malformed" and name in e.message for e in res.errors), res.errors[:3]


def test_gemv_input_dtype_follows_inp_blocks() -> None:
    p = {"inp_blocks": 0}
    assert ir.buffer_dtype("GEMV", "inp", p, ir.DType.BF16) is ir.DType.BF16
    assert ir.buffer_dtype("GEMV", "inp", {"inp_blocks": 4}, ir.DType.BF16) is ir.DType.FP32
    assert ir.buffer_dtype("GEMV", "weight", {"inp_blocks": 4}, ir.DType.BF16) is ir.DType.BF16
