"""GPU pinning per xdist worker (fake device lists) and the per-GPU timing lock."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from pytest_amk import devices


def test_visible_devices_from_env_or_probe() -> None:
    assert devices.visible_devices({"CUDA_VISIBLE_DEVICES": "2,3"}, lambda: 8) == ["2", "3"]
    assert devices.visible_devices({"CUDA_VISIBLE_DEVICES": ""}, lambda: 8) == []
    assert devices.visible_devices({}, lambda: 4) == ["0", "1", "2", "3"]
    assert devices.visible_devices({}, lambda: 0) == []


def test_workers_round_robin_over_the_users_devices() -> None:
    devs = ["GPU-aaa", "GPU-bbb", "5"]
    assert [devices.assign(f"gw{i}", devs) for i in range(5)] == ["GPU-aaa", "GPU-bbb", "5", "GPU-aaa", "GPU-bbb"]
    assert devices.assign("gw3", []) is None
    with pytest.raises(ValueError):
        devices.assign("master", devs)


def test_pin_worker_narrows_the_environment() -> None:
    env = {"CUDA_VISIBLE_DEVICES": "4,6"}
    assert devices.pin_worker("gw1", env, lambda: 8) == "6"
    assert env["CUDA_VISIBLE_DEVICES"] == "6" and env[devices.PINNED_ENV] == "6"
    cpu_env: dict[str, str] = {}
    assert devices.pin_worker("gw0", cpu_env, lambda: 0) is None and cpu_env == {}  # no-op on CPU


def _hold(path: str, key: str, log: str) -> None:
    import os

    os.environ["AMK_LOCK_DIR"] = path
    with devices.exclusive_gpu(key):
        with open(log, "a") as f:
            f.write(f"start {time.time()}\n")
        time.sleep(0.3)
        with open(log, "a") as f:
            f.write(f"end {time.time()}\n")


def test_timing_lock_is_exclusive_per_gpu(tmp_path: Path) -> None:
    log = tmp_path / "log"
    procs = [multiprocessing.Process(target=_hold, args=(str(tmp_path), "0", str(log))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    events = [line.split()[0] for line in log.read_text().splitlines()]
    assert events == ["start", "end"] * 3  # never two timed regions on one GPU at once


def test_xdist_workers_are_pinned(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    out = pytester.path / "pins"
    out.mkdir()
    pytester.makepyfile(test_env=f"""
        import os
        import pytest
        @pytest.mark.parametrize("i", range(4))
        def test_env(worker_id, i):
            with open({str(out)!r} + "/" + worker_id, "a") as f:
                f.write(os.environ.get("CUDA_VISIBLE_DEVICES", "unset") + "\\n")
    """)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7,9")
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:hypothesispytest")
    result.assert_outcomes(passed=4)
    seen = {p.name: set(p.read_text().split()) for p in out.iterdir()}
    assert seen and all(v == {"7"} for k, v in seen.items() if k == "gw0")
    assert all(v == {"9"} for k, v in seen.items() if k == "gw1")
