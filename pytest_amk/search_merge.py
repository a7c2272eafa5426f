"""Search logs gathered from elsewhere: rows that remote xdist workers send to the
controller, and the search directories of CI matrix shards (``amk search-merge``).

A log row's identity is its experiment and trial index, in ``results.tsv`` as in
``corpus.jsonl`` and ``measured.jsonl``. Gathering appends only the rows whose identity
the target log does not hold yet, in the order given, as one atomic append
(``search.append_line``), so a row sent twice (``--dist each``, a shard that resumed the
same loop) lands once and the existing rows stay byte for byte. Torn lines are skipped
by the readers (``search.read_rows``/``read_jsonl``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_amk.search import TSV_COLUMNS, append_line, read_jsonl, read_rows

LOGS = ("results.tsv", "corpus.jsonl", "measured.jsonl")
CALIBRATION_FILE = "calibration.json"  # cost.CALIBRATION_FILE, without importing the cost model


def read_log(path: Path) -> list[dict[str, Any]]:
    """The complete rows of a log (``results.tsv`` rows or JSONL records), in file order."""
    return list(read_rows(path)) if path.suffix == ".tsv" else read_jsonl(path)


def log_line(path: Path, record: dict[str, Any]) -> str:
    """``record`` as a line of ``path``'s log. JSONL records are written as ``Search._record``
    writes them (sorted keys), so a record read back and rewritten keeps its text."""
    if path.suffix == ".tsv":
        return "\t".join(str(record[c]) for c in TSV_COLUMNS)
    return json.dumps(record, sort_keys=True)


def row_key(record: dict[str, Any]) -> tuple[str, int] | None:
    """A row's identity: (experiment, trial), or None when it has none (such rows are dropped)."""
    try:
        return str(record["experiment"]), int(record["trial"])
    except (KeyError, TypeError, ValueError):
        return None


@dataclass
class Gathered:
    """What gathering did to one log."""

    added: int = 0
    duplicates: int = 0  # identity already there, same row
    conflicts: list[tuple[str, int]] = field(default_factory=list)  # identity already there, another row (kept)


def append_new(path: Path, records: Iterable[dict[str, Any]]) -> Gathered:
    """Append to ``path`` the records whose identity it does not hold yet (the first of
    several with one identity wins), in order, as one atomic append."""
    have = {}
    for r in read_log(path):
        key = row_key(r)
        if key is not None:
            have.setdefault(key, log_line(path, r))
    out, lines = Gathered(), []
    for r in records:
        key = row_key(r)
        if key is None:
            continue
        line = log_line(path, r)
        if key in have:
            if have[key] == line:
                out.duplicates += 1
            else:
                out.conflicts.append(key)
            continue
        have[key] = line
        lines.append(line)
    if lines:
        path.parent.mkdir(parents=True, exist_ok=True)
        append_line(path, "\n".join(lines))  # one write: the rows land together or not at all
    out.added = len(lines)
    return out


def merge(out_dir: str | Path, in_dirs: Sequence[str | Path]) -> dict[str, Gathered]:
    """Gather the logs of ``in_dirs`` (in that order) into ``out_dir``: rows ``out_dir``
    holds first, then each input's new ones in its file order. The calibrations of
    ``calibration.json`` missing from ``out_dir`` are copied (the first input's wins), so
    calibrated experiments resume there. Charts and the JUnit suite are not merged: the
    next run over ``out_dir`` writes them from the merged log. Returns per log file
    what was added."""
    out = Path(out_dir)
    sources = [Path(d) for d in in_dirs]
    missing = [str(d) for d in sources if not d.is_dir()]
    if missing:
        raise FileNotFoundError(f"not a directory: {', '.join(missing)}")
    out.mkdir(parents=True, exist_ok=True)
    report = {}
    for name in LOGS:
        rows: list[dict[str, Any]] = []
        for d in sources:
            if d.resolve() != out.resolve():
                rows.extend(read_log(d / name))
        report[name] = append_new(out / name, rows)
    _merge_calibration(out, sources)
    return report


def _merge_calibration(out: Path, sources: Sequence[Path]) -> None:
    import fcntl
    import os

    # The lock cost.save_calibration takes: a loop recalibrating meanwhile loses nothing.
    fd = os.open(out / f"{CALIBRATION_FILE}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        merged = _json_dict(out / CALIBRATION_FILE)
        before = dict(merged)
        for d in sources:
            for gpu, entry in _json_dict(d / CALIBRATION_FILE).items():
                merged.setdefault(gpu, entry)
        if merged != before:
            tmp = out / f"{CALIBRATION_FILE}.tmp{os.getpid()}"
            tmp.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(tmp, out / CALIBRATION_FILE)
    finally:
        os.close(fd)


def _json_dict(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def describe(report: dict[str, Gathered]) -> list[str]:
    """One line per log file, for ``amk search-merge``."""
    lines = []
    for name, g in report.items():
        line = f"{name}: {g.added} added, {g.duplicates} already there"
        if g.conflicts:
            shown = ", ".join(f"{e} trial {t}" for e, t in g.conflicts[:3])
            line += f", {len(g.conflicts)} differing (first kept: {shown}{', ...' if len(g.conflicts) > 3 else ''})"
        lines.append(line)
    return lines


# -- remote xdist workers ------------------------------------------------------------------------

def seed_staging(staging: Path, results: Sequence[str], calibration: str) -> None:
    """A remote worker's private search directory: the controller's results.tsv rows (what
    a loop resumes from) and its calibration.json (part of the experiment's name)."""
    staging.mkdir(parents=True, exist_ok=True)
    if results:
        (staging / "results.tsv").write_text("\t".join(TSV_COLUMNS) + "\n" + "\n".join(results) + "\n",
                                             encoding="utf-8")
    if calibration:
        (staging / CALIBRATION_FILE).write_text(calibration, encoding="utf-8")


def resume_rows(directory: Path) -> list[str]:
    """The complete results.tsv rows of ``directory``, as lines (what a remote worker is seeded with)."""
    path = directory / "results.tsv"
    return [log_line(path, r) for r in read_rows(path)]


def new_rows(directory: Path, experiment: str, first: int) -> dict[str, list[dict[str, Any]]]:
    """The rows of ``experiment`` from trial ``first`` on, per log file (what a remote worker sends)."""
    out = {}
    for name in LOGS:
        out[name] = [r for r in read_log(directory / name)
                     if r.get("experiment") == experiment and (row_key(r) or ("", -1))[1] >= first]
    return out
