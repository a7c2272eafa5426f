"""The trajectory chart of a search (PNG): latency per trial, the kept points and the
incumbent as a step line, trials without a latency (rejected, failed, duplicate) as
marks along the top, and the roofline floor. Needs matplotlib (the ``dev`` extra);
without it ``write_chart`` returns None and the caller says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pytest_amk.search import Trial

MISSING = "matplotlib is not installed (pip install matplotlib): no trajectory chart"


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def write_chart(path: str | Path, trials: Sequence[Trial], floor_us: float | None, title: str,
                kind: str = "predicted") -> Path | None:
    """Draw the trajectory to ``path`` (PNG, written atomically). None without matplotlib."""
    if not available():
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.add_subplot()
    timed = [t for t in trials if t.latency_us is not None]
    kept = [t for t in timed if t.kept]
    other = [t for t in timed if not t.kept]
    ax.scatter([t.index for t in other], [t.latency_us for t in other], s=18, color="0.6", label="trial")
    ax.scatter([t.index for t in kept], [t.latency_us for t in kept], s=48, color="tab:green", zorder=3,
               label="kept")
    if kept:
        xs = [t.index for t in kept] + [max(t.index for t in trials)]
        ys = [t.latency_us for t in kept] + [kept[-1].latency_us]
        ax.step(xs, ys, where="post", color="tab:green", linewidth=1.2, label="incumbent")
    top = max([t.latency_us for t in timed if t.latency_us is not None] + [floor_us or 0.0, 1.0])
    failed = [t for t in trials if t.latency_us is None]
    if failed:
        ax.scatter([t.index for t in failed], [top * 1.05] * len(failed), marker="x", color="tab:red",
                   label="rejected / failed / duplicate")
    if floor_us:
        ax.axhline(floor_us, color="tab:blue", linestyle="--", linewidth=1, label=f"floor {floor_us:.1f} us")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"latency (us, {kind})")
    ax.set_ylim(bottom=0, top=top * 1.12)
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    return save_png(fig, path)


def save_png(fig: Any, path: str | Path) -> Path:
    """Write a matplotlib figure atomically (a reader never sees half a PNG)."""
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, format="png")
    tmp.replace(out)
    return out
