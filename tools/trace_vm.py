"""Where a decode step's time goes: per-stage timing from a traced VM build.

Builds the VM with AMK_TRACE (vm/amk_trace.cuh), runs one L2-flushed step of a
schedule, and prints per stage kind (qkv, attn_partial, act, ...), averaged over
layers: the stage's span (first task ready -> last task done), the mean and
slowest task run time, the gap from the previous stage's last task to this
stage's first ready task (the sync cost), the weight bandwidth over the span,
the spread of its tasks' ready times and its tail (median task's end -> last end).

    bash .device/run.sh python3 tools/trace_vm.py --model llama-3.2-1b-shape \
        --knobs threads_per_block=512,pipelining_depth=8 [--pos 15] [--variants name:k=v;...]

A variant's prefetch_bytes and lookahead_bytes go to the GpuRunner, build_* keys to the build,
the rest to the lowering. ``--build trace_mark=NAME`` (a name of pytest_amk.gpu.abi.TRACE_MARKS,
e.g. attn_prologue) makes each op with that mark end its timed run there: its "run" then times
the op up to that place (the untimed run is unaffected).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from typing import Any


def parse_knobs(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    items, depth, cur = [], 0, ""
    for ch in text + ",":  # split on commas outside brackets: fusion=[["gemv","silu_mul"]]
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            items.append(cur.strip())
            cur = ""
        else:
            cur += ch
    for item in filter(None, items):
        k, v = item.split("=", 1)
        out[k.replace(".", "__")] = json.loads(v) if v[:1] in "[{0123456789-" else v
    return out


def analyse(prog: Any, order: list[Any], tr: Any, bw_gbps: float) -> dict[str, Any]:
    """Per-stage-kind statistics from a trace [instr, point, (ns, cycles)]."""
    import numpy as np

    from pytest_amk.ir import BufferKind
    from pytest_amk.lower import stage_kind

    kinds = {b.id: b.kind for b in prog.buffers}
    nbytes = {b.id: b.dtype.nbytes for b in prog.buffers}
    # ns per cycle per SM from each queue's first and last points (clock64 is per SM).
    sm_of = np.array([t.sm for t in order])
    ns, cyc = tr[:, :, 0].astype(np.float64), tr[:, :, 1].astype(np.float64)
    ratio = {}
    for sm in set(sm_of.tolist()):
        idx = np.nonzero(sm_of == sm)[0]
        dt_ns = ns[idx, 2].max() - ns[idx, 0].min()
        dt_c = cyc[idx, 2].max() - cyc[idx, 0].min()
        ratio[sm] = dt_ns / dt_c if dt_c > 0 else 0.5
    t0 = ns[:, 0].min()
    stages: dict[int, dict[str, Any]] = {}
    for i, t in enumerate(order):
        s = stages.setdefault(t.signal, {"name": prog.counters[t.signal].name, "ready": [], "end": [], "run": [],
                                         "wait": [], "bytes": 0})
        r = ratio[t.sm]
        s["ready"].append(ns[i, 1] - t0)
        s["end"].append(ns[i, 2] - t0)
        s["run"].append((cyc[i, 2] - cyc[i, 1]) * r)
        s["wait"].append((cyc[i, 1] - cyc[i, 0]) * r)
        if t.op != "EMBED":  # the embedding reads one row, not the table its region names
            s["bytes"] += sum((rg.hi - rg.lo) * nbytes[rg.buffer] for rg in t.reads
                              if kinds[rg.buffer] is BufferKind.WEIGHT)
    ordered = sorted(stages.values(), key=lambda s: min(s["ready"]))
    agg: dict[str, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    prev_end = 0.0
    for s in ordered:
        a = agg[stage_kind(s["name"])]
        span = max(s["end"]) - min(s["ready"])
        a["span"].append(span)
        a["gap"].append(min(s["ready"]) - prev_end)
        a["run_mean"].append(float(np.mean(s["run"])))
        a["run_max"].append(float(np.max(s["run"])))
        a["bytes"].append(s["bytes"])
        a["floor"].append(s["bytes"] / bw_gbps)  # ns
        a["tasks"].append(len(s["run"]))
        # How unevenly the stage starts and ends: the spread of its tasks' ready times, and the
        # tail from the median task's end to the last one's (HBM under-used while it drains).
        a["start_spread"].append(max(s["ready"]) - min(s["ready"]))
        a["tail"].append(max(s["end"]) - float(np.median(s["end"])))
        prev_end = max(s["end"])
    total = ns[:, 2].max() - t0
    res = {"total_ns": total, "kinds": {}}
    for k, a in agg.items():
        res["kinds"][k] = {m: float(np.sum(v)) if m in ("span", "gap", "bytes", "floor") else float(np.mean(v))
                           for m, v in a.items()} | {"count": len(a["span"])}
    diffs = np.diff(np.unique(ns[:, 1]))
    res["globaltimer_resolution_ns"] = float(diffs[diffs > 0].min()) if len(diffs) else 0.0
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.2-1b-shape")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--max-seq", type=int, default=512)
    ap.add_argument("--pos", type=int, default=15, help="position of the traced step (context = pos + 1)")
    ap.add_argument("--knobs", default="threads_per_block=512,pipelining_depth=8")
    ap.add_argument("--variants", default="", help="name:k=v,k=v;name2:... (added to --knobs), each traced")
    ap.add_argument("--build", default="", help="BuildConfig overrides for every variant, e.g. prefetch_late=0")
    ap.add_argument("--prefetch", type=int, default=None, help="L2 prefetch bytes per range (default: runner's)")
    args = ap.parse_args()

    import torch

    from pytest_amk import gpu, refvm
    from pytest_amk.gpu import testing as T

    dev = gpu.device_info()
    bw = gpu.measure_bandwidth_gbps()
    print(f"device: {dev.name}; measured bandwidth {bw:.0f} GB/s", flush=True)
    base = parse_knobs(args.knobs)
    variants = [("base", {})]
    for v in filter(None, args.variants.split(";")):
        name, _, kv = v.partition(":")
        variants.append((name, parse_knobs(kv)))
    weights = None
    results = {}
    out = os.environ.get("OUT")  # where the JSON results and per-task rows go
    for name, kn in variants:
        runner_keys = ("prefetch_bytes", "lookahead_bytes")
        lower_kn = {k: v for k, v in (base | kn).items() if not k.startswith("build_") and k not in runner_keys}
        prog = T.lowered(args.model, args.dtype, max_seq=args.max_seq, **lower_kn)
        if weights is None:
            weights = T.random_weights(prog, seed=0, device=f"cuda:{dev.index}")
        bufs = refvm.alloc_buffers(prog, weights, f"cuda:{dev.index}")
        pf = kn.pop("prefetch_bytes", args.prefetch)
        extra: dict[str, Any] = {} if pf is None else {"prefetch_bytes": int(pf)}
        if "lookahead_bytes" in kn:
            extra["lookahead_bytes"] = int(kn.pop("lookahead_bytes"))

        def as_build(k: str, v: Any) -> Any:
            return bool(v) if k == "prefetch_late" else v

        bld = {k: as_build(k, v) for k, v in parse_knobs(args.build).items()}
        bld |= {k[len("build_"):]: as_build(k[len("build_"):], v) for k, v in kn.items() if k.startswith("build_")}
        kn = {k: v for k, v in kn.items() if not k.startswith("build_")}
        if bld:
            extra["build"] = bld
        # trace_mark only exists in traced builds
        plain_extra = extra | ({"build": {k: v for k, v in bld.items() if k != "trace_mark"}} if bld else {})
        plain = gpu.GpuRunner(prog, bufs, validate=False, **plain_extra)
        timing = plain.time_step(1, args.pos, warmup=5, iters=20)
        runner = gpu.GpuRunner(prog, bufs, validate=False, trace=True, **extra)
        traced = runner.time_step(1, args.pos, warmup=3, iters=5)  # the last launch's trace is read below
        tr = runner.read_trace()
        res = analyse(prog, runner.order, tr, bw)
        if out:  # per-task rows for offline analysis: stage, sm, op, ns at the 3 points
            pf = runner._prefetch.cpu().numpy()
            t0 = float(tr[:, :, 0].min())
            rows = [[prog.counters[t.signal].name, t.sm, t.op, *(float(tr[i, k, 0]) - t0 for k in range(3)),
                     int(pf[i, :, 1].sum())] for i, t in enumerate(runner.order)]
            with open(os.path.join(out, f"trace_raw_{name}.json"), "w") as f:
                json.dump(rows, f)
        res |= {"median_us": timing.median_us, "traced_median_us": traced.median_us, "tasks": len(prog.tasks)}
        results[name] = res
        print(f"\n== {name} {base | kn}: {timing.median_us:.1f} us untraced, {traced.median_us:.1f} us traced, "
              f"{len(prog.tasks)} tasks, trace span {res['total_ns'] / 1e3:.1f} us, globaltimer step "
              f"{res['globaltimer_resolution_ns']:.0f} ns", flush=True)
        print(f"{'stage':<16}{'n':>4}{'tasks':>6}{'span us':>9}{'gap us':>8}{'floor us':>9}{'run avg':>8}"
              f"{'run max':>8}{'GB/s':>7}{'start sprd':>11}{'tail':>6}")
        for k, a in sorted(res["kinds"].items(), key=lambda kv: -kv[1]["span"] - kv[1]["gap"]):
            gbs = a["bytes"] / a["span"] if a["span"] > 0 else 0.0
            print(f"{k:<16}{a['count']:>4}{a['tasks']:>6.0f}{a['span'] / 1e3:>9.1f}{a['gap'] / 1e3:>8.1f}"
                  f"{a['floor'] / 1e3:>9.1f}{a['run_mean'] / 1e3:>8.2f}{a['run_max'] / 1e3:>8.2f}{gbs:>7.0f}"
                  f"{a['start_spread'] / 1e3:>11.2f}{a['tail'] / 1e3:>6.2f}")
        tot_span = sum(a["span"] for a in res["kinds"].values()) / 1e3
        tot_gap = sum(a["gap"] for a in res["kinds"].values()) / 1e3
        print(f"{'total':<16}{'':>10}{tot_span:>9.1f}{tot_gap:>8.1f}")
        del plain, runner, bufs
        torch.cuda.empty_cache()
    if out:
        with open(os.path.join(out, "trace_vm.json"), "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
