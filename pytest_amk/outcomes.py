"""How schedule outcomes (DESIGN §3) appear in pytest: the REJECTED category, the
failure reprs, the report attributes, the terminal summary and the JUnit properties.

REJECTED is a *failed* report (so the session exits 1 and ``--lf``/``-x`` treat it
as a failure) that ``pytest_report_teststatus`` puts in its own category
``rejected`` with the letter ``J`` and the word ``REJECTED``: the summary line then
reads ``3 passed, 1 rejected`` and pytest's FAILURES section leaves it out, so
``pytest_terminal_summary`` prints a REJECTED section with the reasons.

No torch here: only the pipeline's plain data (ItemResult, StageReport).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import pytest
from _pytest._code.code import TerminalRepr
from _pytest._io import TerminalWriter

if TYPE_CHECKING:
    from pytest_amk.pipeline import ItemResult, StageReport

# The pipeline's outcome strings (pytest_amk.pipeline.PASS/FAIL/REJECTED/XREJECTED),
# repeated here so that reporting never imports the pipeline; plus "error" for a
# malformed file.
PASSED, FAILED, REJECTED, XREJECTED = "passed", "failed", "rejected", "expected-rejected"
ERROR, SKIPPED = "error", "skipped"  # a malformed file or a setup error; a skipped item

CATEGORY = "rejected"  # the key in terminalreporter.stats and in the summary line
LETTER = "J"  # not R: pytest-rerunfailures uses R
WORD = "REJECTED"

# JUnit property names (item.user_properties), in this order.
JUNIT_PROPERTIES = ("amk_outcome", "amk_schedule_id", "amk_latency_us", "amk_latency_kind",
                    "amk_pct_of_roofline", "amk_max_abs_err")


# -- exceptions raised by ScheduleItem.runtest, and their reprs ---------------------

class AmkOutcome(Exception):
    """A non-passing schedule outcome; carries the pipeline's ItemResult."""

    def __init__(self, result: ItemResult) -> None:
        super().__init__(result.message)
        self.result = result


class ScheduleFailed(AmkOutcome):
    """FAIL: valid, but a result mismatched (or the GPU faulted or timed out)."""


class ScheduleRejected(AmkOutcome):
    """REJECTED: the schedule cannot be lowered or was proven unsafe."""


def stage_table(stages: Sequence[StageReport], reason: str = "") -> str:
    """The stages as a fixed-width table: stage, status, seconds, detail (a rejected
    stage without detail shows ``reason``)."""
    rows = [("stage", "status", "seconds", "detail")]
    rows += [(s.name, s.status, f"{s.seconds:.2f}", s.detail or (reason if s.status == "rejected" else ""))
             for s in stages]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    w2 = max(len(r[2]) for r in rows)
    return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c:>{w2}}  {d}".rstrip() for a, b, c, d in rows)


class _Crash:
    """What pytest reads from ``longrepr.reprcrash``: the one-line message."""

    def __init__(self, message: str) -> None:
        self.message = message


class OutcomeRepr(TerminalRepr):
    """The failure text of a FAIL or REJECTED item: headline, message, stage table.

    ``__str__`` is what xdist sends to the controller and what JUnit's failure
    message holds, so it renders the same text as ``toterminal``.
    """

    def __init__(self, word: str, result: ItemResult) -> None:
        self.word = word
        self.message = result.message
        self.table = stage_table(result.stages, result.verdict.rejected_reason or "")
        self.reprcrash = _Crash(f"{word}: {result.message}")  # the short summary's and JUnit's message

    def lines(self) -> list[str]:
        return [f"{self.word}: {self.message}", "", *self.table.splitlines()]

    def toterminal(self, tw: TerminalWriter) -> None:
        first, *rest = self.lines()
        tw.line(first, red=True, bold=True)
        for line in rest:
            tw.line(line)

    def __str__(self) -> str:
        return "\n".join(self.lines())


def repr_for(exc: BaseException) -> OutcomeRepr | None:
    if isinstance(exc, ScheduleRejected):
        return OutcomeRepr("REJECTED", exc.result)
    if isinstance(exc, ScheduleFailed):
        return OutcomeRepr("FAIL", exc.result)
    return None


# -- report attributes (travel from xdist workers as plain JSON values) ----------------

def gpu_not_run(result: ItemResult) -> str:
    """Why the GPU stage did not run ("" if it ran or was never reached)."""
    for s in result.stages:
        if s.name == "gpu" and s.status == "skipped":
            return s.detail
    return ""


def set_report_attributes(report: pytest.TestReport, result: ItemResult | None, outcome: str,
                          reason: str = "") -> None:
    """Record the outcome on a call report: amk_outcome, amk_reason, amk_verdict (JSON
    text of the verdict, DESIGN §4), amk_gpu_not_run; a passed item also gets its stage
    table as a report section (shown by ``-rP``/``-rA``)."""
    if result is None:
        report.amk_outcome = outcome  # type: ignore[attr-defined]
        report.amk_reason = reason  # type: ignore[attr-defined]
        report.amk_verdict = ""  # type: ignore[attr-defined]
        report.amk_gpu_not_run = ""  # type: ignore[attr-defined]
        return
    report.amk_outcome = outcome  # type: ignore[attr-defined]
    report.amk_reason = result.message or reason  # type: ignore[attr-defined]
    report.amk_verdict = json.dumps(result.verdict.to_json())  # type: ignore[attr-defined]
    report.amk_gpu_not_run = gpu_not_run(result)  # type: ignore[attr-defined]
    if report.passed:
        report.sections.append(("amk stages", stage_table(result.stages, result.verdict.rejected_reason or "")))


def verdict_of(report: pytest.TestReport) -> dict[str, Any] | None:
    """The verdict dict recorded on a report, if any."""
    text = getattr(report, "amk_verdict", "")
    return json.loads(text) if text else None


# -- pytest_report_teststatus -------------------------------------------------------------

def teststatus(report: pytest.TestReport) -> tuple[str, str, str | tuple[str, dict[str, bool]]] | None:
    if report.when != "call":
        return None
    outcome = getattr(report, "amk_outcome", None)
    if outcome == REJECTED and report.failed:
        return CATEGORY, LETTER, (WORD, {"red": True})
    if outcome == XREJECTED and report.passed:
        return "passed", ".", ("PASSED (expected REJECTED)", {"green": True})
    why = getattr(report, "amk_gpu_not_run", "")
    if outcome == PASSED and report.passed and why:
        return "passed", ".", (f"PASSED ({why})", {"green": True})
    return None


# -- pytest_terminal_summary ------------------------------------------------------------

def _reports(stats: dict[str, list[Any]], category: str) -> list[pytest.TestReport]:
    return [r for r in stats.get(category, []) if getattr(r, "when", None) == "call"]


def write_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """The REJECTED section (always), expected-REJECTED reasons (``-v`` or ``-rA``/``-rp``)
    and one line per reason why the GPU stage did not run."""
    tr = terminalreporter
    rejected = _reports(tr.stats, CATEGORY)
    if rejected:
        tr.write_sep("=", f"REJECTED ({len(rejected)})", red=True, bold=True)
        for rep in rejected:
            tr.write_line(f"{WORD} {rep.nodeid} - {getattr(rep, 'amk_reason', '')}")

    passed = _reports(tr.stats, "passed")
    xrej = [r for r in passed if getattr(r, "amk_outcome", None) == XREJECTED]
    chars = getattr(tr, "reportchars", "") or ""
    if xrej and (config.get_verbosity() > 0 or "A" in chars or "p" in chars):
        tr.write_sep("-", f"expected REJECTED, passed ({len(xrej)})", green=True)
        for rep in xrej:
            tr.write_line(f"PASSED {rep.nodeid} - {getattr(rep, 'amk_reason', '')}")

    why = Counter(getattr(r, "amk_gpu_not_run", "") for r in passed)
    why.pop("", None)
    for reason, n in sorted(why.items()):
        reason = reason.removeprefix("GPU stage not run: ")
        tr.write_line(f"GPU stage not run for {n} item{'s' if n != 1 else ''}: {reason}", yellow=True)


# -- JUnit properties ---------------------------------------------------------------------

def _prop(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def junit_properties(outcome: str, schedule_id: str, verdict: dict[str, Any] | None = None
                     ) -> list[tuple[str, str]]:
    """The properties every item records (DESIGN §3): outcome, schedule id, latency,
    latency kind, percent of roofline, max error; "" where there is no value."""
    v = verdict or {}
    values: Iterable[Any] = (outcome, schedule_id, v.get("latency_us"), v.get("latency_kind"),
                             v.get("pct_of_roofline"), v.get("max_abs_err"))
    return [(name, _prop(value)) for name, value in zip(JUNIT_PROPERTIES, values, strict=True)]
