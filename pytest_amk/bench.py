"""Roofline and same-run baselines on the GPU (DESIGN §8).

* ``bandwidth_probe``: achievable HBM read bandwidth measured now, on this device
  (a reduction over a buffer far larger than L2), and copy bandwidth.
* ``floor_us``: weight bytes plus KV bytes over that bandwidth.
* Baselines of the same decode step on the same weights: torch eager, the step
  captured in a CUDA graph, and torch.compile (max-autotune, graphed). The graph
  baselines need static shapes, so ``StaticStep`` attends over the whole cache
  with a mask from the runtime length instead of slicing by position.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Timing:
    median_us: float
    min_us: float
    runs: int


def cuda_time(fn: Callable[[], Any], runs: int = 50, warmup: int = 5,
              before: Callable[[], Any] | None = None) -> Timing:
    """Median of ``runs`` CUDA-event timings of ``fn`` (``before`` runs untimed each time,
    e.g. an L2 flush)."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        if before:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return Timing(statistics.median(times), min(times), runs)


class L2Flusher:
    """Writes a buffer twice the L2 size so the next timed run starts with a cold cache."""

    def __init__(self) -> None:
        import torch

        l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
        self.buf = torch.empty(max(2 * l2, 1 << 20), dtype=torch.uint8, device="cuda")

    def __call__(self) -> None:
        self.buf.zero_()


def bandwidth_probe(nbytes: int = 2 << 30) -> dict[str, float]:
    """Measured read and copy bandwidth in GB/s (bytes moved / median time)."""
    import torch

    n = nbytes // 4
    src = torch.rand(n, device="cuda")
    dst = torch.empty_like(src)
    read = cuda_time(lambda: src.sum(), runs=20)
    copy = cuda_time(lambda: dst.copy_(src), runs=20)
    return {"read_gbps": nbytes / read.median_us / 1e3, "copy_gbps": 2 * nbytes / copy.median_us / 1e3}


def floor_us(weight_bytes: int, kv_bytes: int, gbps: float) -> float:
    return (weight_bytes + kv_bytes) / (gbps * 1e3)


class StaticStep:
    """The eager model's decode step with static shapes (for CUDA graphs and compile).

    Reads token and position from device tensors; writes K/V with index_copy_ and
    masks positions >= pos+1. Numerically the same function as ``Llama.step``."""

    def __init__(self, model: Any, device: str = "cuda") -> None:
        import torch

        c = model.cfg
        self.cfg, self.max_seq = c, model.max_seq
        self.w = {k: v.to(device) for k, v in model.w.items()}
        self.rope = model.rope.to(device)
        shape = (c.layers, c.kv_heads, model.max_seq, c.head_dim)
        self.k = torch.zeros(shape, dtype=model.dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.token = torch.zeros(1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.positions = torch.arange(model.max_seq, device=device)

    def __call__(self) -> Any:
        import torch
        import torch.nn.functional as F

        from pytest_amk.models.llama import apply_rope, rms_norm

        c, w = self.cfg, self.w
        d, rep = c.head_dim, c.heads // c.kv_heads
        cos, sin = self.rope[self.pos, :, 0], self.rope[self.pos, :, 1]
        mask = self.positions > self.pos  # [max_seq]: future positions
        x = w["embed"][self.token].view(-1)
        for i in range(c.layers):
            p = f"layers.{i}."
            qkv = F.linear(rms_norm(x, w[p + "attn_norm"], c.rms_eps), w[p + "wqkv"])
            q = apply_rope(qkv[: c.heads * d].view(c.heads, d), cos, sin)
            k = apply_rope(qkv[c.heads * d : (c.heads + c.kv_heads) * d].view(c.kv_heads, d), cos, sin)
            v = qkv[(c.heads + c.kv_heads) * d :].view(c.kv_heads, d)
            self.k[i].index_copy_(1, self.pos, k.unsqueeze(1))
            self.v[i].index_copy_(1, self.pos, v.unsqueeze(1))
            qg = q.view(c.kv_heads, rep, d).float()
            scores = torch.einsum("grd,gpd->grp", qg, self.k[i].float()) / math.sqrt(d)
            scores = scores.masked_fill(mask, float("-inf"))
            attn = torch.einsum("grp,gpd->grd", scores.softmax(-1), self.v[i].float()).to(x.dtype)
            x = x + F.linear(attn.reshape(-1), w[p + "wo"])
            gate, up = F.linear(rms_norm(x, w[p + "mlp_norm"], c.rms_eps), w[p + "w_gate_up"]).split(c.ffn)
            x = x + F.linear(F.silu(gate) * up, w[p + "w_down"])
        lm = w["embed"] if c.tied else w["lm_head"]
        return F.linear(rms_norm(x, w["norm"], c.rms_eps), lm).float()


def baselines(model: Any, pos: int = 16, runs: int = 30, compile_: bool = True) -> dict[str, Timing | str]:
    """Median latency of torch eager, CUDA graph and torch.compile for one decode step
    at position ``pos`` (the cache holds ``pos`` earlier positions)."""
    import torch

    step = StaticStep(model)
    step.pos.fill_(pos)
    step.token.fill_(1)
    flush = L2Flusher()
    out: dict[str, Timing | str] = {}
    with torch.no_grad():
        out["torch eager"] = cuda_time(step, runs=runs, before=flush)
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            step()
        out["torch CUDA graph"] = cuda_time(graph.replay, runs=runs, before=flush)
        if compile_:
            try:
                compiled = torch.compile(step, mode="max-autotune", fullgraph=True)
                for _ in range(3):
                    compiled()
                out["torch.compile max-autotune"] = cuda_time(compiled, runs=runs, before=flush)
            except Exception as e:  # compile can fail on some stacks: report, don't hide
                out["torch.compile max-autotune"] = f"failed: {type(e).__name__}: {str(e)[:120]}"
    return out


def format_table(rows: list[tuple[str, float | None, str]], floor: float) -> str:
    """name | median us | x floor | % of roofline | note."""
    lines = [f"{'what':34s} {'median us':>10s} {'x floor':>8s} {'% roofline':>10s}  note",
             f"{'floor (weights+KV / measured BW)':34s} {floor:10.1f} {1.0:8.2f} {100.0:10.1f}"]
    for name, us, note in rows:
        if us is None:
            lines.append(f"{name:34s} {'-':>10s} {'-':>8s} {'-':>10s}  {note}")
        else:
            lines.append(f"{name:34s} {us:10.1f} {us / floor:8.2f} {100 * floor / us:10.1f}  {note}")
    return "\n".join(lines)


def bench_file(path: str, gpu_name: str | None = None, steps: int = 2, pos: int = 16,
               compile_: bool = True, runs: int = 50) -> str:
    """`amk bench`: each schedule of the file (checked against the reference VM first),
    then the torch baselines on the same weights, against the floor measured now."""
    import torch

    from pytest_amk import gpu, pipeline
    from pytest_amk.schedule import parse_file

    sf = parse_file(path, gpu_name)
    m = sf.model
    dev = gpu.device_info()
    bw = bandwidth_probe()
    rows: list[tuple[str, float | None, str]] = []
    floor = None
    for sched in sf.schedules:
        if sched.expect.outcome == "rejected":
            continue
        result = pipeline.run_schedule(sf, sched, "cuda", steps, time_gpu=False)
        name = f"megakernel {sched.name}"
        if result.outcome != "passed":
            rows.append((name, None, f"{result.outcome}: {result.message[:60]}"))
            continue
        program = pipeline.lower_schedule(sf, sched)
        t = gpu.time_program(program, sf, pos=pos, iters=runs)
        kv = sum(b.nbytes for b in program.buffers if b.kind.value == "kv") * (pos + 1) // m.max_seq
        floor = floor_us(program.weight_bytes(), kv, bw["read_gbps"])
        rows.append((name, t.median_us, f"max err {result.verdict.max_abs_err:.3g}, {len(program.tasks)} tasks"))
    model = pipeline.eager_model(m.id, m.dtype, m.seed, m.max_seq)
    for name, timing in baselines(model, pos=pos, runs=runs, compile_=compile_).items():
        if isinstance(timing, str):
            rows.append((name, None, timing))
        else:
            rows.append((name, timing.median_us, ""))
    head = (f"{path}: {m.id} {m.dtype}, position {pos}, {dev.name}, torch {torch.__version__}; "
            f"measured read {bw['read_gbps']:.0f} GB/s, copy {bw['copy_gbps']:.0f} GB/s")
    return head + "\n" + format_table(rows, floor or float("nan"))


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pytest_amk.bench")
    ap.add_argument("files", nargs="+")
    ap.add_argument("--gpu", default=None)
    ap.add_argument("--pos", type=int, default=16)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args(argv)
    for f in args.files:
        print(bench_file(f, args.gpu, pos=args.pos, compile_=not args.no_compile), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
