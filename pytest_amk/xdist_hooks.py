"""xdist integration, registered only when xdist is installed: pin each worker to a GPU."""

from __future__ import annotations

import os

import pytest

from pytest_amk import devices


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None:  # the controller (or no xdist run) keeps the user's devices
        return
    if os.environ.get("AMK_NO_PIN"):
        return
    devices.pin_worker(workerinput["workerid"], os.environ)
