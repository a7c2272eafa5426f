"""The ``amk`` command: each subcommand, its JSON and its exit codes (0 ok, 1 a
negative result, 2 bad input with one line on stderr and no traceback)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_input_error, toy_toml

from pytest_amk.cli import main
from pytest_amk.schedule import KNOBS

# The verdict's keys, exactly as DESIGN §4 lists them.
VERDICT_KEYS = {"valid", "rejected_reason", "correct", "max_abs_err", "top1_agreement", "latency_us",
                "latency_kind", "pct_of_roofline", "bound_us", "schedule_id", "tasks", "weight_mb", "gpu",
                "model", "device", "notes"}

TOY = toy_toml(
    'name = "default"',
    'name = "narrow"\nthreads_per_block = 128\ntiling.gemv.n_tile = 8',
    'name = "too-many-threads"\nthreads_per_block = 2048',
    'name = "over-limit"\nthreads_per_block = 2048\nexpect.outcome = "rejected"\nexpect.reason = "threads_per_block"',
)


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    path = tmp_path / "toy.toml"
    path.write_text(TOY)
    return path


def amk(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


# -- doctor -------------------------------------------------------------------------------------

def test_doctor(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = amk(capsys, "doctor")
    assert code == 0
    for word in ("python", "torch", "pycuda", "nvcc", "cuda_available", "gpu_stage", "targets", "pytest_plugin"):
        assert word in out
    assert "h100 (sm_90, 132 SMs" in out
    code, out, _ = amk(capsys, "doctor", "--json")
    info = json.loads(out)
    assert info["pytest_plugin"] == "pytest_amk.plugin" and info["problems"] == []
    assert set(info["targets"]) >= {"h100", "h200", "a100", "rtx5090", "l4"}


def test_console_script_is_installed() -> None:
    exe = shutil.which("amk") or str(Path(sys.executable).parent / "amk")
    if not Path(exe).exists():
        pytest.skip("the amk console script is not installed (pip install -e .)")
    proc = subprocess.run([exe, "eval", "missing.toml"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("amk eval: error: missing.toml: cannot read: "
                                   "[Errno 2] No such file or directory: 'missing.toml'")


# -- propose -------------------------------------------------------------------------------------

def test_propose_lists_knobs_and_search_space(capsys: pytest.CaptureFixture[str], toy: Path) -> None:
    code, out, _ = amk(capsys, "propose", str(toy), "--schedule", "narrow")
    assert code == 0
    data = json.loads(out)
    assert data["schedule"] == "narrow"
    assert data["schedules"] == ["default", "narrow", "too-many-threads", "over-limit"]
    assert data["knobs"]["threads_per_block"] == 128 and set(data["knobs"]) == set(KNOBS)
    assert data["changed_knobs"] == {"threads_per_block": 128, "tiling.gemv.n_tile": 8}
    assert set(data["search_space"]) == set(KNOBS)
    for knob in data["search_space"].values():
        assert {"type", "default", "choices", "doc"} <= set(knob)
    assert data["gpu"] == "h100" and data["model"]["id"] == "toy"


def test_propose_first_schedule_by_default(capsys: pytest.CaptureFixture[str], toy: Path) -> None:
    code, out, _ = amk(capsys, "propose", str(toy))
    assert code == 0 and json.loads(out)["schedule"] == "default"


# -- eval ------------------------------------------------------------------------------------------

def test_eval_json_pass(capsys: pytest.CaptureFixture[str], toy: Path) -> None:
    code, out, _ = amk(capsys, "eval", str(toy), "--device", "cpu", "--steps", "2", "--json")
    assert code == 0
    verdict = json.loads(out)
    assert set(verdict) == VERDICT_KEYS
    assert verdict["valid"] and verdict["correct"]
    assert verdict["latency_kind"] == "predicted" and verdict["latency_us"] >= verdict["bound_us"] > 0
    assert verdict["schedule_id"] == "toy.toml::default"
    assert any("--amk-device=cpu" in n for n in verdict["notes"])


def test_eval_json_rejected_exits_1(capsys: pytest.CaptureFixture[str], toy: Path) -> None:
    code, out, _ = amk(capsys, "eval", str(toy), "--schedule", "too-many-threads", "--json")
    assert code == 1
    verdict = json.loads(out)
    assert set(verdict) == VERDICT_KEYS
    assert verdict["valid"] is False and "threads_per_block" in verdict["rejected_reason"]
    assert verdict["latency_us"] is None and verdict["latency_kind"] is None


def test_eval_expected_rejected_exits_0(capsys: pytest.CaptureFixture[str], toy: Path) -> None:
    code, out, _ = amk(capsys, "eval", str(toy), "--schedule", "over-limit")
    assert code == 0
    assert out.startswith("PASS (expected REJECTED) toy.toml::over-limit")


def test_eval_text(capsys: pytest.CaptureFixture[str], toy: Path) -> None:
    code, out, _ = amk(capsys, "eval", str(toy), "--schedule", "narrow", "--device", "cpu", "--steps", "1")
    assert code == 0
    assert out.startswith("PASS toy.toml::narrow")
    assert "reference" in out and "latency_kind: predicted" in out


def test_eval_gpu_override(capsys: pytest.CaptureFixture[str], toy: Path) -> None:
    code, out, _ = amk(capsys, "eval", str(toy), "--gpu", "l4", "--device", "cpu", "--steps", "1", "--json")
    assert code == 0 and json.loads(out)["gpu"] == "l4"


@pytest.mark.parametrize(("text", "words"), [
    ('[model\nid = "toy"', ["bad.toml", "invalid TOML"]),
    ('[model]\nid = "toy"\nflavour = 1\n[[schedule]]\nname = "a"\n', ["bad.toml", "model.flavour", "unknown key"]),
    ('[model]\nid = "toy"\n[target]\ngpu = "v100"\n[[schedule]]\nname = "a"\n', ["bad.toml", "target.gpu", "v100"]),
    ('[model]\nid = "toy"\n[target]\ngpu = "h100"\n[[schedule]]\nname = "a"\nsm_count = -1\n',
     ["bad.toml", "schedule[0].sm_count", "out of range"]),
])
def test_eval_malformed_file(capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str,
                             words: list[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert_input_error(*amk(capsys, "eval", str(path))[::2], *words)


def test_eval_bad_inputs(capsys: pytest.CaptureFixture[str], toy: Path, tmp_path: Path) -> None:
    assert_input_error(*amk(capsys, "eval", str(tmp_path / "missing.toml"))[::2], "missing.toml", "cannot read")
    assert_input_error(*amk(capsys, "eval", str(toy), "--gpu", "v100")[::2], "toy.toml", "--gpu", "v100")
    assert_input_error(*amk(capsys, "eval", str(toy), "--schedule", "nope")[::2], "--schedule", "nope", "narrow")


def test_eval_cuda_required_without_gpu(capsys: pytest.CaptureFixture[str], toy: Path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    assert_input_error(*amk(capsys, "eval", str(toy), "--device", "cuda")[::2], "--amk-device=cuda", "no usable GPU")


def test_argparse_errors_exit_2(capsys: pytest.CaptureFixture[str], toy: Path) -> None:
    for argv in (["eval", str(toy), "--steps", "0"], ["eval", str(toy), "--device", "tpu"], ["frobnicate"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert "Traceback" not in capsys.readouterr().err


# -- lower and validate ------------------------------------------------------------------------------

def test_lower_then_validate(capsys: pytest.CaptureFixture[str], toy: Path, tmp_path: Path) -> None:
    out_path = tmp_path / "program.json"
    code, _, err = amk(capsys, "lower", str(toy), "--schedule", "narrow", "-o", str(out_path))
    assert code == 0 and "wrote" in err
    program = json.loads(out_path.read_text())
    assert program["version"] == 1 and program["meta"]["target"] == "h100"
    assert program["meta"]["threads_per_block"] == 128 and program["tasks"]
    code, out, _ = amk(capsys, "validate", str(out_path))
    assert code == 0 and "proven safe" in out
    code, out, _ = amk(capsys, "validate", str(out_path), "--json")
    assert code == 0 and json.loads(out)["ok"] is True


def test_lower_to_stdout(capsys: pytest.CaptureFixture[str], toy: Path) -> None:
    code, out, _ = amk(capsys, "lower", str(toy))
    assert code == 0 and json.loads(out)["meta"]["knobs"]["threads_per_block"] == 256


def test_lower_rejected_exits_1(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "sms.toml"
    path.write_text('[model]\nid = "toy"\n[target]\ngpu = "l4"\n[[schedule]]\nname = "a"\nsm_count = 100\n')
    code, _, err = amk(capsys, "lower", str(path), "-o", str(tmp_path / "p.json"))
    assert code == 1 and "REJECTED" in err and "58 SMs" in err
    assert not (tmp_path / "p.json").exists()


def test_validate_unsafe_program_lists_errors(capsys: pytest.CaptureFixture[str], toy: Path,
                                              tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    amk(capsys, "lower", str(toy), "-o", str(path))
    program = json.loads(path.read_text())
    for task in program["tasks"]:
        task["waits"] = []  # no task waits for its inputs: races everywhere
    path.write_text(json.dumps(program))
    code, out, _ = amk(capsys, "validate", str(path))
    assert code == 1
    assert out.startswith(f"{path}: UNSAFE: ")
    assert "race" in out
    code, out, _ = amk(capsys, "validate", str(path), "--json")
    data = json.loads(out)
    assert code == 1 and data["ok"] is False and any(e["code"] == "race" for e in data["errors"])


@pytest.mark.parametrize(("text", "words"), [
    ("{", ["not JSON"]),
    ("[1, 2]", ["must be an object"]),
    ('{"version": 99, "buffers": [], "counters": [], "tasks": []}', ["version"]),
    ('{"version": 1, "buffers": [{"id": 0}], "counters": [], "tasks": []}', ["malformed program JSON"]),
])
def test_validate_malformed_json(capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str,
                                 words: list[str]) -> None:
    path = tmp_path / "p.json"
    path.write_text(text)
    assert_input_error(*amk(capsys, "validate", str(path))[::2], "p.json", *words)


def test_validate_bad_inputs(capsys: pytest.CaptureFixture[str], toy: Path, tmp_path: Path) -> None:
    assert_input_error(*amk(capsys, "validate", str(tmp_path / "nope.json"))[::2], "nope.json", "cannot read")
    path = tmp_path / "p.json"
    amk(capsys, "lower", str(toy), "-o", str(path))
    assert_input_error(*amk(capsys, "validate", str(path), "--gpu", "v100")[::2], "--gpu", "v100")
