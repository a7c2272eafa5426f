"""Fixtures shared by the pytester-based tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def amk(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A pytester dir whose rootdir is pinned by an ini file, with a schedules/ dir.
    Inner runs are top-level runs even when this suite runs under xdist (pytest-benchmark
    reads PYTEST_XDIST_WORKER and would turn itself off)."""
    for var in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(var, raising=False)
    pytester.makeini("[pytest]\n")
    pytester.mkdir("schedules")
    return pytester
