"""pytest-amk: generate, prove and benchmark GPU megakernels for LLM decode."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["evaluate", "__version__"]


def evaluate(path: str, **kwargs: Any) -> Any:
    """The verdict (DESIGN §4) of a schedule file's schedule; see ``pytest_amk.pipeline``."""
    from pytest_amk.pipeline import evaluate as _evaluate

    return _evaluate(path, **kwargs)
