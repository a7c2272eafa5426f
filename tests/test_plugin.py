"""The pytest plugin end to end, with pytester: every outcome of DESIGN §3, malformed
files, what is collected, JUnit properties, xdist, options and hooks.

Inner runs use the 2-layer ``toy`` model and few decode steps, so each takes about
a second. The plugin is loaded through its entry point (``pip install -e .``).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

# In-process pytester runs remove the modules that a run imported when it ends; a C
# extension such as torch (or PyCUDA) cannot be imported twice in one process. Import
# them here, before any inner run, so that they stay (and the eager-model caches with them).
import torch  # noqa: E402, F401
from helpers import toy_toml

from pytest_amk import pipeline, refvm  # noqa: E402, F401
from pytest_amk.models import llama  # noqa: E402, F401

try:
    pipeline.gpu_status("auto")  # imports PyCUDA where there is a GPU
except Exception:
    pass

GOOD = toy_toml('name = "default"')

REJECTED = toy_toml('name = "ok"', 'name = "too-many-threads"\nthreads_per_block = 2048')

EXPECTED_REJECTED = toy_toml(
    'name = "over-limit"\nthreads_per_block = 2048\nexpect.outcome = "rejected"\nexpect.reason = "threads_per_block"')

BROKEN_EMBED_CONFTEST = """
import pytest
from pytest_amk import refvm

# A bug in the reference VM's EMBED for items named broken*: its logits then differ
# from eager PyTorch for real, and the item must FAIL.
@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    if not item.name.startswith("broken"):
        return (yield)
    orig = refvm.OPS_IMPL["EMBED"]

    def embed_off_by_half(bufs, p):
        orig(bufs, p)
        bufs[p["out"]][p["lo"]:p["hi"]] += 0.5

    refvm.OPS_IMPL["EMBED"] = embed_off_by_half
    try:
        return (yield)
    finally:
        refvm.OPS_IMPL["EMBED"] = orig
"""



def write(pytester: pytest.Pytester, relpath: str, text: str) -> None:
    path = pytester.path / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# Hypothesis' plugin imports hypothesis at the end of each run (2 s with assertion
# rewriting, and in-process runs drop it again): not loaded in inner runs.
INNER = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest")


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    result = pytester.runpytest("--amk-steps=2", *INNER, *args)
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    return result


def junit_cases(path: object) -> dict[str, ET.Element]:
    root = ET.parse(str(path)).getroot()
    return {f"{c.get('classname')}::{c.get('name')}": c for c in root.iter("testcase")}


def props(case: ET.Element) -> dict[str, str]:
    return {p.get("name", ""): p.get("value", "") for p in case.iter("property")}


# -- outcomes ----------------------------------------------------------------------------------

def test_pass_with_gpu_not_run_on_cpu(amk: pytest.Pytester) -> None:
    write(amk, "schedules/toy.toml", GOOD)
    result = run(amk, "--amk-device=cpu", "-v", "-rA")
    assert result.ret == 0
    assert result.parseoutcomes() == {"passed": 1}
    result.stdout.fnmatch_lines([
        "schedules/toy.toml::default PASSED (GPU stage not run: --amk-device=cpu)*",
        "*amk stages*",
        "reference *ok*reference VM vs eager*",
        "gpu *skipped*--amk-device=cpu*",
        "GPU stage not run for 1 item: --amk-device=cpu",
    ])


def test_pass_auto_device_says_why_gpu_not_run(amk: pytest.Pytester) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the GPU stage runs")
    write(amk, "schedules/toy.toml", GOOD)
    result = run(amk)
    assert result.ret == 0
    result.stdout.fnmatch_lines(["GPU stage not run for 1 item: *", "*1 passed*"])


def test_cuda_device_required_but_missing_errors_the_items(amk: pytest.Pytester) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    write(amk, "schedules/toy.toml", GOOD + '\n[[schedule]]\nname = "second"\n')
    result = run(amk, "--amk-device=cuda")
    assert result.ret == 1
    assert result.parseoutcomes() == {"errors": 2}
    result.stdout.fnmatch_lines(["*ERROR at setup of schedule toy.toml::default*",
                                 "--amk-device=cuda but no usable GPU: *"])
    assert "fixture was not used" not in result.stdout.str()


def test_fail_when_reference_vm_mismatches_eager(amk: pytest.Pytester) -> None:
    amk.makeconftest(BROKEN_EMBED_CONFTEST)
    write(amk, "schedules/toy.toml", GOOD + '\n[[schedule]]\nname = "broken-embed"\n')
    result = run(amk, "--amk-device=cpu")
    assert result.ret == 1
    assert result.parseoutcomes() == {"passed": 1, "failed": 1}
    result.stdout.fnmatch_lines([
        "*= FAILURES =*",
        "*toy.toml::broken-embed*",
        "FAIL: reference VM vs eager, position 0: max abs error * > tolerance *",
        "stage *status *seconds *detail",
        "lower *ok *",
        "validate *ok *proven safe",
        "reference *failed *",
        "FAILED schedules/toy.toml::broken-embed - FAIL: reference VM vs eager*",
    ])


def test_rejected_has_own_category_section_and_exit_code(amk: pytest.Pytester) -> None:
    write(amk, "schedules/limits.toml", REJECTED)
    result = run(amk, "--amk-device=cpu")
    assert result.ret == 1
    assert result.parseoutcomes() == {"passed": 1, "rejected": 1}
    out = result.stdout.str()
    result.stdout.fnmatch_lines([
        "schedules/limits.toml .J*",
        "*= REJECTED (1) =*",
        "REJECTED schedules/limits.toml::too-many-threads - *threads_per_block = 2048 exceeds h100*",
        "*= 1 passed, 1 rejected in *",
    ])
    assert "FAILURES" not in out and "FAILED" not in out


def test_rejected_verbose_word(amk: pytest.Pytester) -> None:
    write(amk, "schedules/limits.toml", REJECTED)
    result = run(amk, "--amk-device=cpu", "-v")
    result.stdout.fnmatch_lines(["schedules/limits.toml::too-many-threads REJECTED*"])


def test_expected_rejected_passes_and_shows_reason_when_verbose(amk: pytest.Pytester) -> None:
    write(amk, "schedules/limits.toml", EXPECTED_REJECTED)
    result = run(amk, "-v")
    assert result.ret == 0
    assert result.parseoutcomes() == {"passed": 1}
    result.stdout.fnmatch_lines([
        "schedules/limits.toml::over-limit PASSED (expected REJECTED)*",
        "*expected REJECTED, passed (1)*",
        "PASSED schedules/limits.toml::over-limit - expected REJECTED: *threads_per_block*",
    ])
    quiet = run(amk)
    assert "expected REJECTED" not in quiet.stdout.str()


def test_expected_rejected_but_valid_fails(amk: pytest.Pytester) -> None:
    write(amk, "schedules/x.toml", toy_toml('name = "actually-fine"\nexpect.outcome = "rejected"'))
    result = run(amk, "--amk-device=cpu")
    assert result.ret == 1
    assert result.parseoutcomes() == {"failed": 1}
    result.stdout.fnmatch_lines(["FAIL: expected REJECTED (any reason) but the schedule was valid"])


def test_expected_rejected_with_wrong_reason_fails(amk: pytest.Pytester) -> None:
    write(amk, "schedules/x.toml", toy_toml('name = "wrong-reason"\nthreads_per_block = 2048\n'
                                            'expect.outcome = "rejected"\nexpect.reason = "shared memory"'))
    result = run(amk)
    assert result.ret == 1
    assert result.parseoutcomes() == {"failed": 1}
    result.stdout.fnmatch_lines(["FAIL: REJECTED as expected, but the reason * does not contain * 'shared memory'"])


# -- JUnit ---------------------------------------------------------------------------------------

def test_junit_xml_carries_outcome_properties(amk: pytest.Pytester) -> None:
    write(amk, "schedules/limits.toml", REJECTED)
    write(amk, "schedules/xrej.toml", EXPECTED_REJECTED)
    write(amk, "schedules/bad.toml", "[model]\nid = 3\n")
    xml = amk.path / "junit.xml"
    result = run(amk, "--amk-device=cpu", f"--junitxml={xml}")
    assert result.ret == 1
    cases = junit_cases(xml)
    ok = props(cases["schedules.limits.toml::ok"])
    assert ok["amk_outcome"] == "passed"
    assert ok["amk_schedule_id"] == "limits.toml::ok"
    assert ok["amk_latency_kind"] == "predicted"
    assert float(ok["amk_latency_us"]) > 0 and 0 < float(ok["amk_pct_of_roofline"]) <= 100
    assert float(ok["amk_max_abs_err"]) >= 0
    assert set(ok) >= {"amk_outcome", "amk_schedule_id", "amk_latency_us", "amk_latency_kind",
                       "amk_pct_of_roofline", "amk_max_abs_err"}
    rej = cases["schedules.limits.toml::too-many-threads"]
    assert props(rej)["amk_outcome"] == "rejected"
    assert props(rej)["amk_latency_us"] == ""
    failure = rej.find("failure")
    assert failure is not None and "REJECTED" in failure.get("message", "")
    assert props(cases["schedules.xrej.toml::over-limit"])["amk_outcome"] == "expected-rejected"
    bad = cases["schedules.bad.toml::malformed"]
    assert props(bad)["amk_outcome"] == "error"
    assert bad.find("error") is not None


# -- malformed files --------------------------------------------------------------------------------

MALFORMED = {
    "syntax.toml": ('[model\nid = "toy"\n', "syntax.toml: invalid TOML"),
    "wrong-type.toml": (toy_toml() + '[[schedule]]\nname = "a"\nthreads_per_block = "many"\n',
                        "wrong-type.toml: schedule[0].threads_per_block: expected an integer"),
    "unknown-key.toml": (toy_toml() + '[[schedule]]\nname = "a"\nwarp_specialize = true\n',
                         "unknown-key.toml: schedule[0].warp_specialize: unknown key"),
    "unknown-gpu.toml": (toy_toml(gpu="v100") + '[[schedule]]\nname = "a"\n',
                         "unknown-gpu.toml: target.gpu: unknown GPU 'v100'"),
    "out-of-range.toml": (toy_toml() + '[[schedule]]\nname = "a"\npipelining_depth = 99\n',
                          "out-of-range.toml: schedule[0].pipelining_depth: 99 is out of range"),
    "empty.toml": ("", "empty.toml: model: missing [model] table"),
    "no-model.toml": ('[target]\ngpu = "h100"\n[[schedule]]\nname = "a"\n', "no-model.toml: model: missing"),
    "bad-dtype.toml": (toy_toml(dtype="int8") + '[[schedule]]\nname = "a"\n',
                       "bad-dtype.toml: model.dtype: 'int8' is not one of"),
}


def test_malformed_files_error_naming_file_and_key_while_others_run(amk: pytest.Pytester) -> None:
    write(amk, "schedules/good.toml", GOOD)
    for name, (text, _) in MALFORMED.items():
        write(amk, f"schedules/{name}", text)
    result = run(amk, "--amk-device=cpu")
    assert result.ret == 1
    assert result.parseoutcomes() == {"passed": 1, "errors": len(MALFORMED)}
    out = result.stdout.str()
    for name, (_, message) in MALFORMED.items():
        assert f"schedules/{message}" in out, (name, message)
        assert f"ERROR schedules/{name}::malformed" in out
    assert "= ERRORS =" in out and "Traceback" not in out


def test_unknown_gpu_option_errors_each_item_naming_it(amk: pytest.Pytester) -> None:
    write(amk, "schedules/limits.toml", REJECTED)
    result = run(amk, "--amk-gpu=v100")
    assert result.ret == 1
    assert result.parseoutcomes() == {"errors": 2}
    result.stdout.fnmatch_lines([
        "ERROR schedules/limits.toml::ok - *",
        "ERROR schedules/limits.toml::too-many-threads - *",
    ])
    assert "schedules/limits.toml: --amk-gpu: unknown GPU 'v100'; known: a100, h100" in result.stdout.str()


def test_gpu_option_and_ini_override_the_files_target(amk: pytest.Pytester) -> None:
    # 100 SMs: more than an L4 has (58), fewer than an H100 (132).
    write(amk, "schedules/l4.toml", toy_toml(gpu="l4") + '[[schedule]]\nname = "sms"\nsm_count = 100\n')
    assert run(amk).parseoutcomes() == {"rejected": 1}
    assert run(amk, "--amk-gpu=h100").parseoutcomes() == {"passed": 1}
    amk.makeini("[pytest]\namk_gpu = h100\namk_device = cpu\n")
    result = run(amk, "-v")
    result.stdout.fnmatch_lines(["*l4.toml::sms PASSED (GPU stage not run: --amk-device=cpu)*"])


# -- what is collected -----------------------------------------------------------------------------------

def test_only_schedule_dirs_and_named_files_are_collected(amk: pytest.Pytester) -> None:
    amk.path.joinpath("tox.ini").unlink()
    amk.makepyprojecttoml('[tool.pytest.ini_options]\namk_device = "cpu"\n')
    write(amk, "schedules/toy.toml", GOOD)
    write(amk, "schedules/nested/more.toml", GOOD)
    write(amk, "other/elsewhere.toml", GOOD)
    write(amk, "schedules/notes.txt", "not a schedule")
    result = run(amk, "--collect-only", "-q")
    result.stdout.fnmatch_lines(["schedules/nested/more.toml::default", "schedules/toy.toml::default"])
    out = result.stdout.str()
    assert "pyproject" not in out and "elsewhere" not in out and "notes" not in out
    named = run(amk, "--collect-only", "-q", "other/elsewhere.toml")
    named.stdout.fnmatch_lines(["other/elsewhere.toml::default"])
    assert "schedules/" not in named.stdout.str()
    assert "pyproject.toml::" not in run(amk, "--collect-only", "-q", "pyproject.toml").stdout.str()


def test_schedule_dirs_ini(amk: pytest.Pytester) -> None:
    amk.makeini("[pytest]\namk_schedule_dirs =\n    kernels\n")
    write(amk, "kernels/toy.toml", GOOD)
    write(amk, "schedules/toy.toml", GOOD)
    result = run(amk, "--collect-only", "-q")
    result.stdout.fnmatch_lines(["kernels/toy.toml::default"])
    assert "schedules/toy.toml" not in result.stdout.str()


# -- xdist ---------------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Benchmarks are automatically disabled")
def test_xdist_gives_the_same_outcomes(amk: pytest.Pytester) -> None:
    amk.makeconftest(BROKEN_EMBED_CONFTEST)
    write(amk, "schedules/limits.toml", REJECTED)
    write(amk, "schedules/xrej.toml", EXPECTED_REJECTED)
    write(amk, "schedules/broken.toml", toy_toml() + '[[schedule]]\nname = "broken-embed"\n')
    write(amk, "schedules/bad.toml", "[model]\nid = 3\n")
    serial = run(amk, "--amk-device=cpu")
    dist = run(amk, "--amk-device=cpu", "-n", "2")
    expected = {"passed": 2, "failed": 1, "rejected": 1, "errors": 1}
    assert serial.parseoutcomes() == expected
    assert {k: v for k, v in dist.parseoutcomes().items() if k != "warnings"} == expected
    assert serial.ret == dist.ret == 1
    for result in (serial, dist):
        result.stdout.fnmatch_lines_random([
            "REJECTED schedules/limits.toml::too-many-threads - *threads_per_block*",
            "FAIL: reference VM vs eager*",
            "reference *failed*",
            "*schedules/bad.toml: model.id: expected str, got 3*",
            "GPU stage not run for 1 item: --amk-device=cpu",
        ])


# -- options and the benchmark fixture -------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["--amk-steps=0"], ["--amk-device=gpu"]])
def test_bad_options_are_usage_errors(amk: pytest.Pytester, args: list[str]) -> None:
    write(amk, "schedules/toy.toml", GOOD)
    result = amk.runpytest(*INNER, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


def test_bad_ini_device_is_a_usage_error(amk: pytest.Pytester) -> None:
    amk.makeini("[pytest]\namk_device = tpu\n")
    result = amk.runpytest(*INNER)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*amk_device = 'tpu': expected one of auto, cpu, cuda*"])


@pytest.mark.parametrize("args", [[], ["--benchmark-only"], ["--benchmark-skip"], ["-p", "no:benchmark"]])
def test_benchmark_options_keep_the_cpu_stages(amk: pytest.Pytester, args: list[str]) -> None:
    write(amk, "schedules/toy.toml", GOOD)
    result = run(amk, "--amk-device=cpu", *args)
    assert result.parseoutcomes() == {"passed": 1}
    assert "fixture was not used" not in result.stdout.str()


def test_items_request_the_benchmark_fixture(amk: pytest.Pytester) -> None:
    write(amk, "schedules/toy.toml", GOOD)
    amk.makeconftest("""
import pytest

@pytest.hookimpl
def pytest_collection_modifyitems(items):
    for item in items:
        print("FIXTURES", item.nodeid, sorted(item.fixturenames))
""")
    result = run(amk, "--collect-only", "-s")
    result.stdout.fnmatch_lines(["FIXTURES schedules/toy.toml::default ['benchmark'*"])


def test_skipped_items_report_cleanly(amk: pytest.Pytester) -> None:
    # A skip marker on a custom item needs reportinfo() with a line number.
    write(amk, "schedules/toy.toml", GOOD)
    amk.makeconftest("""
import pytest

@pytest.hookimpl
def pytest_collection_modifyitems(items):
    for item in items:
        item.add_marker(pytest.mark.skip(reason="not today"))
""")
    xml = amk.path / "junit.xml"
    result = run(amk, "-rs", f"--junitxml={xml}")
    assert result.parseoutcomes() == {"skipped": 1}
    assert props(junit_cases(xml)["schedules.toy.toml::default"])["amk_outcome"] == "skipped"
    result.stdout.fnmatch_lines(["SKIPPED *schedules/toy.toml*: not today"])


# -- hooks --------------------------------------------------------------------------------------------------------

def test_modify_schedule_hook_replaces_and_vetoes(amk: pytest.Pytester) -> None:
    write(amk, "schedules/toy.toml", GOOD + '\n[[schedule]]\nname = "vetoed"\n\n[[schedule]]\nname = "widened"\n')
    amk.makeconftest("""
import dataclasses

import pytest
from pytest_amk.pipeline import Rejected

@pytest.hookimpl
def pytest_amk_modify_schedule(config, schedule_file, schedule):
    if schedule.name == "vetoed":
        raise Rejected("vetoed by the lab's conftest")
    if schedule.name == "widened":
        return dataclasses.replace(schedule, knobs={**schedule.knobs, "threads_per_block": 4096})
    return None

@pytest.hookimpl
def pytest_amk_schedule_result(item, result):
    print("RESULT", item.name, result.outcome, result.verdict.schedule_id)
""")
    result = run(amk, "--amk-device=cpu", "-s")
    assert result.parseoutcomes() == {"passed": 1, "rejected": 2}
    result.stdout.fnmatch_lines_random([
        "REJECTED schedules/toy.toml::vetoed - vetoed by the lab's conftest",
        "REJECTED schedules/toy.toml::widened - *threads_per_block = 4096*",
        "*RESULT default passed toy.toml::default",
        "*RESULT vetoed rejected toy.toml::vetoed",
    ])


def test_machine_info_hook(amk: pytest.Pytester) -> None:
    write(amk, "schedules/toy.toml", GOOD)
    amk.makeconftest("""
import pytest

@pytest.hookimpl
def pytest_amk_machine_info(config, info):
    info["runner"] = "ci-7"

@pytest.hookimpl
def pytest_sessionfinish(session):
    info = {}
    session.config.hook.pytest_benchmark_update_machine_info(config=session.config, machine_info=info)
    print("MACHINE", sorted(info["amk"].items()))
""")
    result = run(amk, "--amk-device=cpu", "-s", "--amk-gpu=h200")
    result.stdout.fnmatch_lines(["*MACHINE *('device', 'cpu'), ('gpu_target', 'h200'), ('runner', 'ci-7')*"])


def test_report_header_and_help(amk: pytest.Pytester) -> None:
    result = amk.runpytest(*INNER, "--help")
    result.stdout.fnmatch_lines(["*--amk-gpu=NAME*", "*--amk-device=*", "*--amk-steps=N*", "*amk_schedule_dirs*"])
    write(amk, "schedules/toy.toml", GOOD)
    header = run(amk, "--collect-only", "--amk-gpu=a100")
    header.stdout.fnmatch_lines(["amk: gpu=a100, device=auto, steps=2, schedule dirs: schedules"])
