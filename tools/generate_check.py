"""Device-side generation check: greedy tokens of llama-3.2-1b-shape (schedule "wide-blocks",
bf16, random weights) from the megakernel, lowered once, against eager PyTorch on the same GPU;
per-token latency of both. Also an exact fp32 check on toy-4L. Prints a short summary last;
the full result goes to $OUT/generate_check.json when OUT is set. About a minute on an H100
(most of it building the 1B weights on the CPU and compiling the VM).

    bash .device/run.sh python3 tools/generate_check.py [--tokens 128] [--prompt-ids 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def log(msg: str) -> None:
    print(msg, flush=True)


def run_case(path: Path, schedule: str, n: int, prompt: list[int], dtype: str | None = None,
             strict: bool = False) -> dict[str, Any]:
    """Megakernel vs eager (both on the GPU) for one schedule; returns the result row. ``strict``:
    any difference fails (fp32); otherwise a near-tie divergence passes (pytest_amk.generate)."""
    import torch

    from pytest_amk import generate as g
    from pytest_amk import gpu
    from pytest_amk.models import load_model
    from pytest_amk.models.llama import Llama
    from pytest_amk.schedule import ModelSpec, ScheduleFile, parse_file

    sf = parse_file(path)
    if dtype:  # the same schedule file in another dtype
        m = sf.model
        sf = ScheduleFile(sf.path, ModelSpec(m.id, dtype, m.seed, m.max_seq), sf.gpu, sf.schedules)
    sched = next(s for s in sf.schedules if s.name == schedule)
    m = sf.model
    label = f"{m.id}/{m.dtype}::{schedule}"
    t0 = time.perf_counter()
    program = g.lower_and_prove(sf, sched)
    t_lower = time.perf_counter() - t0
    t0 = time.perf_counter()
    cpu_model = load_model(m.id, m.dtype, m.seed, m.max_seq)
    t_init = time.perf_counter() - t0
    t0 = time.perf_counter()
    dev = f"cuda:{gpu.device_info().index}"
    model = Llama(cpu_model.cfg, cpu_model.w, m.max_seq, device=dev)
    del cpu_model
    decoder = g.GpuDecoder(program, model)  # weights shared with the eager model: uploaded once
    t_setup = time.perf_counter() - t0
    log(f"{label}: lowered and proven in {t_lower:.1f} s ({len(program.tasks)} tasks), weights built in "
        f"{t_init:.1f} s, uploaded + VM loaded in {t_setup:.1f} s")

    t0 = time.perf_counter()
    mk = g.decode(decoder, prompt, n)
    t_mk = time.perf_counter() - t0
    t0 = time.perf_counter()
    eager = g.eager_generate(model, prompt, n, keep_logits=True)
    t_eager = time.perf_counter() - t0
    check = g.compare_tokens(mk, eager, m.dtype, got_name="megakernel")
    kernel = decoder.runner.time_step(prompt[0], len(prompt) + n - 2, iters=20)
    warm = mk.token_us[1:] or mk.token_us
    row = {
        "case": label, "prompt_ids": prompt, "tokens": n, "equal": mk.tokens == eager.tokens, "strict": strict,
        "ok": check.ok and (mk.tokens == eager.tokens or not strict),
        "check": check.to_json(), "megakernel_tokens": mk.tokens, "eager_tokens": eager.tokens,
        "megakernel_us_per_token": {"median": statistics.median(warm), "mean": statistics.fmean(warm),
                                    "min": min(warm), "first": mk.token_us[0]},
        "eager_us_per_token": {"median": eager.median_us},
        "kernel_only_us": {"median": kernel.median_us, "l2_flushed": kernel.flushed_l2,
                           "pos": len(prompt) + n - 2},
        "seconds": {"lower_prove": t_lower, "init_weights": t_init, "setup": t_setup, "megakernel": t_mk,
                    "eager": t_eager},
        "device": kernel.device_name, "resources": decoder.runner.resources(),
    }
    d = check.divergence
    log(f"{label}: tokens equal: {row['equal']}; {check.message}")
    if d is not None:
        log(f"  first divergence: generated token {d.index} (position {d.pos}): megakernel {d.got}, eager "
            f"{d.expected}, near-tie: {d.near_tie}")
    log(f"  megakernel: median {row['megakernel_us_per_token']['median']:.0f} us/token wall clock per step "
        f"({n} tokens, {t_mk:.2f} s); kernel alone {kernel.median_us:.0f} us (L2 flushed, "
        f"pos {row['kernel_only_us']['pos']}); eager on the GPU: median {eager.median_us or 0:.0f} us/token")
    torch.cuda.empty_cache()
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt-ids", default="1")
    ap.add_argument("--file", default=str(ROOT / "schedules" / "llama-3.2-1b-shape.toml"))
    ap.add_argument("--schedule", default="wide-blocks")
    ap.add_argument("--no-toy", action="store_true", help="skip the exact fp32 toy-4L check")
    args = ap.parse_args()
    t_start = time.perf_counter()

    import torch

    from pytest_amk.generate import parse_prompt_ids
    from pytest_amk.gpu.testing import exact_device

    dev, why = exact_device()
    if dev is None:
        log(f"GPU not available: {why}")
        return 2
    log(f"device: {dev.name} ({dev.arch}, {dev.sm_count} SMs), torch {torch.__version__}")
    prompt = parse_prompt_ids(args.prompt_ids)
    rows: list[dict[str, Any]] = []
    if not args.no_toy:  # fp32: the sequences must be exactly equal, no near-tie allowed
        rows.append(run_case(ROOT / "schedules" / "toy-4L.toml", "default", args.tokens, prompt, dtype="fp32",
                             strict=True))
    rows.append(run_case(Path(args.file), args.schedule, args.tokens, prompt))

    log("")
    log(f"{'case':<44} {'equal':>5} {'first divergence':<34} {'mk us/tok':>9} {'kernel us':>9} {'eager us/tok':>12}")
    for r in rows:
        d = r["check"]["first_divergence"]
        div = "-" if d is None else (f"#{d['index']} {d['got']} vs {d['expected']} "
                                     f"({'near-tie' if d['near_tie'] else 'NOT a near-tie'})")
        log(f"{r['case']:<44} {r['equal']!s:>5} {div:<34} {r['megakernel_us_per_token']['median']:>9.0f} "
            f"{r['kernel_only_us']['median']:>9.0f} {r['eager_us_per_token']['median']:>12.0f}")
    failed = [r["case"] for r in rows if not r["ok"]]
    log(f"total {time.perf_counter() - t_start:.0f} s; " + (f"FAILED: {', '.join(failed)}" if failed else "OK"))
    out = os.environ.get("OUT")
    if out:
        Path(out, "generate_check.json").write_text(json.dumps({"device": dev.__dict__, "rows": rows}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
