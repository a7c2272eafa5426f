"""pytest-benchmark plumbing end to end on a CPU (pytester), with kernel durations injected
through the test-only hook ``pytest_amk_gpu_timing``: what is saved, storage per GPU model,
``--benchmark-compare-fail`` as a normal failure with both numbers, and a gate that fails a
run that measured nothing. Plus the pieces of ``amk bench`` that need no GPU.
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

# Imported before any in-process inner run (a C extension cannot be imported twice).
import torch  # noqa: F401
from helpers import toy_toml

from pytest_amk import bench, benchmarking, cli, pipeline, refvm  # noqa: F401
from pytest_amk.gpu import harness
from pytest_amk.models import llama  # noqa: F401

TOY = toy_toml('name = "default"')
TWO = toy_toml('name = "default"', 'name = "second"\nthreads_per_block = 128')
REJECTED_ONLY = toy_toml('name = "too-wide"\nthreads_per_block = 2048')

# Durations per item name from $AMK_FAKE_US (JSON), so each inner run can inject its own.
# pytest-benchmark's default machine info asks py-cpuinfo (a second per run): not needed here.
INJECT = """
import json, os

import pytest

@pytest.hookimpl
def pytest_amk_gpu_timing(item, result):
    return json.loads(os.environ.get("AMK_FAKE_US", "{}")).get(item.name)

@pytest.hookimpl
def pytest_benchmark_generate_machine_info(config):
    return {"node": "test"}
"""

INNER = ("--amk-steps=2", "--amk-device=cpu", "-p", "no:cacheprovider", "-p", "no:hypothesispytest")


@pytest.fixture
def amk(amk: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """The shared pytester dir (tests/conftest.py), plus the injected timer source."""
    for var in (benchmarking.GPU_MODEL_ENV, harness.SLOWDOWN_ENV, "AMK_FAKE_US"):
        monkeypatch.delenv(var, raising=False)
    amk.makeconftest(INJECT)
    return amk


def run(pytester: pytest.Pytester, *args: str, fake: dict[str, list[float]] | None = None) -> pytest.RunResult:
    with pytest.MonkeyPatch.context() as mp:
        if fake is not None:
            mp.setenv("AMK_FAKE_US", json.dumps(fake))
        result = pytester.runpytest(*INNER, *args)
    text = result.stdout.str() + result.stderr.str()
    assert "INTERNALERROR" not in text
    assert "Traceback" not in text and "PerformanceRegression" not in text
    return result


def saved(root: Path, pattern: str) -> list[Path]:
    return sorted(root.glob(pattern))


_BASELINE: dict[str, Path] = {}


def baseline(pytester: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory) -> None:
    """.benchmarks/ holding 0001_base: toy.toml::default at a median of 100 us (saved once)."""
    if "dir" not in _BASELINE:
        (pytester.path / "schedules/toy.toml").write_text(TOY)
        assert run(pytester, "--benchmark-save=base", fake={"default": [100.0] * 3}).ret == 0
        keep = tmp_path_factory.mktemp("baseline") / ".benchmarks"
        shutil.copytree(pytester.path / ".benchmarks", keep)
        _BASELINE["dir"] = keep
    else:
        shutil.copytree(_BASELINE["dir"], pytester.path / ".benchmarks")


# -- saving --------------------------------------------------------------------------------------------------------

def test_saved_json_holds_the_injected_durations_and_extra_info(amk: pytest.Pytester) -> None:
    (amk.path / "schedules/toy.toml").write_text(TOY)
    us = [100.0, 101.5, 99.25, 100.125, 98.0, 102.75]
    result = run(amk, "--benchmark-save=base", "--benchmark-json=out.json", fake={"default": us})
    assert result.ret == 0, result.stdout.str()
    assert result.parseoutcomes() == {"passed": 1}

    data = json.loads((amk.path / "out.json").read_text())
    (b,) = data["benchmarks"]
    assert b["fullname"] == "schedules/toy.toml::default"
    assert b["group"] == "toy.toml"
    assert b["stats"]["data"] == [u * 1e-6 for u in us]  # exactly the durations, in seconds
    assert b["stats"]["rounds"] == len(us) and b["stats"]["iterations"] == 1
    assert b["stats"]["median"] == pytest.approx(100.0625e-6)
    assert b["options"]["timer"] == "cuda_events"
    x = b["extra_info"]
    assert x["schedule_id"] == "toy.toml::default" and x["latency_kind"] == "injected"
    assert x["bandwidth_source"] == "spec" and x["gpu"] == "h100"
    assert x["floor_us"] > 0 and x["floor_us"] == x["spec_floor_us"]
    assert x["pct_of_roofline"] == pytest.approx(100 * x["floor_us"] / 100.0625)
    assert x["pct_of_spec"] == pytest.approx(x["pct_of_roofline"])
    assert x["tasks"] > 0 and x["max_abs_err"] >= 0
    amk_info = data["machine_info"]["amk"]
    assert amk_info["device"] == "cpu" and "gpu" not in amk_info and amk_info["torch"]

    # Storage without a GPU: .benchmarks/no-gpu/<machine id>/, never mixed with a GPU's.
    (path,) = saved(amk.path, ".benchmarks/no-gpu/*/0001_base.json")
    stored = json.loads(path.read_text())["benchmarks"][0]
    assert stored["stats"]["median"] == b["stats"]["median"] and stored["extra_info"] == x


@pytest.mark.filterwarnings("ignore:Can't compare")
def test_storage_is_separate_per_gpu_model_unless_given(amk: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    (amk.path / "schedules/toy.toml").write_text(TOY)
    monkeypatch.setenv(benchmarking.GPU_MODEL_ENV, "NVIDIA H100 80GB HBM3")
    assert run(amk, "--benchmark-save=h100", fake={"default": [5.0, 6.0]}).ret == 0
    assert saved(amk.path, ".benchmarks/nvidia-h100-80gb-hbm3/*/0001_h100.json")
    assert run(amk, "--benchmark-save=mine", "--benchmark-storage=file://mine",
               fake={"default": [5.0, 6.0]}).ret == 0
    assert saved(amk.path, "mine/*/0001_mine.json")  # the user's storage, as given
    # A baseline saved for another GPU model is not found from this one.
    monkeypatch.setenv(benchmarking.GPU_MODEL_ENV, "NVIDIA A100-SXM4-80GB")
    other = run(amk, "--benchmark-compare", "--benchmark-compare-fail=median:5%", fake={"default": [5.0, 6.0]})
    assert other.ret == 1
    other.stdout.fnmatch_lines(["FAILED: no baseline to compare with*nvidia-a100-sxm4-80gb*"])


# -- the gate --------------------------------------------------------------------------------------------------------

def test_regression_is_a_normal_failure_with_both_numbers_and_junit_says_failed(amk: pytest.Pytester) -> None:
    (amk.path / "schedules/toy.toml").write_text(TWO)
    base = run(amk, "--benchmark-save=base", fake={"default": [100.0] * 5, "second": [200.0] * 5})
    assert base.ret == 0
    xml = amk.path / "junit.xml"
    result = run(amk, "--benchmark-compare=0001", "--benchmark-compare-fail=median:5%", f"--junitxml={xml}",
                 fake={"default": [120.0] * 5, "second": [202.0] * 5})
    assert result.ret == 1
    assert result.parseoutcomes() == {"failed": 1, "passed": 1}
    message = ("benchmark regression (--benchmark-compare-fail=median:5%): median 120.00 us now vs "
               "100.00 us in 0001_base (+20.0%, limit 5%)")
    result.stdout.fnmatch_lines([
        "*= FAILURES =*",
        message,
        "*benchmark gate (--benchmark-compare-fail=median:5%)*",
        "2 benchmark(s) compared with the baseline",
        "FAILED schedules/toy.toml::default - *benchmark regression*",
        "*1 failed, 1 passed*",
    ])
    cases = {c.get("name"): c for c in ET.parse(xml).getroot().iter("testcase")}
    failure = cases["default"].find("failure")
    assert failure is not None and "120.00 us now vs 100.00 us" in failure.get("message", "")
    props = {p.get("name"): p.get("value") for p in cases["default"].iter("property")}
    assert props["amk_outcome"] == "failed"
    assert cases["second"].find("failure") is None


def test_a_run_within_the_threshold_passes_and_says_what_it_compared(
        amk: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory) -> None:
    baseline(amk, tmp_path_factory)
    (amk.path / "schedules/toy.toml").write_text(TOY)
    result = run(amk, "--benchmark-compare=0001", "--benchmark-compare-fail", "median:5%", "mean:0.00001",
                 fake={"default": [103.0] * 3})
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*benchmark gate (--benchmark-compare-fail=median:5% mean:1e-05)*",
                                 "1 benchmark(s) compared with the baseline"])


@pytest.mark.parametrize(("text", "args", "why"), [
    (TOY, [], "nothing was measured: 1 x GPU stage not run: --amk-device=cpu"),
    (REJECTED_ONLY, [], "nothing was measured: 1 x REJECTED"),
    (TOY, ["--benchmark-skip"], "nothing was measured: --benchmark-skip"),
    (TOY, ["--benchmark-disable"], "nothing was measured: pytest-benchmark disabled benchmarks because "
                                   "--benchmark-disable"),
], ids=["gpu-not-run", "rejected", "benchmark-skip", "benchmark-disable"])
def test_compare_fail_that_measured_nothing_fails_the_run(amk: pytest.Pytester,
                                                          tmp_path_factory: pytest.TempPathFactory,
                                                          text: str, args: list[str], why: str) -> None:
    baseline(amk, tmp_path_factory)
    (amk.path / "schedules/toy.toml").write_text(text)
    xml = amk.path / "junit.xml"
    result = run(amk, "--benchmark-compare=0001", "--benchmark-compare-fail=median:5%", f"--junitxml={xml}", *args)
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*benchmark gate (--benchmark-compare-fail=median:5%)*",
                                 "0 benchmark(s) compared with the baseline", f"FAILED: {why}",
                                 "*short test summary info*", f"FAILED benchmark-gate - {why[:30]}*"])
    assert result.parseoutcomes()["failed"] == 1
    root = ET.parse(xml).getroot()
    props = {p.get("name"): p.get("value") for p in root.iter("property")}
    assert props["amk_benchmark_gate"] == f"failed: {why}"


@pytest.mark.filterwarnings("ignore:Can't compare")
def test_compare_fail_without_a_baseline_or_a_compare_fails(amk: pytest.Pytester) -> None:
    (amk.path / "schedules/toy.toml").write_text(TOY)
    # With Hypothesis' plugin too: its summary reads every report in the terminal's stats.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AMK_FAKE_US", json.dumps({"default": [1.0]}))
        result = amk.runpytest("--amk-steps=2", "--amk-device=cpu", "-p", "no:cacheprovider",
                               "--benchmark-compare", "--benchmark-compare-fail=median:5%")
    assert result.ret == 1
    assert "Traceback" not in result.stdout.str() + result.stderr.str()
    result.stdout.fnmatch_lines(["FAILED: no baseline to compare with: nothing saved in *no-gpu*",
                                 "FAILED benchmark-gate - no baseline to compare with*", "*1 failed, 1 passed*"])
    usage = run(amk, "--benchmark-compare-fail=median:5%")
    assert usage.ret == pytest.ExitCode.USAGE_ERROR
    usage.stderr.fnmatch_lines(["*--benchmark-compare-fail needs --benchmark-compare*"])


def test_new_schedule_without_baseline_is_listed_not_failed(amk: pytest.Pytester,
                                                           tmp_path_factory: pytest.TempPathFactory) -> None:
    baseline(amk, tmp_path_factory)
    (amk.path / "schedules/toy.toml").write_text(TWO)
    result = run(amk, "--benchmark-compare=0001", "--benchmark-compare-fail=median:5%",
                 fake={"default": [100.0] * 3, "second": [50.0] * 3})
    assert result.ret == 0
    result.stdout.fnmatch_lines(["1 benchmark(s) compared with the baseline",
                                 "not in the baseline (not compared): schedules/toy.toml::second"])


@pytest.mark.filterwarnings("ignore:Benchmarks are automatically disabled")
def test_xdist_with_compare_fail_fails_loudly(amk: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory
                                              ) -> None:
    baseline(amk, tmp_path_factory)
    (amk.path / "schedules/toy.toml").write_text(TOY)
    result = run(amk, "-n", "2", "--benchmark-compare=0001", "--benchmark-compare-fail=median:5%",
                 fake={"default": [500.0] * 3})
    assert result.ret == 1
    result.stdout.fnmatch_lines(["FAILED: nothing was measured: pytest-benchmark disabled benchmarks because "
                                 "xdist is active (-n)"])


# -- units -------------------------------------------------------------------------------------------------------------

def test_replay_timer_gives_back_each_duration_exactly() -> None:
    timer = benchmarking.ReplayTimer()
    durations = [1.23456789e-5, 0.1 + 0.2, 3e-7]
    timer.load(durations)
    got = []
    for _ in durations:
        timer.reset()
        start = timer()
        timer.advance()
        got.append(timer() - start)
    assert got == durations


def test_slug_and_gpu_model(monkeypatch: pytest.MonkeyPatch) -> None:
    assert benchmarking.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert benchmarking.slugify(" NVIDIA A100-SXM4-80GB ") == "nvidia-a100-sxm4-80gb"
    monkeypatch.delenv(benchmarking.GPU_MODEL_ENV, raising=False)
    assert benchmarking.gpu_model("cpu") == ""
    monkeypatch.setenv(benchmarking.GPU_MODEL_ENV, "Test GPU")
    assert benchmarking.gpu_model("cpu") == "Test GPU"
    assert isinstance(benchmarking.gpu_info(), dict)  # {} without a CUDA driver; never raises


def test_slowdown_env_is_test_only_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(harness.SLOWDOWN_ENV, raising=False)
    assert harness.slowdown_us() == 0.0
    monkeypatch.setenv(harness.SLOWDOWN_ENV, "250")
    assert harness.slowdown_us() == 250.0
    for bad in ("fast", "-1", "nan"):
        monkeypatch.setenv(harness.SLOWDOWN_ENV, bad)
        with pytest.raises(ValueError, match="AMK_TEST_SLOWDOWN_US"):
            harness.slowdown_us()


def test_bench_table_ratios_and_chart(tmp_path: Path) -> None:
    rows = [bench.Row("megakernel default", "megakernel", 20.0, 10.0, "1 tasks"),
            bench.Row("megakernel default @ context 512", "long-context", 21.0, 10.5, "+5.0% vs context 16"),
            bench.Row("megakernel default sync skeleton", "skeleton", 5.0, 10.0, "every task a NOP"),
            bench.Row("megakernel default work alone", "work", 16.0, 10.0, bench.WORK_NOTE),
            bench.Row(bench.EAGER, "baseline", 400.0, 10.0),
            bench.Row(bench.GRAPH, "baseline", 80.0, 10.0),
            bench.Row(bench.COMPILED, "baseline", None, None, "failed: boom")]
    report = bench.BenchReport("toy.toml", "toy.toml: toy bf16, context 16", 10.0, rows)
    table = report.table()
    lines = table.splitlines()
    assert lines[1].startswith("what") and lines[2].startswith(bench.FLOOR_NAME)
    row = next(line for line in lines if line.startswith("megakernel default "))
    assert row.split()[2:6] == ["20.0", "2.00", "50.0", "4.00x"]  # median, x floor, % roofline, vs CUDA graph
    assert "failed: boom" in table and "+5.0% vs context 16" in table
    skel = next(line for line in lines if line.startswith("megakernel default sync skeleton"))
    assert skel.split()[4:8] == ["5.0", "0.50", "-", "-"]  # a skeleton does no work: only x floor
    work = next(line for line in lines if line.startswith("megakernel default work alone"))
    assert work.split()[4:8] == ["16.0", "1.60", "-", "-"]  # a bound too, not a step
    assert lines[-1] == ("best: megakernel default, 20.0 us = 50.0% of roofline, 4.00x the speed of "
                         "torch CUDA graph")
    out = bench.write_chart(tmp_path / "chart.png", report)
    if out is None:
        pytest.skip("matplotlib is not installed")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert bench.chart_path(None, "schedules/toy.toml", False) == Path(".amk/bench/toy.png")
    assert bench.chart_path("r.png", "schedules/toy.toml", True) == Path("r-toy.png")
    assert bench.chart_path("r.png", "schedules/toy.toml", False) == Path("r.png")


def test_amk_bench_errors_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli.main(["bench", str(tmp_path / "missing.toml")]) == 2
    assert "amk bench: error:" in capsys.readouterr().err
    toy = tmp_path / "toy.toml"
    toy.write_text(TOY)
    assert cli.main(["bench", str(toy), "--pos", "64"]) == 2
    assert "--pos 64 outside [0, 64)" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["bench", str(toy)]) == 1
        assert "amk bench: error: needs a usable CUDA GPU" in capsys.readouterr().err


def test_buffers_key_is_shared_by_a_program_and_its_skeleton_only() -> None:
    """amk bench times the sync skeleton on the best schedule's tensors (no second upload):
    harness.runner_for reuses tensors exactly when buffers_key matches."""
    from pytest_amk.schedule import parse_text

    sf = parse_text(toy_toml('name = "a"', 'name = "b"\ntiling.attention.kv_block = 16'))
    prog_a, prog_b = (pipeline.lower_schedule(sf, s) for s in sf.schedules)
    key = harness.buffers_key(prog_a, sf.model)
    assert harness.buffers_key(prog_a.sync_skeleton(), sf.model) == key
    assert harness.buffers_key(prog_b, sf.model) != key  # other partial buffers
    other_seed = parse_text(toy_toml('name = "a"', seed=7))
    assert harness.buffers_key(prog_a, other_seed.model) != key  # other weights
