"""Plain helpers shared by the test modules (fixtures live in conftest.py).

``tests/`` is not a package: pytest's default ("prepend") import mode puts it on ``sys.path``,
so test modules import this one as ``helpers``.
"""

from __future__ import annotations

from pathlib import Path

from pytest_amk import pipeline
from pytest_amk.schedule import Schedule, parse_file
from pytest_amk.search import Search, SearchLog


def toy_toml(*schedules: str, gpu: str = "h100", dtype: str = "bf16", max_seq: int = 64,
             seed: int | None = None) -> str:
    """Schedule-file text for the 2-layer ``toy`` model: the [model] and [target] tables, then
    one ``[[schedule]]`` table per entry of ``schedules`` (its body, e.g. ``'name = "default"'``),
    each after a blank line. With no schedules, the two tables alone."""
    seed_line = "" if seed is None else f"seed = {seed}\n"
    text = f'[model]\nid = "toy"\ndtype = "{dtype}"\n{seed_line}max_seq = {max_seq}\n\n[target]\ngpu = "{gpu}"\n'
    return text + "".join(f"\n[[schedule]]\n{body}\n" for body in schedules)


def toy_search(directory: Path, text: str) -> Search:
    """A search (seed 1) from the first schedule of ``directory/toy.toml``, written from ``text``
    unless already there, each trial run on CPU for one step; it logs to ``directory/log``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "toy.toml"
    if not path.exists():
        path.write_text(text)
    sf = parse_file(path)

    def evaluate(s: Schedule) -> pipeline.ItemResult:
        return pipeline.run_schedule(sf, s, device="cpu", steps=1)

    return Search(sf, sf.schedules[0], evaluate, SearchLog(directory / "log"), seed=1)


def assert_input_error(code: int, err: str, *words: str) -> None:
    """A CLI input error: exit code 2 and one stderr line holding every one of ``words``."""
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], (word, lines[0])
