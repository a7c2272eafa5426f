"""Validator audit: an independent simulator, a mutation corpus and the audit that
measures the static validator's soundness (false accepts) and precision (false rejects)."""

from __future__ import annotations

from pytest_amk.audit.simulate import Race, SimResult, Uninit, Unwritten, simulate

__all__ = ["Race", "SimResult", "Uninit", "Unwritten", "simulate", "audit", "format_report"]


def __getattr__(name: str) -> object:
    if name in ("audit", "format_report", "AuditReport"):
        from pytest_amk.audit import run

        return getattr(run, name)
    raise AttributeError(name)
