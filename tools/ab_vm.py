"""A/B timing of GPU runner and VM variants of one program, in one process, on one card.

Every variant runs on the same weights, by default the same lowered program; a variant's
"knobs" (lowering knobs, JSON) lower its own program (e.g. another fusion). Their logits are compared
bitwise first (prefetch sizes and VM copies that only move data must not change a bit), then
each round times every variant at every position (L2 flushed, median of --iters launches),
alternating the order from round to round; the table gives the mean and best round. Noise
between rounds is about +-3 us on the 1B shape, so compare variants of one run only.

    bash .device/run.sh python3 tools/ab_vm.py \\
        --variants '{"base": {}, "no-lookahead": {"lookahead_bytes": 0}, "new-vm": {"vm": "dev_vm_x"}}'

A variant is GpuRunner keyword arguments (prefetch_bytes, lookahead_bytes, build, ...), plus
"vm": a directory of VM sources (a changed copy of vm/) to build that variant from, "knobs":
lowering knobs added to --knobs, and "nop": true to time the program's sync skeleton (every
task a NOP with the same queues, waits and signals; its logits are not compared), "nowait":
true to time the program with every wait dropped (the work alone, each queue running flat
out: the streaming bound of the VM's ops; its logits are garbage and not compared), or
"bypass": a list of stage kinds (qkv, attn_partial, attn_combine, h, act, down, ...) whose
readers no longer wait for them (lower.bypass_stages: each such stage and the next run as one
level; timing only, like "nowait"): what fusing or removing those levels could gain at most.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Any

TOOL_KEYS = ("knobs", "nop", "nowait", "bypass")  # variant keys of this tool's own, not GpuRunner arguments


def make_runners(programs: dict[str, tuple[Any, dict[int, Any]]],
                 variants: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One runner per variant, on ``programs[name]`` = (program, buffers)."""
    from pytest_amk import gpu

    runners = {}
    for name, kw in variants.items():
        kw = {k: v for k, v in kw.items() if k not in TOOL_KEYS}
        prog, bufs = programs[name]
        vm = kw.pop("vm", None)
        old = os.environ.get("AMK_VM_DIR")
        if vm:  # the kernel cache keys on the source directory: each copy gets its own build
            os.environ["AMK_VM_DIR"] = os.path.abspath(vm)
        try:
            runners[name] = gpu.GpuRunner(prog, bufs, validate=False, **kw)
        finally:
            if old is None:
                os.environ.pop("AMK_VM_DIR", None)
            else:
                os.environ["AMK_VM_DIR"] = old
    return runners


def timing_only(kw: dict[str, Any]) -> bool:
    return bool(kw.get("nop") or kw.get("nowait") or kw.get("bypass"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-3.2-1b-shape")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--max-seq", type=int, default=512)
    ap.add_argument("--knobs", default='{"threads_per_block": 512, "pipelining_depth": 4}',
                    help="lowering knobs as JSON (default: the shipped wide-blocks schedule)")
    ap.add_argument("--variants", required=True, help="JSON: {name: GpuRunner kwargs, plus optional vm dir}")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--positions", default="15,511", help="decode positions (context = position + 1)")
    args = ap.parse_args()

    import torch

    from pytest_amk import gpu, lower, refvm
    from pytest_amk.gpu import testing as T

    variants = json.loads(args.variants)
    positions = [int(p) for p in args.positions.split(",")]
    dev = gpu.device_info()
    print(f"device: {dev.name}", flush=True)
    base_knobs = json.loads(args.knobs)
    weights = None
    # One lowering and one set of buffers per distinct "knobs"; a skeleton, wait-free or bypassing
    # variant is derived from it and shares its buffers (it is only timed, after the logits are compared).
    by_knobs: dict[str, tuple[Any, dict[int, Any]]] = {}
    programs = {}
    for name, kw in variants.items():
        key = json.dumps(kw.get("knobs", {}), sort_keys=True)
        if key not in by_knobs:
            prog = T.lowered(args.model, args.dtype, max_seq=args.max_seq, **(base_knobs | kw.get("knobs", {})))
            if weights is None:
                weights = T.random_weights(prog, seed=0, device=f"cuda:{dev.index}")
            by_knobs[key] = (prog, refvm.alloc_buffers(prog, weights, f"cuda:{dev.index}"))
        prog, bufs = by_knobs[key]
        if kw.get("nop"):
            prog = prog.sync_skeleton()
        if kw.get("nowait"):
            prog = prog.without_waits()
        if kw.get("bypass"):
            prog = lower.bypass_stages(prog, set(kw["bypass"]))
        programs[name] = (prog, bufs)
    runners = make_runners(programs, variants)
    computing = [n for n in runners if not timing_only(variants[n])]
    first = computing[0] if computing else ""
    same = True
    for p in positions if first else []:
        ref = runners[first].run_step(1, p)
        for name in computing:
            eq = torch.equal(runners[name].run_step(1, p), ref)
            same &= eq
            if not eq:
                print(f"position {p}: {name}'s logits differ from {first}'s", flush=True)
    times: dict[tuple[str, int], list[float]] = {(n, p): [] for n in runners for p in positions}
    for rnd in range(args.rounds):
        order = list(runners) if rnd % 2 == 0 else list(reversed(runners))
        for p in positions:
            for name in order:
                times[name, p].append(runners[name].time_step(1, p, warmup=3, iters=args.iters).median_us)
    print(f"\nus per step, mean (best) of {args.rounds} rounds on {dev.name}")
    print(f"{'variant':<24}" + "".join(f"{'context ' + str(p + 1):>22}" for p in positions))
    for name in runners:
        cells = "".join(f"{statistics.mean(times[name, p]):>13.1f} ({min(times[name, p]):.1f})" for p in positions)
        print(f"{name:<24}{cells}")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "ab_vm.json"), "w") as f:
            json.dump({"device": dev.name, "same_logits": same,
                       "us": {f"{n}@{p}": v for (n, p), v in times.items()}}, f, indent=1)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
