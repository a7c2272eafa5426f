"""Device-side check of the GPU VM: builds, correctness on the Llama-3.2-1B shape
against the reference VM (run on the GPU), and a latency table of schedule
variants with the measured bandwidth floor. Prints a short table last; full
results go to $OUT/gpu_check.json when OUT is set.

    bash .device/run.sh python3 tools/gpu_check.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any


def log(msg: str) -> None:
    print(msg, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="toy models only")
    ap.add_argument("--models", help="comma-separated model ids (default: toy, toy-4L, llama-3.2-1b-shape)")
    ap.add_argument("--variants", help="comma-separated variant names to time (default: all)")
    ap.add_argument("--no-correctness", action="store_true")
    ap.add_argument("--no-builds", action="store_true")
    ap.add_argument("--tag", default="", help="label for this run's rows (e.g. an A/B VM version)")
    ap.add_argument("--iters", type=int, default=30)
    args = ap.parse_args()

    import torch

    from pytest_amk import gpu, refvm
    from pytest_amk.cost import floor_us
    from pytest_amk.gpu import testing as T

    ok, why = gpu.available()
    if not ok:
        log(f"GPU not available: {why}")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference VM's fp32 GEMVs stay fp32
    dev = gpu.device_info()
    log(f"device: {dev.name} ({dev.arch}, {dev.sm_count} SMs, L2 {dev.l2_bytes >> 20} MiB), "
        f"torch {torch.__version__}")
    report: dict[str, Any] = {"device": dev.__dict__, "builds": [], "correctness": [], "timing": []}

    # Builds: registers and spills as ptxas reports them for this device's arch.
    for dtype in () if args.no_builds else ("fp32", "fp16", "bf16"):
        for threads, pipe in ((256, 2), (256, 4), (512, 4), (1024, 8)):
            t0 = time.perf_counter()
            b = gpu.build_cubin(gpu.BuildConfig(dtype, threads, pipe, dev.arch))
            report["builds"].append({"dtype": dtype, "threads": threads, "pipe": pipe, **b.report.to_json(),
                                     "seconds": round(time.perf_counter() - t0, 2)})
            log(f"build {dev.arch} {dtype} t{threads} p{pipe}: {b.report}")

    bw = gpu.measure_bandwidth_gbps()
    log(f"measured copy bandwidth: {bw:.0f} GB/s")
    dev_str = f"cuda:{dev.index}"
    models = ["toy", "toy-4L"] + ([] if args.quick else ["llama-3.2-1b-shape"])
    if args.models:
        models = args.models.split(",")
    wanted = set(args.variants.split(",")) if args.variants else None
    rows: list[tuple[str, str, float, float, str]] = []
    for model in models:
        base = T.lowered(model, "bf16", max_seq=512)
        weights = T.random_weights(base, seed=0, device=dev_str)

        # Correctness: a few steps against the reference VM (on the GPU for speed).
        t0 = time.perf_counter()
        steps = 0 if args.no_correctness else 2 if model.startswith("llama") else 4
        res = T.compare_with_refvm(base, weights, steps=steps, ref_device=dev_str, validate=False)
        for r in res:
            report["correctness"].append({"model": model, "pos": r.pos, "ok": r.ok, "max_abs_err": r.max_abs_err,
                                          "tol": r.tolerance, "gpu_next": r.gpu_next, "ref_next": r.ref_next,
                                          "worst_buffers": sorted(r.buffer_errs.items(), key=lambda x: -x[1])[:3]})
            log(f"{model} bf16 pos {r.pos}: {'OK' if r.ok else 'FAIL'} {r.message} "
                f"(next {r.gpu_next} vs ref {r.ref_next})")
        log(f"  ({time.perf_counter() - t0:.1f} s)")

        # Timing variants (same weights; every variant lowered afresh).
        variants: list[tuple[str, dict[str, Any], int]] = [
            ("default t256 p2", {}, 64 << 10),
            ("no prefetch", {}, 0),
            ("prefetch 256K", {}, 256 << 10),
            ("p1", {"pipelining_depth": 1}, 64 << 10),
            ("p4", {"pipelining_depth": 4}, 64 << 10),
            ("p8", {"pipelining_depth": 8}, 64 << 10),
            ("t512 p2", {"threads_per_block": 512, "pipelining_depth": 2}, 64 << 10),
            ("t512 p4", {"threads_per_block": 512, "pipelining_depth": 4}, 64 << 10),
            ("t512 p8", {"threads_per_block": 512, "pipelining_depth": 8}, 64 << 10),
            ("t512 p4 no pf", {"threads_per_block": 512, "pipelining_depth": 4}, 0),
            ("t1024 p1", {"threads_per_block": 1024, "pipelining_depth": 1}, 64 << 10),
            ("t128 p4", {"threads_per_block": 128, "pipelining_depth": 4}, 64 << 10),
            ("balanced", {"sm_assignment": "balanced"}, 64 << 10),
            ("unfused", {"fusion": []}, 64 << 10),
            ("NOP skeleton", {}, 0),  # same waits and signals, no work: the sync cost alone
        ]
        for name, kn, pf in variants:
            if wanted is not None and name not in wanted:
                continue
            prog = T.lowered(model, "bf16", max_seq=512, **kn)
            bufs = refvm.alloc_buffers(prog, weights, dev_str)
            if name == "NOP skeleton":
                prog = prog.sync_skeleton()
            try:
                runner = gpu.GpuRunner(prog, bufs, validate=False, prefetch_bytes=pf)
                tm = runner.time_step(1, 0, warmup=5, iters=args.iters)
            except gpu.GpuError as e:
                log(f"{model} {name}: {type(e).__name__}: {e}")
                rows.append((model, args.tag + name, float("nan"), floor_us(prog, bw), type(e).__name__))
                continue
            fl = floor_us(prog, bw)
            res_info = runner.resources()
            report["timing"].append({"model": model, "variant": name, "median_us": tm.median_us, "floor_us": fl,
                                     "samples_us": tm.samples_us, "tasks": len(prog.tasks), **res_info})
            rows.append((model, args.tag + name, tm.median_us, fl, f"{res_info['registers']} regs"))
            log(f"{model} {name}: {tm.median_us:.1f} us (floor {fl:.1f} us, {len(prog.tasks)} tasks)")
            del runner, bufs
        del weights
        torch.cuda.empty_cache()

    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, f"gpu_check{args.tag.strip()}.json"), "w") as f:
            json.dump(report, f, indent=1, default=str)
    bad = [c for c in report["correctness"] if not c["ok"]]
    log("")
    log(f"== {dev.name}, bf16, L2 flushed, median of {args.iters}; floor = weight+KV bytes / {bw:.0f} GB/s ==")
    log(f"{'model':<20}{'variant':<18}{'us':>10}{'floor us':>10}{'% floor':>9}  note")
    for model, name, us, fl, note in rows:
        pct = 100.0 * fl / us if us == us and us > 0 else float("nan")
        log(f"{model:<20}{name:<18}{us:>10.1f}{fl:>10.1f}{pct:>8.1f}%  {note}")
    log(f"correctness: {len(report['correctness']) - len(bad)}/{len(report['correctness'])} steps OK")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
