"""The validator audit: soundness and precision measured on a mutation corpus.

``audit(n)`` generates ``n`` programs (``pytest_amk.audit.mutate``), runs the
static validator and the independent simulator on each, and counts:

* false accepts: the validator accepts, the simulator finds a deadlock, a
  race, an uninitialised read or an unwritten output (a soundness bug);
* false rejects: the validator rejects for a safety reason, the simulator
  finds the program safe. Counted separately where the simulator's verdict
  is exact (exhaustive or delay analysis) and where it rests on random runs;
  rejections for well-formedness alone (malformed, bad-region, resource) are
  reported apart, since the simulator does not judge those.

``python -m pytest_amk.audit.run --programs 10000`` prints the table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from pytest_amk.audit.mutate import clone, make_case
from pytest_amk.audit.simulate import simulate
from pytest_amk.ir import Program, Task, Wait

WELLFORMED = frozenset({"malformed", "bad-region", "resource"})
# validator error code -> simulator finding kind
_KIND = {"deadlock": "deadlock", "unreachable-threshold": "deadlock", "race": "race",
         "uninitialised-read": "uninit", "unwritten-output": "unwritten"}


def kinds_agree(sim_kinds: set[str], codes: set[str]) -> bool:
    """Both name the same problems. A deadlocked program need only be called one: the
    validator stops at the deadlock, the simulator looks further."""
    val = {_KIND[c] for c in codes if c in _KIND}
    if "deadlock" in sim_kinds or "deadlock" in val:
        return ("deadlock" in sim_kinds) == ("deadlock" in val)
    return sim_kinds == val


KEEP_FINDINGS = 25  # programs kept per kind of finding (false accept / false reject)
MAX_FALSE_REJECT_RATE = 0.05  # the audit fails at or above this false-reject rate


@dataclass
class ClassStats:
    cls: str
    intent: str
    n: int = 0
    sim_unsafe: int = 0
    sim_safe: int = 0  # exact verdicts only
    sim_safe_inexact: int = 0
    exhaustive: int = 0
    val_ok: int = 0
    val_reject: int = 0
    false_accept: int = 0
    false_reject: int = 0  # the simulator's verdict is exact
    false_reject_inexact: int = 0
    wellformed_reject: int = 0  # rejected only for well-formedness, simulator says safe
    kind_mismatch: int = 0  # both reject, but name different problems (see _KIND)

    @property
    def false_reject_rate(self) -> float:
        return self.false_reject / self.sim_safe if self.sim_safe else 0.0


@dataclass
class Finding:
    kind: str  # "false-accept" | "false-reject" | "wellformed-reject"
    index: int
    cls: str
    base: str
    simulator: str
    validator: str
    program: dict[str, Any]
    shrunk: dict[str, Any]  # a reduced program with the same finding


@dataclass
class AuditReport:
    n_programs: int
    seed: int
    seconds: float
    workers: int
    classes: dict[str, ClassStats]
    findings: list[Finding] = field(default_factory=list)
    confusion: dict[str, int] = field(default_factory=dict)  # "simulator kinds | validator codes" -> count
    validator_1b: dict[str, Any] = field(default_factory=dict)
    sim_seconds: float = 0.0
    val_seconds: float = 0.0

    def total(self, attr: str) -> int:
        return sum(getattr(s, attr) for s in self.classes.values())

    @property
    def false_accepts(self) -> int:
        return self.total("false_accept")

    @property
    def false_rejects(self) -> int:
        return self.total("false_reject")

    @property
    def false_reject_rate(self) -> float:
        safe = self.total("sim_safe")
        return self.false_rejects / safe if safe else 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(false_accepts=self.false_accepts, false_rejects=self.false_rejects,
                 false_rejects_inexact=self.total("false_reject_inexact"),
                 false_reject_rate=self.false_reject_rate)
        return d


def evaluate_case(index: int, seed: int = 0, runs: int = 16, cls: str | None = None,
                  shrink_s: float = 20.0) -> dict[str, Any]:
    """Validate and simulate corpus case ``index``; a small picklable record."""
    from pytest_amk.validate import validate

    case = make_case(index, seed, cls)
    t0 = time.perf_counter()
    try:
        res = validate(case.program)
        ok, codes, vsum = res.ok, sorted(res.codes()), res.summary()
    except Exception as e:  # a validator crash is a finding of its own
        ok, codes, vsum = False, ["crash"], f"validator raised {type(e).__name__}: {e}"
    t1 = time.perf_counter()
    sim = simulate(case.program, runs=runs, seed=index)
    t2 = time.perf_counter()
    rec: dict[str, Any] = dict(index=index, cls=case.cls, intent=case.intent, base=case.base, ok=ok,
                               codes=codes, safe=sim.safe, complete=sim.complete, exhaustive=sim.exhaustive,
                               kinds=sorted(sim.kinds()), vt=t1 - t0, st=t2 - t1)
    finding = None
    if ok and not sim.safe:
        finding = "false-accept"
    elif not ok and sim.safe:
        finding = "wellformed-reject" if set(codes) <= WELLFORMED else "false-reject"
    if finding:
        small = shrink(case.program, finding) if finding != "wellformed-reject" and shrink_s > 0 else case.program
        rec["finding"] = dict(kind=finding, simulator=sim.summary(), validator=vsum,
                              program=case.program.to_json(), shrunk=small.to_json())
    return rec


def _variants(p: Program) -> list[Program]:
    """One-step reductions: drop a task, a wait, a signal, a NOP's read; lower a threshold;
    turn a task into a NOP that keeps its reads; move a task to a lower SM."""
    out: list[Program] = []

    def edit(fn: object) -> None:
        q = clone(p)
        assert callable(fn)
        fn(q)
        for k, t in enumerate(q.tasks):
            t.id = k
        out.append(q)

    for i, t in enumerate(p.tasks):
        edit(lambda q, i=i: q.tasks.pop(i))
        for k, w in enumerate(t.waits):
            edit(lambda q, i=i, k=k: q.tasks[i].waits.pop(k))
            if w.threshold > 1:
                edit(lambda q, i=i, k=k, w=w: q.tasks[i].waits.__setitem__(k, Wait(w.counter, w.threshold - 1)))
        if t.signal is not None:
            edit(lambda q, i=i: setattr(q.tasks[i], "signal", None))
        if t.op == "NOP":
            for k in range(len(t.reads)):
                edit(lambda q, i=i, k=k: q.tasks[i].reads.pop(k))
        elif t.writes:
            edit(lambda q, i=i, t=t: q.tasks.__setitem__(i, Task(i, "NOP", t.sm, list(t.reads), [], list(t.waits),
                                                                  t.signal, {})))
        if t.sm > 0:
            edit(lambda q, i=i: setattr(q.tasks[i], "sm", q.tasks[i].sm - 1))
    return out


def shrink(program: Program, kind: str, budget_s: float = 20.0) -> Program:
    """Greedily reduce a false accept / false reject to a smaller program of the same kind
    (within ``budget_s`` seconds)."""
    from pytest_amk.validate import validate

    def holds(q: Program) -> bool:
        try:
            res = validate(q)
        except Exception:
            return False
        sim = simulate(q, runs=16)
        if kind == "false-accept":
            return res.ok and not sim.safe
        return not res.ok and sim.safe and sim.complete and not res.codes() & WELLFORMED

    t0 = time.perf_counter()
    changed = True
    while changed and time.perf_counter() - t0 < budget_s:
        changed = False
        for q in _variants(program):
            if time.perf_counter() - t0 > budget_s:
                break
            if holds(q):
                program, changed = q, True
                break
    return program


def _chunk(args: tuple[int, int, int, int]) -> list[dict[str, Any]]:
    lo, hi, seed, runs = args
    return [evaluate_case(i, seed, runs) for i in range(lo, hi)]


def validator_time_1b(repeats: int = 3) -> dict[str, Any]:
    """Lower llama-3.2-1b-shape for h100 (default knobs, bf16, max_seq 512) and time validate()."""
    from pytest_amk.ir import TARGETS
    from pytest_amk.lower import lower
    from pytest_amk.models.config import PRESETS
    from pytest_amk.schedule import default_knobs
    from pytest_amk.validate import validate

    prog = lower(PRESETS["llama-3.2-1b-shape"], TARGETS["h100"], default_knobs(), "bf16", 512)
    times, ok = [], False
    for _ in range(repeats):
        t0 = time.perf_counter()
        ok = validate(prog).ok
        times.append(time.perf_counter() - t0)
    return dict(tasks=len(prog.tasks), counters=len(prog.counters), ok=ok,
                seconds_min=min(times), seconds_median=statistics.median(times))


def audit(n_programs: int, seed: int = 0, workers: int = 1, runs: int = 16,
          time_1b: bool = True) -> AuditReport:
    """Generate ``n_programs`` corpus programs, validate and simulate each, and count."""
    t0 = time.perf_counter()
    step = max(1, min(200, n_programs // max(1, 4 * workers)))
    chunks = [(lo, min(n_programs, lo + step), seed, runs) for lo in range(0, n_programs, step)]
    if workers > 1:
        with multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork").Pool(workers) as pool:
            parts = pool.map(_chunk, chunks)
    else:
        parts = [_chunk(c) for c in chunks]
    report = AuditReport(n_programs, seed, 0.0, workers, {})
    confusion: Counter[str] = Counter()
    kept: Counter[str] = Counter()
    for rec in (r for part in parts for r in part):
        s = report.classes.setdefault(rec["cls"], ClassStats(rec["cls"], rec["intent"]))
        s.n += 1
        s.exhaustive += rec["exhaustive"]
        report.sim_seconds += rec["st"]
        report.val_seconds += rec["vt"]
        if rec["safe"]:
            if rec["complete"]:
                s.sim_safe += 1
            else:
                s.sim_safe_inexact += 1
        else:
            s.sim_unsafe += 1
        if rec["ok"]:
            s.val_ok += 1
        else:
            s.val_reject += 1
            if not rec["safe"] and not kinds_agree(set(rec["kinds"]), set(rec["codes"])):
                s.kind_mismatch += 1
        f = rec.get("finding")
        if f:
            if f["kind"] == "false-accept":
                s.false_accept += 1
            elif f["kind"] == "wellformed-reject":
                s.wellformed_reject += 1
            elif rec["complete"]:
                s.false_reject += 1
            else:
                s.false_reject_inexact += 1
            if kept[f["kind"]] < KEEP_FINDINGS:
                kept[f["kind"]] += 1
                report.findings.append(Finding(f["kind"], rec["index"], rec["cls"], rec["base"], f["simulator"],
                                               f["validator"], f["program"], f["shrunk"]))
        sim_k = ",".join(rec["kinds"]) or "safe"
        val_k = ",".join(rec["codes"]) or "ok"
        confusion[f"{sim_k} | {val_k}"] += 1
    report.confusion = dict(confusion.most_common())
    if time_1b:
        report.validator_1b = validator_time_1b()
    report.seconds = time.perf_counter() - t0
    return report


def format_report(report: AuditReport) -> str:
    cols = ("class", "intent", "n", "unsafe", "safe", "exh", "v.ok", "v.rej", "F.acc", "F.rej", "F.rej~", "wf",
            "kind≠", "FR rate")
    rows = []
    order = sorted(report.classes.values(), key=lambda s: (s.intent != "unsafe", s.cls))
    for s in order:
        rows.append((s.cls, s.intent, s.n, s.sim_unsafe, s.sim_safe, s.exhaustive, s.val_ok, s.val_reject,
                     s.false_accept, s.false_reject, s.false_reject_inexact, s.wellformed_reject,
                     s.kind_mismatch, f"{100 * s.false_reject_rate:.1f}%"))
    t = report.total
    rows.append(("TOTAL", "", t("n"), t("sim_unsafe"), t("sim_safe"), t("exhaustive"), t("val_ok"), t("val_reject"),
                 t("false_accept"), t("false_reject"), t("false_reject_inexact"), t("wellformed_reject"),
                 t("kind_mismatch"), f"{100 * report.false_reject_rate:.1f}%"))
    widths = [max(len(str(r[i])) for r in [cols, *rows]) for i in range(len(cols))]

    def line(r: tuple[Any, ...]) -> str:
        return "  ".join(str(v).ljust(w) if i < 2 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths,
                                                                                                           strict=True)))
    out = [f"validator audit: {report.n_programs} programs, seed {report.seed}, {report.seconds:.1f} s "
           f"({report.workers} worker(s); validate {report.val_seconds:.1f} s, simulate {report.sim_seconds:.1f} s)",
           "", line(cols), line(tuple("-" * w for w in widths))]
    out += [line(r) for r in rows[:-1]] + [line(tuple("-" * w for w in widths)), line(rows[-1])]
    out += ["",
            "unsafe/safe: the simulator's verdict (safe = exact: exhaustive or delay analysis); exh: exhaustive; "
            "F.acc: false accepts; F.rej: false rejects (exact); F.rej~: false rejects against random runs only; "
            "wf: rejected for well-formedness alone while safe; kind≠: both reject but name different "
            "problems (deadlock vs race/uninit/unwritten); FR rate = F.rej / safe.",
            "",
            f"false accepts: {report.false_accepts}   false rejects: {report.false_rejects} of "
            f"{report.total('sim_safe')} safe programs ({100 * report.false_reject_rate:.2f}%)"]
    if report.validator_1b:
        v = report.validator_1b
        out.append(f"validator on llama-3.2-1b-shape (h100, bf16, max_seq 512): {v['tasks']} tasks, "
                   f"ok={v['ok']}, {v['seconds_min']:.3f} s (min of 3), {v['seconds_median']:.3f} s median")
    out += ["", "simulator finding | validator codes: count"]
    out += [f"  {k}: {n}" for k, n in list(report.confusion.items())[:20]]
    for f in report.findings[:10]:
        out += ["", f"{f.kind.upper()} #{f.index} ({f.cls} on {f.base})", f"  simulator: {f.simulator[:400]}",
                f"  validator: {f.validator[:400]}",
                f"  reduced to {len(f.shrunk['tasks'])} of {len(f.program['tasks'])} tasks: "
                + json.dumps(f.shrunk["tasks"])[:1500]]
    return "\n".join(out)


def exit_code(report: AuditReport) -> int:
    """0 when the audit meets its targets (no false accept, false-reject rate below 5%), else 1."""
    return 1 if report.false_accepts or report.false_reject_rate >= MAX_FALSE_REJECT_RATE else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pytest_amk.audit.run",
                                 description="Measure the validator's soundness and precision on a mutation corpus.")
    ap.add_argument("--programs", type=int, default=1000, help="corpus size (default 1000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    ap.add_argument("--runs", type=int, default=16, help="random interleavings per large program (default 16)")
    ap.add_argument("--json", metavar="PATH", help="write the full report (with finding programs) as JSON")
    ap.add_argument("--no-1b", action="store_true", help="skip timing the validator on llama-3.2-1b-shape")
    args = ap.parse_args(argv)
    report = audit(args.programs, args.seed, args.workers, args.runs, time_1b=not args.no_1b)
    print(format_report(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report.to_json(), fh, indent=1)
    return exit_code(report)


if __name__ == "__main__":
    raise SystemExit(main())
