"""Device-side check of K tokens in one launch: greedy tokens of llama-3.2-1b-shape (schedule
"wide-blocks", random weights; bf16 and fp32) three ways, all on the GPU: eager PyTorch, the megakernel one
launch per token, and the megakernel K tokens per launch (K = 128 and 16). Also toy-4L in fp32,
where every way must give the same tokens. Prints, per case, how many tokens each pair agrees on
(at a divergence, the top-2 logit gaps, since random-weight bf16 models have near-ties) and the
per-token latency of each way: kernel time (CUDA events around each launch, positions as decoded,
L2 not flushed; plus the usual L2-flushed single step) and wall clock with the host's work. A short
table comes last; the full result goes to $OUT/ktoken_check.json when OUT is set. A failing stage
is reported and the rest still runs.

    bash .device/run.sh python3 tools/ktoken_check.py [--tokens 128] [--k 128,16] [--prompt-ids 1]

(run.sh puts the project on PYTHONPATH; elsewhere install it or set PYTHONPATH=. first.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def log(msg: str = "") -> None:
    print(msg, flush=True)


class Case:
    """One model/schedule: its stages run one by one; a failure is recorded, not raised."""

    def __init__(self, label: str, dtype: str, strict: bool) -> None:
        self.label, self.dtype, self.strict = label, dtype, strict
        self.row: dict[str, Any] = {"case": label, "dtype": dtype, "strict": strict, "errors": [], "seconds": {},
                                    "tokens": {}, "kernel_us_per_token": {}, "wall_us_per_token": {}, "pairs": []}

    def stage(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return fn()
        except Exception as e:  # keep going: report what the other stages give
            self.row["errors"].append(f"{name}: {type(e).__name__}: {e}")
            log(f"{self.label}: {name} FAILED: {type(e).__name__}: {e}")
            traceback.print_exc()
            return None
        finally:
            self.row["seconds"][name] = round(time.perf_counter() - t0, 2)


def _top2_gap(logits: Any) -> float:
    top = logits.float().reshape(-1).topk(2).values
    return float(top[0] - top[1])


def compare(a_name: str, a: list[int], b_name: str, b: list[int], logits: dict[str, list[Any]], dtype: str,
            offset: int) -> dict[str, Any]:
    """Equal prefix and positions of two sequences; at the first difference, the logit gaps of each
    side that kept logits (top-2 gap, and its own token's logit minus the other's)."""
    from pytest_amk.generate import near_tie

    n = min(len(a), len(b))
    first = next((i for i in range(n) if a[i] != b[i]), None)
    out: dict[str, Any] = {"a": a_name, "b": b_name, "compared": n, "equal_prefix": n if first is None else first,
                           "positions_equal": sum(a[i] == b[i] for i in range(n)), "divergence": None}
    if first is not None:
        d: dict[str, Any] = {"index": first, "pos": offset + first, a_name: a[first], b_name: b[first]}
        for name, own, other in ((a_name, a[first], b[first]), (b_name, b[first], a[first])):
            if name in logits and first < len(logits[name]):
                lg = logits[name][first]
                tie, gap, tol = near_tie(lg, own, other, dtype)
                d[f"{name}_top2_gap"] = _top2_gap(lg)
                d[f"{name}_gap_own_vs_other"] = gap
                d[f"{name}_near_tie"] = tie
                d["tolerance"] = tol
        out["divergence"] = d
    return out


def run_case(c: Case, path: Path, schedule: str, n: int, prompt: list[int], ks: list[int], iters: int) -> None:
    import torch

    from pytest_amk import generate as g
    from pytest_amk import gpu
    from pytest_amk.models import load_model
    from pytest_amk.models.llama import Llama
    from pytest_amk.schedule import ModelSpec, ScheduleFile, parse_file

    row = c.row
    sf = parse_file(path)
    m = sf.model
    if m.dtype != c.dtype:  # the same schedule file in another dtype
        sf = ScheduleFile(sf.path, ModelSpec(m.id, c.dtype, m.seed, m.max_seq), sf.gpu, sf.schedules)
        m = sf.model
    sched = next(s for s in sf.schedules if s.name == schedule)
    program = c.stage("lower_prove", lambda: g.lower_and_prove(sf, sched))
    if program is None:
        return
    row["program"] = {"tasks": len(program.tasks), "counters": len(program.counters), "max_seq": m.max_seq}

    def build_model() -> Any:
        cpu_model = load_model(m.id, m.dtype, m.seed, m.max_seq)
        return Llama(cpu_model.cfg, cpu_model.w, m.max_seq, device=f"cuda:{gpu.device_info().index}")

    model = c.stage("weights", build_model)
    if model is None:
        return
    decoder = c.stage("runner", lambda: g.GpuDecoder(program, model))  # weights shared with eager
    runner = decoder.runner if decoder is not None else None
    if runner is not None:
        row["resources"] = runner.resources()
        plan = c.stage("k_proof", runner.step_plan)  # once; seconds for the 1B shape
        row["k_proof_ok"] = plan is not None
    log(f"{c.label}: {row['program']['tasks']} tasks; seconds so far {row['seconds']}")

    first = len(prompt) - 1
    logits: dict[str, list[Any]] = {}
    seqs: dict[str, list[int]] = {}
    eager = c.stage("eager", lambda: g.eager_generate(model, prompt, n, keep_logits=True))
    if eager is not None:
        seqs["eager"], logits["eager"] = eager.tokens, eager.logits or []
        row["wall_us_per_token"]["eager"] = {"median": eager.median_us, "mean": statistics.fmean(eager.token_us)}
    if runner is not None:
        per = c.stage("per_token", lambda: g.decode(decoder, prompt, n, keep_logits=True))
        if per is not None:
            seqs["per_token"], logits["per_token"] = per.tokens, per.logits or []
        for k in ks:
            gen = c.stage(f"k{k}", lambda k=k: g.decode(decoder, prompt, n, tokens_per_launch=k))
            if gen is not None:
                seqs[f"k{k}"] = gen.tokens
    row["tokens"] = seqs
    names = list(seqs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            row["pairs"].append(compare(a, seqs[a], b, seqs[b], logits, c.dtype, first))
    for p in row["pairs"]:
        d = p["divergence"]
        log(f"{c.label}: {p['a']} vs {p['b']}: equal prefix {p['equal_prefix']}/{p['compared']}, "
            f"positions equal {p['positions_equal']}" + ("" if d is None else f"; first divergence {d}"))
    del logits

    if runner is None:
        return
    # Latency. Kernel: CUDA events around each launch at the positions decoded (L2 as decoding leaves it).
    ref = seqs.get("per_token") or next(iter(seqs.values()), None)
    if ref is None or len(ref) < n:
        return
    feeds = [prompt[-1]] + ref[:-1]  # the token fed at position first + i

    def per_token_kernel() -> dict[str, Any]:
        us = [runner.time_step(feeds[i], first + i, warmup=1, iters=iters, flush_l2=False).median_us
              for i in range(n)]
        mid = runner.time_step(feeds[n // 2], first + n // 2, iters=20)  # the pipeline's number: L2 flushed
        return {"mean": statistics.fmean(us), "median": statistics.median(us), "min": min(us), "max": max(us),
                "l2_flushed_step_at_mid_pos": mid.median_us}

    row["kernel_us_per_token"]["per_token"] = c.stage("time_per_token_kernel", per_token_kernel)

    def k_kernel(k: int) -> dict[str, Any]:
        launches = []
        for start in range(0, n, k):
            m_ = min(k, n - start)
            t = runner.time_tokens(feeds[start], first + start, m_, warmup=1, iters=iters, flush_l2=False)
            launches.append(t.extra["launch_us"])
        cold = runner.time_tokens(feeds[0], first, min(k, n), warmup=1, iters=iters)  # L2 flushed before it
        return {"mean": sum(launches) / n, "launches": len(launches), "launch_us": launches,
                "l2_flushed_first_launch_per_token": cold.median_us}

    for k in ks:
        row["kernel_us_per_token"][f"k{k}"] = c.stage(f"time_k{k}_kernel", lambda k=k: k_kernel(k))

    # Wall clock with the host's work: whole decodes, repeated; mean per new token.
    def wall(k: int) -> dict[str, Any]:
        runs = []
        for _ in range(3):
            gen = g.decode(decoder, prompt, n, tokens_per_launch=k)
            runs.append(statistics.fmean(gen.token_us))
        return {"mean": statistics.median(runs), "runs": runs}

    row["wall_us_per_token"]["per_token"] = c.stage("time_per_token_wall", lambda: wall(1))
    for k in ks:
        row["wall_us_per_token"][f"k{k}"] = c.stage(f"time_k{k}_wall", lambda k=k: wall(k))
    log(f"{c.label}: kernel us/token {json.dumps(_short(row['kernel_us_per_token']))}; "
        f"wall us/token {json.dumps(_short(row['wall_us_per_token']))}")
    torch.cuda.empty_cache()


def _short(d: dict[str, Any]) -> dict[str, Any]:
    return {k: None if v is None else round(v.get("mean") or 0.0, 1) for k, v in d.items()}


def verdict(row: dict[str, Any], ks: list[int]) -> tuple[bool, str]:
    """K launches must equal the per-token path exactly; in fp32 (strict) also eager; in bf16 a
    per-token vs eager divergence must be a near-tie by eager's logits."""
    seqs, why = row["tokens"], []
    ways = ["per_token"] + [f"k{k}" for k in ks]
    missing = [w for w in ["eager", *ways] if w not in seqs]
    if missing:
        why.append("not run: " + ", ".join(missing))
    for p in row["pairs"]:
        if p["divergence"] is None:
            continue
        d, pair = p["divergence"], {p["a"], p["b"]}
        if "eager" not in pair:
            why.append(f"{p['a']} != {p['b']} at token {d['index']}")
        elif row["strict"]:
            why.append(f"{p['a']} != {p['b']} at token {d['index']} (fp32 must be exact)")
        elif not d.get("eager_near_tie", False):
            why.append(f"{p['a']} != {p['b']} at token {d['index']}: not a near-tie")
    if row["errors"]:
        why.append(f"{len(row['errors'])} stage(s) failed")
    return not why, "; ".join(why)


def table(rows: list[dict[str, Any]], ks: list[int]) -> None:
    ways = ["eager", "per_token"] + [f"k{k}" for k in ks]
    log("")
    log(f"{'case':<40} {'way':<10} {'tokens':>6} {'=eager':>7} {'=per_tok':>8} {'kernel us/tok':>13} "
        f"{'wall us/tok':>11}  first divergence vs eager (eager top-2 gap)")
    for r in rows:
        for w in ways:
            seq = r["tokens"].get(w)
            eq: dict[str, str] = {}
            div = ""
            for other in ("eager", "per_token"):
                p = next((p for p in r["pairs"] if {p["a"], p["b"]} == {w, other}), None)
                eq[other] = "-" if p is None else f"{p['equal_prefix']}"
                if other == "eager" and p is not None and p["divergence"] is not None:
                    d = p["divergence"]
                    gap = d.get("eager_top2_gap")
                    div = (f"#{d['index']}: {d.get(w)} vs {d.get('eager')}"
                           + ("" if gap is None else f" (gap {gap:.3g}, tie: {d.get('eager_near_tie')})"))
            kern = (r["kernel_us_per_token"].get(w) or {}).get("mean")
            wall = (r["wall_us_per_token"].get(w) or {}).get("mean")
            log(f"{r['case']:<40} {w:<10} {len(seq) if seq else '-':>6} {eq['eager']:>7} {eq['per_token']:>8} "
                f"{'-' if kern is None else f'{kern:.1f}':>13} {'-' if wall is None else f'{wall:.1f}':>11}  {div}")
        ok, why = r.get("ok", False), r.get("why", "")
        log(f"{r['case']:<40} -> {'OK' if ok else 'FAIL'}{': ' + why if why else ''}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--k", default="128,16", help="tokens per launch to check, comma separated")
    ap.add_argument("--prompt-ids", default="1")
    ap.add_argument("--file", default=str(ROOT / "schedules" / "llama-3.2-1b-shape.toml"))
    ap.add_argument("--schedule", default="wide-blocks")
    ap.add_argument("--iters", type=int, default=3, help="timed launches per position / chunk")
    ap.add_argument("--no-toy", action="store_true", help="skip the exact fp32 toy-4L case")
    ap.add_argument("--no-1b", action="store_true", help="skip the --file case")
    ap.add_argument("--dtypes", default="bf16,fp32",
                    help="dtypes of the --file case; fp32 must equal eager exactly, bf16 up to certified near-ties")
    args = ap.parse_args()
    t_start = time.perf_counter()
    report: dict[str, Any] = {"args": vars(args), "rows": []}
    ks = [int(k) for k in args.k.split(",") if k.strip()]
    rc = 1
    try:
        import torch

        from pytest_amk.generate import parse_prompt_ids
        from pytest_amk.gpu.testing import exact_device

        dev, why = exact_device()
        if dev is None:
            log(f"GPU not available: {why}")
            return 2
        report["device"] = dev.__dict__
        report["torch"] = torch.__version__
        log(f"device: {dev.name} ({dev.arch}, {dev.sm_count} SMs), torch {torch.__version__}; {args.tokens} tokens, "
            f"K in {ks}")
        prompt = parse_prompt_ids(args.prompt_ids)
        cases = []
        if not args.no_toy:
            cases.append((Case("toy-4L/fp32::default", "fp32", True), ROOT / "schedules" / "toy-4L.toml", "default"))
        for dt in [] if args.no_1b else [d.strip() for d in args.dtypes.split(",") if d.strip()]:
            cases.append((Case(f"{Path(args.file).stem}/{dt}::{args.schedule}", dt, dt == "fp32"), Path(args.file),
                          args.schedule))
        for case, path, schedule in cases:
            report["rows"].append(case.row)
            try:
                run_case(case, path, schedule, args.tokens, prompt, ks, args.iters)
            except Exception as e:
                case.row["errors"].append(f"{type(e).__name__}: {e}")
                traceback.print_exc()
            case.row["ok"], case.row["why"] = verdict(case.row, ks)
        rc = 0 if report["rows"] and all(r["ok"] for r in report["rows"]) else 1
    except BaseException as e:  # print what there is, whatever happened
        report["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    finally:
        try:
            table(report["rows"], ks)
        except Exception:
            traceback.print_exc()
        log(f"total {time.perf_counter() - t_start:.0f} s; {'OK' if rc == 0 else 'FAILED'}")
        out = os.environ.get("OUT")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            Path(out, "ktoken_check.json").write_text(json.dumps(report, indent=1, default=str))
    return rc


if __name__ == "__main__":
    sys.exit(main())
