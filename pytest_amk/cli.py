"""The ``amk`` command: doctor, propose, eval, validate, lower, loop, search-merge, validator-audit, generate, bench.

Exit codes: 0 success (eval: PASS or expected REJECTED; validate: proven safe),
1 a negative result (eval: FAIL or REJECTED; validate: unsafe; lower: REJECTED; loop: no valid schedule;
validator-audit: a false accept, or false rejects of 5% or more; generate --verify: the sequences differ),
2 bad input (missing file, malformed TOML or JSON, unknown GPU or schedule), with
one line on stderr naming the file and key, never a traceback. Set AMK_DEBUG=1 to
see the traceback of an unexpected error.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pytest_amk.schedule import Schedule, ScheduleFile

DEVICES = ("auto", "cpu", "cuda")


class InputError(Exception):
    """Bad input: exit 2 with this message on stderr."""


def _steps(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _load(path: str, schedule: str | None = None, gpu: str | None = None) -> tuple[ScheduleFile, Schedule]:
    from pytest_amk.schedule import ScheduleError, parse_file

    try:
        sf = parse_file(path, gpu)
    except ScheduleError as e:
        if e.key == "--amk-gpu":  # the schema names the pytest option; here it is --gpu
            raise InputError(f"{e.path}: --gpu: {e.reason}") from None
        raise InputError(str(e)) from None
    for sched in sf.schedules:
        if schedule is None or sched.name == schedule:
            return sf, sched
    have = ", ".join(s.name for s in sf.schedules)
    raise InputError(f"{path}: --schedule: no schedule named {schedule!r}; have: {have}")


def _dump(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


# -- doctor ---------------------------------------------------------------------------

def cmd_doctor(args: argparse.Namespace) -> int:
    from pytest_amk import __version__
    from pytest_amk.ir import TARGETS

    checks: dict[str, Any] = {"python": platform.python_version(), "pytest_amk": __version__}
    problems: list[str] = []
    try:
        import torch

        checks["torch"] = torch.__version__
        checks["torch_cuda"] = torch.version.cuda
        checks["cuda_available"] = bool(torch.cuda.is_available())
        checks["cuda_devices"] = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                                  if checks["cuda_available"] else [])
    except ImportError as e:
        checks["torch"] = None
        problems.append(f"torch is not importable: {e}")
    checks["pycuda"] = _version_of("pycuda")
    nvcc = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.access(p, os.X_OK)), None)
    checks["nvcc"] = nvcc
    try:
        from pytest_amk.pipeline import gpu_status

        run, why = gpu_status("auto")
        checks["gpu_stage"] = "runs" if run else why
    except Exception as e:  # the GPU side must not break doctor
        checks["gpu_stage"] = f"unknown ({type(e).__name__}: {e})"
    checks["targets"] = {name: {"arch": t.arch, "sms": t.sm_count, "hbm_gbps": t.hbm_gbps}
                         for name, t in TARGETS.items()}
    plugins = [ep.value for ep in importlib.metadata.entry_points(group="pytest11") if ep.name == "amk"]
    checks["pytest_plugin"] = plugins[0] if plugins else None
    if not plugins:
        problems.append("the pytest11 entry point 'amk' is not registered: run `pip install -e .`")
    checks["problems"] = problems
    if args.json:
        _dump(checks)
    else:
        for key, value in checks.items():
            if key == "targets":
                value = ", ".join(f"{n} ({t['arch']}, {t['sms']} SMs, {t['hbm_gbps']:.0f} GB/s)"
                                  for n, t in value.items())
            elif key == "problems":
                continue
            print(f"{key:>15}: {'-' if value is None else value}")
        for p in problems:
            print(f"PROBLEM: {p}")
    return 1 if problems else 0


def _version_of(dist: str) -> str | None:
    if importlib.util.find_spec(dist) is None:
        return None
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "importable"


# -- propose ---------------------------------------------------------------------------

def cmd_propose(args: argparse.Namespace) -> int:
    from pytest_amk.schedule import search_space

    sf, sched = _load(args.file, args.schedule, args.gpu)
    _dump({
        "file": args.file,
        "model": {"id": sf.model.id, "dtype": sf.model.dtype, "seed": sf.model.seed, "max_seq": sf.model.max_seq},
        "gpu": sf.gpu,
        "schedules": [s.name for s in sf.schedules],
        "schedule": sched.name,
        "knobs": sched.knobs,
        "changed_knobs": sched.changed_knobs(),
        "expect": {"outcome": sched.expect.outcome, "reason": sched.expect.reason},
        "search_space": search_space(),
    })
    return 0


def _require_cuda(device: str) -> None:
    """--device cuda without a usable GPU is bad input (one line, exit 2), not a FAIL."""
    if device != "cuda":
        return
    from pytest_amk import pipeline

    try:
        pipeline.gpu_status("cuda")
    except RuntimeError as e:
        raise InputError(str(e)) from None


# -- eval --------------------------------------------------------------------------------

def cmd_eval(args: argparse.Namespace) -> int:
    from pytest_amk import pipeline
    from pytest_amk.outcomes import stage_table

    sf, sched = _load(args.file, args.schedule, args.gpu)
    _require_cuda(args.device)
    result = pipeline.run_schedule(sf, sched, args.device, args.steps)
    ok = result.outcome in (pipeline.PASS, pipeline.XREJECTED)
    if args.json:
        _dump(result.verdict.to_json())
    else:
        word = {pipeline.PASS: "PASS", pipeline.FAIL: "FAIL", pipeline.REJECTED: "REJECTED",
                pipeline.XREJECTED: "PASS (expected REJECTED)"}[result.outcome]
        print(f"{word} {result.verdict.schedule_id}" + (f": {result.message}" if result.message else ""))
        print()
        print(stage_table(result.stages, result.verdict.rejected_reason or ""))
        print()
        for key, value in result.verdict.to_json().items():
            print(f"{key:>16}: {value}")
    return 0 if ok else 1


# -- validate ------------------------------------------------------------------------------

def cmd_validate(args: argparse.Namespace) -> int:
    from pytest_amk.ir import TARGETS, Program
    from pytest_amk.validate import validate

    path = args.program
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, ValueError) as e:  # ValueError: undecodable bytes, or a NUL in the path
        raise InputError(f"{path}: cannot read: {e}") from None
    from pytest_amk.wellformed import _json_problems

    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: nested too deeply
        raise InputError(f"{path}: malformed program JSON: not JSON: {e}") from None
    problems = _json_problems(data) if isinstance(data, dict) else []  # strict: no int() of a float or str
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InputError(f"{path}: malformed program JSON: {problems[0]}{more}")
    try:
        program = Program.from_json(data)
    except ValueError as e:
        raise InputError(f"{path}: malformed program JSON: {e}") from None
    target = None
    if args.gpu is not None:
        if args.gpu not in TARGETS:
            raise InputError(f"{path}: --gpu: unknown GPU {args.gpu!r}; known: {', '.join(sorted(TARGETS))}")
        target = TARGETS[args.gpu]
    result = validate(program, target)
    if args.json:
        _dump({"ok": result.ok, "errors": [{"code": e.code, "message": e.message} for e in result.errors],
               "stats": result.stats})
    elif result.ok:
        print(f"{path}: proven safe: {result.stats.get('tasks', 0)} tasks, "
              f"{result.stats.get('counters', 0)} counters (target {result.stats.get('target')})")
    else:
        print(f"{path}: UNSAFE: {len(result.errors)} error{'s' if len(result.errors) != 1 else ''}")
        for e in result.errors:
            print(f"  {e.code}: {e.message}")
    return 0 if result.ok else 1


# -- lower ------------------------------------------------------------------------------------

def cmd_lower(args: argparse.Namespace) -> int:
    from pytest_amk.pipeline import Rejected, lower_schedule

    sf, sched = _load(args.file, args.schedule, args.gpu)
    try:
        program = lower_schedule(sf, sched)
    except Rejected as e:
        print(f"amk lower: REJECTED {args.file}::{sched.name}: {e}", file=sys.stderr)
        return 1
    text = program.dumps() + "\n"
    if args.output == "-":
        sys.stdout.write(text)
    else:
        try:
            Path(args.output).write_text(text, encoding="utf-8")
        except OSError as e:
            raise InputError(f"{args.output}: -o: cannot write: {e}") from None
        print(f"wrote {args.output}: {len(program.tasks)} tasks, {len(program.buffers)} buffers, "
              f"{len(program.counters)} counters for {sf.gpu}", file=sys.stderr)
    return 0


# -- validator-audit -------------------------------------------------------------------------------

def cmd_validator_audit(args: argparse.Namespace) -> int:
    from pytest_amk.audit.run import audit, exit_code, format_report

    fh = None
    if args.json:
        try:
            fh = open(args.json, "w", encoding="utf-8")  # opened first: fail before the long run
        except OSError as e:
            raise InputError(f"{args.json}: --json: cannot write: {e}") from None
    try:
        report = audit(args.programs, args.seed, args.workers, args.runs, time_1b=not args.no_1b)
        print(format_report(report))
        if fh is not None:
            json.dump(report.to_json(), fh, indent=1)
    finally:
        if fh is not None:
            fh.close()
    return exit_code(report)


# -- generate ----------------------------------------------------------------------------------

def cmd_generate(args: argparse.Namespace) -> int:
    from pytest_amk import generate, pipeline

    sf, sched = _load(args.file, args.schedule, args.gpu)
    _require_cuda(args.device)
    try:
        report = generate.generate_report(sf, sched, args.prompt_ids, args.max_tokens, args.device, args.verify,
                                          args.tokens_per_launch)
    except generate.GenerationError as e:
        raise InputError(f"{args.file}: {e}") from None
    except pipeline.Rejected as e:
        print(f"amk generate: REJECTED {args.file}::{sched.name}: {e}", file=sys.stderr)
        return 1
    if args.json:
        _dump(report)
    else:
        print(generate.format_report(report))
    return 0 if report["ok"] else 1


# -- loop --------------------------------------------------------------------------------------

def cmd_loop(args: argparse.Namespace) -> int:
    from pytest_amk.search import run_loop
    from pytest_amk.search_session import DEFAULT_DIR, summary_table, write_artifacts

    sf, sched = _load(args.file, args.schedule, args.gpu)
    if args.schedule is None:  # the first schedule expected to pass, as for pytest's search items
        sched = next((s for s in sf.schedules if s.expect.outcome != "rejected"), None)  # type: ignore[assignment]
        if sched is None:
            raise InputError(f"{args.file}: --schedule: every schedule expects REJECTED; name one to start from")
    _require_cuda(args.device)
    directory = Path(args.dir or DEFAULT_DIR).resolve()

    def progress(line: str) -> None:
        print(f"amk loop {line}", file=sys.stderr, flush=True)

    result = run_loop(sf, sched, args.budget, directory, device=args.device, steps=args.steps, write=args.write,
                      seed=args.seed, progress=progress, workers=args.workers)
    summary = result.summary()
    notes = write_artifacts([summary], directory)
    if args.json:
        _dump({**summary, "artifacts": notes})
    else:
        print(f"{'PASS' if result.ok else 'FAIL'} {result.label}: {result.headline()}")
        print()
        print(summary_table([summary]))
        for line in notes:
            print(line)
    return 0 if result.ok else 1


def cmd_search_merge(args: argparse.Namespace) -> int:
    from pytest_amk.search_merge import describe, merge

    try:
        report = merge(args.out_dir, args.in_dirs)
    except FileNotFoundError as e:
        raise InputError(str(e)) from None
    for line in describe(report):
        print(line)
    return 0


# -- bench ---------------------------------------------------------------------------------------

def cmd_bench(args: argparse.Namespace) -> int:
    from pytest_amk import bench
    from pytest_amk.gpu.errors import GpuUnavailable
    from pytest_amk.schedule import ScheduleError

    try:
        return bench.run(args.files, args.gpu, pos=args.pos, compile_=not args.no_compile, chart=args.chart,
                         runs=args.runs, steps=args.steps)
    except ScheduleError as e:
        raise InputError(str(e)) from None
    except ValueError as e:  # a position outside the file's max_seq
        raise InputError(str(e)) from None
    except GpuUnavailable as e:
        print(f"amk bench: error: needs a usable CUDA GPU: {e}", file=sys.stderr)
        return 1


# -- main ----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="amk", description="Lower, prove and check GPU megakernel schedules.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("doctor", help="what this machine can run: python, torch, CUDA, PyCUDA, nvcc, targets")
    d.add_argument("--json", action="store_true", help="print JSON")
    d.set_defaults(func=cmd_doctor)

    def schedule_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("file", help="schedule TOML file")
        sp.add_argument("--schedule", metavar="NAME", help="the [[schedule]] by name (default: the first)")
        sp.add_argument("--gpu", metavar="NAME", help="GPU target, overriding [target].gpu")

    pr = sub.add_parser("propose", help="a schedule's knobs and the full search space, as JSON")
    schedule_args(pr)
    pr.set_defaults(func=cmd_propose)

    e = sub.add_parser("eval", help="run every stage of one schedule; print its verdict")
    schedule_args(e)
    e.add_argument("--device", choices=DEVICES, default="auto", help="auto (default), cpu or cuda")
    e.add_argument("--steps", type=_steps, default=None, metavar="N", help="decode steps checked against eager")
    e.add_argument("--json", action="store_true", help="print only the verdict as JSON (DESIGN §4)")
    e.set_defaults(func=cmd_eval)

    v = sub.add_parser("validate", help="prove a program JSON file deadlock and race free")
    v.add_argument("program", help="program JSON (from `amk lower`)")
    v.add_argument("--gpu", metavar="NAME", help="target (default: the program's meta.target)")
    v.add_argument("--json", action="store_true", help="print the result as JSON")
    v.set_defaults(func=cmd_validate)

    lo = sub.add_parser("lower", help="lower one schedule to program JSON")
    schedule_args(lo)
    lo.add_argument("-o", "--output", default="-", metavar="PATH", help="output file (default: stdout)")
    lo.set_defaults(func=cmd_lower)

    lp = sub.add_parser("loop", help="keep/revert schedule search of one file (what pytest --amk-search runs)")
    schedule_args(lp)
    lp.add_argument("--budget", type=_steps, default=16, metavar="N",
                    help="trials, counting those already in the log for this loop (default 16)")
    lp.add_argument("--write", action="store_true", help="write the best schedule back to the file")
    lp.add_argument("--json", action="store_true", help="print the loop's summary as JSON")
    lp.add_argument("--device", choices=DEVICES, default="auto", help="auto (default), cpu or cuda")
    lp.add_argument("--steps", type=_steps, default=None, metavar="N", help="decode steps checked against eager")
    lp.add_argument("--dir", metavar="DIR", help="log directory (default .amk/search)")
    lp.add_argument("--seed", type=int, default=0, metavar="S", help="proposal seed (default 0)")
    lp.add_argument("--workers", type=_steps, default=1, metavar="N",
                    help="evaluator processes: one per visible GPU, capped at the GPU count (CPU processes "
                         "without GPUs); default 1 (in-process)")
    lp.set_defaults(func=cmd_loop)

    sm = sub.add_parser("search-merge", help="gather the search directories of several shards into one "
                                             "(each experiment's trial once, in order)")
    sm.add_argument("out_dir", metavar="OUT_DIR", help="search directory to merge into (made if missing)")
    sm.add_argument("in_dirs", nargs="+", metavar="IN_DIR", help="search directories to read, first wins")
    sm.set_defaults(func=cmd_search_merge)

    va = sub.add_parser("validator-audit", help="measure the validator's false accepts and false rejects")
    va.add_argument("--programs", type=_steps, default=1000, metavar="N", help="corpus size (default 1000)")
    va.add_argument("--seed", type=int, default=0, metavar="S", help="corpus seed (default 0)")
    va.add_argument("--workers", type=_steps, default=1, metavar="W", help="processes (default 1)")
    va.add_argument("--runs", type=_steps, default=16, metavar="R",
                    help="random interleavings per program too large to explore exactly (default 16)")
    va.add_argument("--json", metavar="FILE", help="also write the full report (findings included) as JSON")
    va.add_argument("--no-1b", action="store_true", help="skip timing the validator on llama-3.2-1b-shape")
    va.set_defaults(func=cmd_validator_audit)

    g = sub.add_parser("generate", help="greedy decode with one schedule's program (lowered once)")
    schedule_args(g)
    g.add_argument("--prompt-ids", required=True, metavar="IDS", help="prompt token ids, e.g. 1,2,3")
    g.add_argument("--max-tokens", required=True, metavar="N", help="new tokens to generate")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: the reference VM (default); cuda: the megakernel")
    g.add_argument("--verify", action="store_true",
                   help="also eager's tokens (and HF generate's for hf: models); exit 1 if they differ")
    g.add_argument("--tokens-per-launch", default="1", metavar="K",
                   help="with --device cuda: decode the new tokens K per kernel launch (the on-device argmax feeds "
                        "the next step; the program is proven safe for it first); default 1, one launch per token")
    g.add_argument("--json", action="store_true", help="print the result as JSON")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="time each schedule's megakernel and the torch baselines on this GPU: "
                                     "one table against the roofline floor, and a chart")
    b.add_argument("files", nargs="+", metavar="FILE", help="schedule TOML files")
    b.add_argument("--gpu", metavar="NAME", help="GPU target, overriding [target].gpu")
    b.add_argument("--pos", type=int, default=15, metavar="P",
                   help="decode position timed (context P+1; default 15); the best schedule is also timed "
                        "at the longest context of the file")
    b.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    b.add_argument("--chart", metavar="PNG", help="roofline chart path (default .amk/bench/<file>.png; "
                                                  "with several files, suffixed with each file's name)")
    b.add_argument("--runs", type=_steps, default=50, metavar="N", help="timed runs of each (default 50)")
    b.add_argument("--steps", type=_steps, default=2, metavar="N",
                   help="decode steps checked against the reference VM first (default 2)")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "steps", 0) is None:
        from pytest_amk.pipeline import DEFAULT_STEPS

        args.steps = DEFAULT_STEPS
    try:
        return int(args.func(args))
    except InputError as e:
        print(f"amk {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if os.environ.get("AMK_DEBUG"):
            raise
        print(f"amk {args.command}: internal error: {type(e).__name__}: {e} (AMK_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
