"""Roofline and same-run baselines on the GPU (DESIGN §8); ``amk bench``.

* ``bandwidth_probe``: achievable HBM read and copy bandwidth measured now, on this device
  (buffers far larger than L2), once per process and device.
* ``floor_us``: weight bytes plus KV bytes over that bandwidth.
* Baselines of the same decode step on the same weights: torch eager, the step captured in
  a CUDA graph, and torch.compile (max-autotune) captured in a CUDA graph. The graph
  baselines need static shapes, so ``StaticStep`` attends over the whole cache with a mask
  from the runtime position instead of slicing by position. Inductor's own CUDA graphs skip
  a step that mutates its inputs (the K/V caches), so the compiled step is built with
  ``max-autotune-no-cudagraphs`` and captured by hand after warm-up, like the eager graph.
* ``bench_file``: every schedule of a file (checked against the reference VM first), the
  best one again at the longest context, and the baselines, as one table; ``write_chart``
  draws it against the floor (PNG, matplotlib).
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EAGER, GRAPH, COMPILED = "torch eager", "torch CUDA graph", "torch.compile max-autotune + CUDA graph"
FLOOR_NAME = "floor (weights+KV / measured BW)"
# The best schedule's program with every task a NOP (ir.Program.sync_skeleton): what its waits and
# signals cost alone. A step cannot beat it any more than it can beat the bandwidth floor.
SKELETON_SUFFIX = "sync skeleton"
SKELETON_NOTE = "same queues, waits and signals (the sync floor)"
# The best schedule's program with every wait dropped (ir.Program.without_waits): its work alone,
# each queue flat out. The step is about this plus whatever of the skeleton does not overlap it.
WORK_SUFFIX = "work alone"
WORK_NOTE = "every wait dropped, each queue flat out (results garbage: a bound, not a step)"
BOUND_KINDS = ("skeleton", "work")  # rows that bound the step rather than run it


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
    """Measured read and copy bandwidth in GB/s (bytes moved / median time) of the current
    device; measured once per process and device."""
    import torch

    return _bandwidth_probe(nbytes, torch.cuda.current_device())


@functools.lru_cache(maxsize=8)
def _bandwidth_probe(nbytes: int, device: int) -> dict[str, float]:
    import torch

    n = nbytes // 4
    src = torch.rand(n, device=f"cuda:{device}")
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


def capture_graph(fn: Callable[[], Any], warmup: int = 3) -> Any:
    """``fn`` captured in a CUDA graph after ``warmup`` runs on a side stream; returns the graph."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


def baselines(model: Any, pos: int = 15, runs: int = 30, compile_: bool = True) -> dict[str, Timing | str]:
    """Median latency (L2 flushed before each run) of torch eager, the step in a CUDA graph and
    torch.compile max-autotune in a CUDA graph, for one decode step at position ``pos``."""
    import torch

    step = StaticStep(model)
    step.pos.fill_(pos)
    step.token.fill_(1)
    flush = L2Flusher()
    out: dict[str, Timing | str] = {}
    with torch.no_grad():
        out[EAGER] = cuda_time(step, runs=runs, before=flush)
        out[GRAPH] = cuda_time(capture_graph(step).replay, runs=runs, before=flush)
        if not compile_:
            out[COMPILED] = "not run (--no-compile)"
            return out
        try:
            torch._dynamo.reset()
            # Inductor's own CUDA graphs are skipped for a step that mutates its inputs (the
            # K/V caches): compile without them, then capture the compiled step by hand.
            compiled = torch.compile(step, mode="max-autotune-no-cudagraphs", fullgraph=True)
            compiled()  # compiles and autotunes, outside any capture
            out[COMPILED] = cuda_time(capture_graph(compiled).replay, runs=runs, before=flush)
        except Exception as e:  # compile can fail on some stacks: report, don't hide
            out[COMPILED] = f"failed: {type(e).__name__}: {str(e)[:160]}"
    return out


# -- the table -----------------------------------------------------------------------------------------------------

@dataclass
class Row:
    name: str
    kind: str  # "megakernel" | "long-context" | "skeleton" | "work" | "baseline"
    median_us: float | None
    floor_us: float | None
    note: str = ""


def format_table(rows: Sequence[Row | tuple[Any, ...]], floor: float, ref_us: float | None = None) -> str:
    """what | median us | x floor | % of roofline | speed-up over ``ref_us`` (the best torch
    baseline: above 1 is faster) | note. A row is a Row
    or (name, median_us, note[, floor_us]); without its own floor a row is against ``floor``."""
    lines = [f"{'what':44s} {'median us':>10s} {'x floor':>8s} {'% roofline':>10s} {'vs torch':>8s}  note",
             f"{FLOOR_NAME:44s} {floor:10.1f} {1.0:8.2f} {100.0:10.1f}"]
    for row in rows:
        kind = ""
        if isinstance(row, Row):
            name, us, note, own, kind = row.name, row.median_us, row.note, row.floor_us, row.kind
        else:
            name, us, note = row[0], row[1], row[2]
            own = row[3] if len(row) > 3 else None
        f = own if own else floor
        if us is None:
            lines.append(f"{name:44s} {'-':>10s} {'-':>8s} {'-':>10s} {'-':>8s}  {note}".rstrip())
            continue
        # A bound (the skeleton, the work alone) is not a step: only its ratio to the floor means anything.
        bound = kind in BOUND_KINDS
        vs = f"{ref_us / us:7.2f}x" if ref_us and not bound else f"{'-':>8s}"
        pct = f"{100 * f / us:10.1f}" if not bound else f"{'-':>10s}"
        lines.append(f"{name:44s} {us:10.1f} {us / f:8.2f} {pct} {vs}  {note}".rstrip())
    return "\n".join(lines)


@dataclass
class BenchReport:
    path: str
    head: str
    floor_us: float
    rows: list[Row] = field(default_factory=list)

    @property
    def best_baseline(self) -> Row | None:
        timed = [r for r in self.rows if r.kind == "baseline" and r.median_us]
        return min(timed, key=lambda r: r.median_us or math.inf) if timed else None

    @property
    def best_megakernel(self) -> Row | None:
        timed = [r for r in self.rows if r.kind == "megakernel" and r.median_us]
        return min(timed, key=lambda r: r.median_us or math.inf) if timed else None

    def table(self) -> str:
        ref = self.best_baseline
        text = self.head + "\n" + format_table(self.rows, self.floor_us, ref.median_us if ref else None)
        best = self.best_megakernel
        if best and best.median_us:
            pct = 100 * self.floor_us / best.median_us
            line = f"best: {best.name}, {best.median_us:.1f} us = {pct:.1f}% of roofline"
            if ref and ref.median_us:
                line += f", {ref.median_us / best.median_us:.2f}x the speed of {ref.name}"
            text += "\n" + line
        return text


def bench_file(path: str, gpu_name: str | None = None, steps: int = 2, pos: int = 15,
               compile_: bool = True, runs: int = 50) -> BenchReport:
    """`amk bench`: each schedule of the file (checked against the reference VM first, then
    timed at position ``pos``), the best one again at the longest context the file allows,
    and the torch baselines on the same weights, against the floor measured now."""
    import torch

    from pytest_amk import gpu, pipeline
    from pytest_amk.ir import get_target
    from pytest_amk.schedule import parse_file

    sf = parse_file(path, gpu_name)
    m = sf.model
    if not 0 <= pos < m.max_seq:
        raise ValueError(f"{path}: --pos {pos} outside [0, {m.max_seq}) (max_seq of the file)")
    dev = gpu.device_info()
    bw = bandwidth_probe()
    rows: list[Row] = []
    floor: float | None = None
    best: tuple[Any, Row] | None = None
    for sched in sf.schedules:
        if sched.expect.outcome == "rejected":
            continue
        name = f"megakernel {sched.name}"
        result = pipeline.run_schedule(sf, sched, "cuda", steps, time_gpu=False)
        if result.outcome != pipeline.PASS:
            rows.append(Row(name, "megakernel", None, None, f"{result.outcome}: {result.message[:70]}"))
            continue
        program = pipeline.lower_schedule(sf, sched)
        t = gpu.time_program(program, sf, pos=pos, rounds=runs)
        floor = t.floor_us
        row = Row(name, "megakernel", t.median_us, t.floor_us,
                  f"{t.pct_of_spec:.0f}% of spec; max err {result.verdict.max_abs_err:.3g}; {len(program.tasks)} tasks")
        rows.append(row)
        if best is None or t.median_us < (best[1].median_us or math.inf):
            best = (program, row)
    if best is not None and m.max_seq - 1 > pos:
        program, row = best
        long = gpu.time_program(program, sf, pos=m.max_seq - 1, rounds=runs)
        short = row.median_us or math.nan
        rows.append(Row(f"{row.name} @ context {m.max_seq}", "long-context", long.median_us, long.floor_us,
                        f"{100 * (long.median_us / short - 1):+.1f}% vs context {pos + 1}"))
    if best is not None:
        program, row = best
        skel = gpu.time_program(program.sync_skeleton(), sf, pos=pos, rounds=runs)
        rows.append(Row(f"{row.name} {SKELETON_SUFFIX}", "skeleton", skel.median_us, row.floor_us,
                        f"every task a NOP: {SKELETON_NOTE}"))
        work = gpu.time_program(program.without_waits(), sf, pos=pos, rounds=runs)
        rows.append(Row(f"{row.name} {WORK_SUFFIX}", "work", work.median_us, row.floor_us, WORK_NOTE))
    model = pipeline.eager_model(m.id, m.dtype, m.seed, m.max_seq)
    if floor is None:  # no schedule ran: the floor from the model's weights and KV
        weights = sum(t.numel() * t.element_size() for t in model.w.values())
        c = model.cfg
        kv = 2 * c.layers * c.kv_heads * c.head_dim * (pos + 1) * model.w["embed"].element_size()
        floor = floor_us(weights, kv, max(bw.values()))
    for name, timing in baselines(model, pos=pos, runs=runs, compile_=compile_).items():
        if isinstance(timing, str):
            rows.append(Row(name, "baseline", None, None, timing))
        else:
            rows.append(Row(name, "baseline", timing.median_us, floor))
    head = (f"{path}: {m.id} {m.dtype}, context {pos + 1} (position {pos}), {dev.name}, torch {torch.__version__}; "
            f"measured read {bw['read_gbps']:.0f} GB/s, copy {bw['copy_gbps']:.0f} GB/s "
            f"(spec {get_target(sf.gpu).hbm_gbps:.0f}); L2 flushed before every run")
    return BenchReport(path, head, floor, rows)


# -- the chart -----------------------------------------------------------------------------------------------------

def write_chart(path: str | Path, report: BenchReport) -> Path | None:
    """Latency of each row as a horizontal bar, its floor as a tick and the floor of the
    table as a dashed line (PNG, written atomically). None without matplotlib."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    rows = [r for r in report.rows if r.median_us]
    colors = {"megakernel": "tab:green", "long-context": "yellowgreen", "skeleton": "lightsteelblue",
              "work": "lightsteelblue", "baseline": "tab:gray"}
    fig = Figure(figsize=(9, 1.2 + 0.45 * max(1, len(rows))), dpi=100)
    ax = fig.add_subplot()
    ys = list(range(len(rows)))[::-1]
    ax.barh(ys, [r.median_us for r in rows], color=[colors.get(r.kind, "tab:blue") for r in rows], height=0.6)
    floors = [(y, r.floor_us) for y, r in zip(ys, rows, strict=True) if r.floor_us]
    if floors:
        ax.scatter([f for _, f in floors], [y for y, _ in floors], marker="|", s=400, color="black", zorder=3,
                   label="floor of the row")
    ax.axvline(report.floor_us, color="tab:blue", linestyle="--", linewidth=1,
               label=f"roofline floor {report.floor_us:.1f} us")
    for y, r in zip(ys, rows, strict=True):
        pct = 100 * (r.floor_us or report.floor_us) / (r.median_us or math.inf)
        ax.text(r.median_us, y, f" {r.median_us:.1f} us ({pct:.0f}%)", va="center", fontsize=8)
    ax.set_yticks(ys, [r.name for r in rows], fontsize=8)
    top = max([r.median_us or 0.0 for r in rows] + [report.floor_us])
    if top / max(report.floor_us, 1e-9) > 30:
        ax.set_xscale("log")
    else:
        ax.set_xlim(0, top * 1.3)
    ax.set_xlabel("latency of one decode step (us, CUDA events, median)")
    ax.set_title(report.head, fontsize=7, wrap=True)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    from pytest_amk.chart import save_png

    return save_png(fig, path)


def chart_path(chart: str | None, file: str, many: bool) -> Path:
    """Where the chart of ``file`` goes: ``--chart`` (suffixed with the file's stem when
    several files are benched), else ``.amk/bench/<stem>.png``."""
    stem = Path(file).stem
    if chart is None:
        return Path(".amk") / "bench" / f"{stem}.png"
    p = Path(chart)
    return p.with_name(f"{p.stem}-{stem}{p.suffix or '.png'}") if many else p


def run(files: Sequence[str], gpu_name: str | None = None, pos: int = 15, compile_: bool = True,
        chart: str | None = None, runs: int = 50, steps: int = 2,
        out: Callable[[str], None] = print) -> int:
    """Bench each file, print its table and write its chart. Raises ScheduleError, ValueError
    (bad input) and GpuUnavailable."""
    for i, f in enumerate(files):
        report = bench_file(f, gpu_name, steps=steps, pos=pos, compile_=compile_, runs=runs)
        if i:
            out("")
        out(report.table())
        written = write_chart(chart_path(chart, f, len(files) > 1), report)
        out(f"roofline chart: {written}" if written else "roofline chart: not written (matplotlib is not installed)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from pytest_amk.cli import main as cli_main

    return cli_main(["bench", *(argv if argv is not None else __import__("sys").argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
