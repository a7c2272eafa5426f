"""Schedule files (TOML 1.0): parse and check, with errors that name file and key.

The knob space is defined once, here (``KNOBS``): its types, the schema range a
file may hold, the choices the search explores and the default. A value outside
the schema range is a malformed file; a value inside it that the target cannot
run (too many threads, too much shared memory, more SMs than the GPU has) is a
REJECTED schedule, decided by lowering and the validator.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_amk.ir import MODEL_DTYPES, TARGETS


def _one_line(text: str, limit: int) -> str:
    """``text`` as one printable line of at most about ``limit`` characters."""
    clipped = len(text) > limit
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    return text[:limit] + "..." if clipped or len(text) > limit else text


class ScheduleError(Exception):
    """A malformed schedule file: names the file, the key and the reason (one printable line)."""

    def __init__(self, path: str | Path, key: str, reason: str) -> None:
        self.path, self.key, self.reason = _one_line(str(path), 1000), _one_line(key, 200), _one_line(reason, 600)
        super().__init__(f"{self.path}: {self.key}: {self.reason}" if key else f"{self.path}: {self.reason}")


FUSIONS = (("rmsnorm", "gemv"), ("gemv", "residual_add"), ("gemv", "silu_mul"), ("rope_append", "attn_partial"),
           ("attn_combine", "gemv"))


@dataclass(frozen=True)
class Knob:
    name: str
    kind: type  # int, str or list (fusion)
    default: Any
    choices: tuple[Any, ...]
    doc: str
    lo: int = 0  # schema range for ints (inclusive)
    hi: int = 1 << 20
    multiple_of: int = 1
    # Changes only how the GPU runner launches the program (recorded in its meta), not its tasks
    # or the kernel build: the cost model cannot rank it, so a search on predicted fitness keeps it.
    launch: bool = False

    def check(self, value: Any) -> str | None:
        """None if ``value`` fits the schema, else the reason."""
        if self.kind is int:
            if not isinstance(value, int) or isinstance(value, bool):
                return f"expected an integer, got {type(value).__name__} {value!r}"
            if not self.lo <= value <= self.hi:
                return f"{value} is out of range [{self.lo}, {self.hi}]"
            if value % self.multiple_of:
                return f"{value} is not a multiple of {self.multiple_of}"
        elif self.kind is str:
            if not isinstance(value, str):
                return f"expected a string, got {type(value).__name__} {value!r}"
            if value not in self.choices:
                return f"{value!r} is not one of {', '.join(map(repr, self.choices))}"
        elif self.kind is list:
            if not isinstance(value, list) or not all(isinstance(p, list) for p in value):
                return f"expected a list of pairs, got {value!r}"
            for pair in value:
                if tuple(pair) not in FUSIONS:
                    return f"unknown fusion {pair!r}; known: {[list(f) for f in FUSIONS]}"
        return None

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": self.kind.__name__, "default": self.default,
                             "choices": list(self.choices), "doc": self.doc,
                             "changes": "launch" if self.launch else "program"}
        if self.kind is int:
            d["range"] = [self.lo, self.hi]
        return d


ALL_FUSIONS = [list(f) for f in FUSIONS]
# The default leaves the combine unfused: on an H100 (Llama-1B shape, 512 threads) the fused
# combine made the O-projection level 6.9 us against 3.8 + 1.8 us for the two levels it merges
# (each of its tiles recombines every head). The search can still turn it on.
DEFAULT_FUSIONS = [f for f in ALL_FUSIONS if f != ["attn_combine", "gemv"]]

KNOBS: dict[str, Knob] = {k.name: k for k in (
    Knob("pipelining_depth", int, 2, (1, 2, 4, 8), lo=1, hi=16,
         doc="16-byte weight loads in flight per thread in GEMV (kernel build)"),
    Knob("threads_per_block", int, 256, (128, 256, 512, 1024), lo=32, hi=4096, multiple_of=32,
         doc="threads of each persistent block (kernel build and launch)"),
    Knob("sm_count", int, 0, (0, 64), lo=0, hi=4096,
         doc="SMs (queues) to use; 0 = every SM of the target"),
    Knob("sm_assignment", str, "round_robin", ("round_robin", "balanced"),
         doc="how tiles of a stage map to SM queues: in turn, or to the least-loaded queue"),
    Knob("tiling.gemv.n_tile", int, 0, (0, 8, 16, 32, 64, 128), lo=0, hi=1 << 20,
         doc="output rows per GEMV task; 0 = spread each projection over all SMs"),
    Knob("tiling.lm_head.n_tile", int, 0, (0, 256, 512, 1024, 2048), lo=0, hi=1 << 24,
         doc="vocabulary rows per LM-head task; 0 = spread over all SMs"),
    Knob("tiling.attention.kv_block", int, 64, (16, 32, 64, 128, 256), lo=1, hi=1 << 20,
         doc="KV positions per split-KV attention task (a combine task merges them)"),
    Knob("tiling.attention.combine_heads", int, 1, (1, 2, 4, 8), lo=1, hi=1024,
         doc="query heads merged per attention-combine task (when attn_combine+gemv is not fused)"),
    Knob("fusion", list, DEFAULT_FUSIONS, (), doc="fused op pairs: " + ", ".join(
        "+".join(f) for f in FUSIONS)),
    # L2 prefetch sizes (launch settings recorded in the program's meta; the GPU runner reads them).
    Knob("prefetch.own_kb", int, 48, (0, 32, 48, 64, 96), lo=0, hi=1 << 16, launch=True,
         doc="KB of each GEMV / LM-head task's first weight rows prefetched into L2 before its wait"),
    Knob("prefetch.lookahead_kb", int, -1, (-1, 0, 128, 256, 384, 512), lo=-1, hi=1 << 16, launch=True,
         doc="KB of each big weight task's first rows prefetched into L2 while the attention chain "
             "before it runs; -1: the card's default (gpu.prefetch.default_lookahead_bytes)"),
)}


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "expect":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


@dataclass(frozen=True)
class ModelSpec:
    id: str
    dtype: str = "bf16"
    seed: int = 0
    max_seq: int = 512


@dataclass(frozen=True)
class Expect:
    outcome: str = "pass"  # "pass" or "rejected"
    reason: str | None = None  # for "rejected": must appear in the rejection reason
    tokens: int = 0  # greedy tokens to compare against eager (0 = none)


@dataclass(frozen=True)
class Schedule:
    """One [[schedule]] table, knobs complete (defaults filled in)."""

    name: str
    knobs: dict[str, Any]
    expect: Expect = field(default_factory=Expect)

    def knob_digest(self) -> str:
        return hashlib.sha256(json.dumps(self.knobs, sort_keys=True).encode()).hexdigest()[:10]

    def changed_knobs(self) -> dict[str, Any]:
        """Knobs that differ from the defaults (what makes this schedule itself)."""
        return {k: v for k, v in self.knobs.items() if v != KNOBS[k].default}


@dataclass(frozen=True)
class ScheduleFile:
    path: str
    model: ModelSpec
    gpu: str
    schedules: tuple[Schedule, ...]


MODEL_KEYS = {"id": str, "dtype": str, "seed": int, "max_seq": int}


def default_knobs() -> dict[str, Any]:
    return {name: knob.default for name, knob in KNOBS.items()}


def check_knobs(path: str | Path, where: str, raw: dict[str, Any]) -> dict[str, Any]:
    """Complete and check a flat knob dict; raises ScheduleError naming the key."""
    knobs = default_knobs()
    for key, value in raw.items():
        if key not in KNOBS:
            raise ScheduleError(path, f"{where}.{key}", f"unknown key; known knobs: {', '.join(KNOBS)}")
        reason = KNOBS[key].check(value)
        if reason:
            raise ScheduleError(path, f"{where}.{key}", reason)
        knobs[key] = value
    return knobs


def _parse_expect(path: str, where: str, raw: Any) -> Expect:
    if not isinstance(raw, dict):
        raise ScheduleError(path, where, "must be a table")
    for key in raw:
        if key not in ("outcome", "reason", "tokens"):
            raise ScheduleError(path, f"{where}.{key}", "unknown key; known: outcome, reason, tokens")
    outcome = raw.get("outcome", "pass")
    if outcome not in ("pass", "rejected"):
        raise ScheduleError(path, f"{where}.outcome", f"{outcome!r} is not 'pass' or 'rejected'")
    reason = raw.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise ScheduleError(path, f"{where}.reason", "expected a string")
    tokens = raw.get("tokens", 0)
    if not isinstance(tokens, int) or isinstance(tokens, bool) or not 0 <= tokens <= 4096:
        raise ScheduleError(path, f"{where}.tokens", f"expected an integer in [0, 4096], got {tokens!r}")
    return Expect(outcome, reason, tokens)


MAX_DEPTH = 16  # arrays and tables nested deeper than any schedule needs


def _check_values(path: str, doc: dict[str, Any]) -> None:
    """Integers inside TOML's 64-bit range; nesting at most MAX_DEPTH deep (iteratively: no recursion)."""
    stack: list[tuple[str, Any, int]] = [(k, v, 1) for k, v in doc.items()]
    while stack:
        key, value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ScheduleError(path, key, f"nested more than {MAX_DEPTH} levels deep")
        if isinstance(value, dict):
            stack.extend((f"{key}.{k}", v, depth + 1) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{key}[{i}]", v, depth + 1) for i, v in enumerate(value))
        elif isinstance(value, int) and not -(1 << 63) <= value < 1 << 63:
            raise ScheduleError(path, key, f"integer of {value.bit_length()} bits is outside TOML's 64-bit range")


def parse_text(text: str, path: str | Path = "<string>", gpu_override: str | None = None) -> ScheduleFile:
    """Parse and check a schedule file's text. Raises ScheduleError."""
    path = str(path)
    if text.startswith("\ufeff"):
        raise ScheduleError(path, "", "starts with a byte order mark (BOM); TOML files are UTF-8 without one")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ScheduleError(path, "", f"invalid TOML: {e}") from None
    except ValueError:  # int() of a decimal with more digits than Python converts
        raise ScheduleError(path, "", "invalid TOML: an integer has too many digits") from None
    except RecursionError:
        raise ScheduleError(path, "", "invalid TOML: arrays or tables nested too deeply") from None
    _check_values(path, doc)
    for key in doc:
        if key not in ("model", "target", "schedule"):
            raise ScheduleError(path, key, "unknown top-level key; known: model, target, schedule")

    model_raw = doc.get("model")
    if not isinstance(model_raw, dict):
        raise ScheduleError(path, "model", "missing [model] table")
    for key, value in model_raw.items():
        if key not in MODEL_KEYS:
            raise ScheduleError(path, f"model.{key}", f"unknown key; known: {', '.join(MODEL_KEYS)}")
        typ = MODEL_KEYS[key]
        if not isinstance(value, typ) or isinstance(value, bool):
            raise ScheduleError(path, f"model.{key}", f"expected {typ.__name__}, got {value!r}")
    if "id" not in model_raw:
        raise ScheduleError(path, "model.id", "missing")
    model = ModelSpec(**model_raw)
    from pytest_amk.models.config import PRESETS

    if not (model.id in PRESETS or model.id.startswith("hf:")):
        raise ScheduleError(path, "model.id", f"unknown model {model.id!r}; known: {', '.join(PRESETS)}, hf:<path>")
    if model.dtype not in [d.value for d in MODEL_DTYPES]:
        raise ScheduleError(path, "model.dtype", f"{model.dtype!r} is not one of fp32, fp16, bf16")
    if not 0 <= model.seed < 2**63:
        raise ScheduleError(path, "model.seed", f"{model.seed} is out of range [0, 2^63)")
    if not 1 <= model.max_seq <= 1 << 20:
        raise ScheduleError(path, "model.max_seq", f"{model.max_seq} is out of range [1, 1048576]")

    target_raw = doc.get("target", {})
    if not isinstance(target_raw, dict):
        raise ScheduleError(path, "target", "must be a table")
    for key in target_raw:
        if key != "gpu":
            raise ScheduleError(path, f"target.{key}", "unknown key; known: gpu")
    gpu = gpu_override or target_raw.get("gpu")
    if gpu is None:
        raise ScheduleError(path, "target.gpu", "missing (or pass --amk-gpu)")
    if not isinstance(gpu, str) or gpu not in TARGETS:
        key = "--amk-gpu" if gpu_override else "target.gpu"
        raise ScheduleError(path, key, f"unknown GPU {gpu!r}; known: {', '.join(sorted(TARGETS))}")

    tables = doc.get("schedule")
    if not isinstance(tables, list) or not tables:
        raise ScheduleError(path, "schedule", "needs at least one [[schedule]] table")
    schedules: list[Schedule] = []
    for i, table in enumerate(tables):
        where = f"schedule[{i}]"
        if not isinstance(table, dict):
            raise ScheduleError(path, where, "must be a table")
        name = table.get("name")
        if not isinstance(name, str) or not name or not name.replace("-", "_").replace(".", "_").isidentifier():
            raise ScheduleError(path, f"{where}.name", f"needs a name of letters, digits, '-', '_', '.'; got {name!r}")
        if any(s.name == name for s in schedules):
            raise ScheduleError(path, f"{where}.name", f"duplicate schedule name {name!r}")
        expect = _parse_expect(path, f"{where}.expect", table.get("expect", {}))
        raw = _flatten({k: v for k, v in table.items() if k not in ("name", "expect")})
        schedules.append(Schedule(name, check_knobs(path, where, raw), expect))
    return ScheduleFile(path, model, gpu, tuple(schedules))


def parse_file(path: str | Path, gpu_override: str | None = None) -> ScheduleFile:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, ValueError) as e:  # ValueError: undecodable bytes, or a NUL in the path
        raise ScheduleError(p, "", f"cannot read: {e}") from None
    return parse_text(text, p, gpu_override)


def search_space() -> dict[str, Any]:
    """Every knob with its type, choices and default (``amk propose``)."""
    return {name: knob.describe() for name, knob in KNOBS.items()}
