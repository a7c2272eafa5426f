"""Input hardening: malformed and adversarial schedule files and program JSON.

Every input path must end in a clean error that names the file: ``schedule.parse_text`` /
``parse_file`` raise only ``ScheduleError``; ``amk eval`` / ``amk lower`` / ``amk validate``
exit 1 or 2 with one error line (never a traceback, never "internal error"); ``validate_json``
never raises; collection through pytest never gives an INTERNALERROR. Schema-valid but huge
values (``max_seq = 2**20`` on the 1B model, 1-row tiles) are REJECTED by the lowering's
limits before anything big is built.

The properties run a few hundred cases in the suite. For a longer run:

    AMK_FUZZ_EXAMPLES=5000 AMK_FUZZ_MAX_TASKS=12000 AMK_FUZZ_REPORT=fuzz.json pytest tests/test_fuzz_inputs.py

(``AMK_FUZZ_REPORT`` collects how many cases each property ran, and their outcomes.)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# In-process pytester runs drop the modules a run imported; torch cannot be imported twice.
import torch  # noqa: F401
from helpers import toy_toml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_amk import cli, pipeline, refvm  # noqa: F401
from pytest_amk.audit.mutate import base_program
from pytest_amk.ir import TARGETS
from pytest_amk.lower import MAX_TASKS, task_count
from pytest_amk.models import llama  # noqa: F401
from pytest_amk.models.config import PRESETS
from pytest_amk.schedule import FUSIONS, KNOBS, ScheduleError, default_knobs, parse_file, parse_text
from pytest_amk.validate import validate_json

EXAMPLES = int(os.environ.get("AMK_FUZZ_EXAMPLES", "0") or 0)


def fuzz(default: int) -> settings:
    """Hypothesis settings: ``default`` cases (AMK_FUZZ_EXAMPLES overrides), no deadline, no database."""
    return settings(max_examples=EXAMPLES or default, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


COUNTS: Counter[str] = Counter()  # "property" and "property: outcome" -> cases


@pytest.fixture(scope="module", autouse=True)
def _report_counts() -> Iterator[None]:
    yield
    path = os.environ.get("AMK_FUZZ_REPORT")
    if path:
        old = json.loads(Path(path).read_text()) if Path(path).exists() else {}
        for k, n in COUNTS.items():
            old[k] = old.get(k, 0) + n
        Path(path).write_text(json.dumps(dict(sorted(old.items())), indent=1) + "\n")


def count(prop: str, outcome: str) -> None:
    COUNTS[prop] += 1
    COUNTS[f"{prop}: {outcome}"] += 1


# -- schedule files ----------------------------------------------------------------------------

GOOD = toy_toml(
    'name = "default"',
    'name = "narrow"\nthreads_per_block = 128\ntiling.gemv.n_tile = 8\ntiling.attention.kv_block = 16\n'
    'fusion = [["rmsnorm", "gemv"]]\nexpect.outcome = "pass"',
    seed=0)

HUGE = (10**30, -(10**30), -1, 0, 1, 2**31 - 1, 2**31, -(2**31), 2**63 - 1, 2**63, -(2**63), 2**64, 1 << 20,
        (1 << 20) + 1, 1 << 24, 4096, 4097, 33, 131072)
WORDS = ("toy", "toy-4L", "llama-3.2-1b-shape", "hf:/nonexistent/config.json", "hf:", "h100", "v100", "bf16",
         "int8", "round_robin", "balanced", "pass", "rejected", "", "\x00", "\ufeff", "é∂ƒ", "名前", "a\nb",
         "x" * 10_000, "rmsnorm", "gemv")
KEYS = ("model", "target", "schedule", "id", "dtype", "seed", "max_seq", "gpu", "name", "expect", "outcome",
        "reason", "tokens", "tiling", "gemv", "n_tile", *KNOBS, "", "é", "a b", "\x00", "a\nb", "k" * 300)

scalars = st.one_of(st.sampled_from(HUGE), st.integers(), st.floats(), st.booleans(), st.sampled_from(WORDS),
                    st.text(max_size=30))
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=12))
values = st.recursive(scalars, lambda ch: st.lists(ch, max_size=4) | st.dictionaries(keys, ch, max_size=4),
                      max_leaves=8)


def _toml_key(k: str) -> str:
    return k if k and all(c.isascii() and (c.isalnum() or c in "-_") for c in k) else _toml_str(k)


def _toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return {"inf": "inf", "-inf": "-inf", "nan": "nan"}.get(repr(v), repr(v))
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(map(toml_value, v)) + "]"
    return "{" + ", ".join(f"{_toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


def toml_doc(doc: dict[str, Any]) -> str:
    """TOML text: top-level tables as [sections], arrays of tables as [[sections]]."""
    head, body = [], []
    for k, v in doc.items():
        if isinstance(v, dict) and v:
            body.append(f"[{_toml_key(k)}]")
            body += [f"{_toml_key(a)} = {toml_value(b)}" for a, b in v.items()]
        elif isinstance(v, list) and v and all(isinstance(t, dict) for t in v):
            for t in v:
                body.append(f"[[{_toml_key(k)}]]")
                body += [f"{_toml_key(a)} = {toml_value(b)}" for a, b in t.items()]
        else:
            head.append(f"{_toml_key(k)} = {toml_value(v)}")
    return "\n".join(head + body) + "\n"


def set_knob(table: dict[str, Any], name: str, value: Any) -> None:
    """Put knob ``name`` into a schedule table, a dotted name as nested tables."""
    *tables, key = name.split(".")
    for sub in tables:
        table = table.setdefault(sub, {})
    table[key] = value


def _maybe(draw: st.DrawFn, good: Any) -> Any:
    """Mostly a sensible value, else an adversarial one."""
    return good if draw(st.integers(0, 9)) < 6 else draw(values)


@st.composite
def schedule_docs(draw: st.DrawFn) -> str:
    """Schedule-shaped documents whose values, types and keys go wrong now and then."""
    model = {"id": draw(st.sampled_from(["toy", "toy", "toy-4L", "llama-3.2-1b-shape", "hf:/nonexistent"]))}
    for key, good in (("dtype", "bf16"), ("seed", 0), ("max_seq", draw(st.sampled_from((16, 64, *HUGE))))):
        if draw(st.booleans()):
            model[key] = _maybe(draw, good)
    model["id"] = _maybe(draw, model["id"])
    doc: dict[str, Any] = {"model": model, "target": {"gpu": _maybe(draw, "h100")}}
    scheds = []
    for i in range(draw(st.integers(0, 3))):
        t: dict[str, Any] = {"name": _maybe(draw, f"s{i}")}
        for name in draw(st.lists(st.sampled_from(sorted(KNOBS)), max_size=3)):
            knob = KNOBS[name]
            good = draw(st.sampled_from(knob.choices or (knob.default,)))
            set_knob(t, name, draw(st.one_of(st.just(good), st.sampled_from(HUGE), values)))
        if draw(st.integers(0, 4)) == 0:
            t["expect"] = _maybe(draw, {"outcome": "rejected", "reason": "x", "tokens": 1})
        scheds.append(t)
    doc["schedule"] = scheds
    for _ in range(draw(st.integers(0, 2))):  # swap a part for something else entirely
        doc[draw(st.sampled_from(["model", "target", "schedule", "junk"]))] = draw(values)
    return toml_doc(doc)


@st.composite
def raw_texts(draw: st.DrawFn) -> str:
    """Text-level adversaries: deep nesting, long strings, duplicate keys, BOM, NUL, garbage."""
    n = draw(st.sampled_from((1, 10, 100, 500, 1000, 2000, 5000)))
    head = '[model]\nid = "toy"\n[target]\ngpu = "h100"\n[[schedule]]\nname = "s"\n'
    kind = draw(st.sampled_from(("array", "inline", "dotted", "header", "long", "dup", "bom", "nul", "garbage",
                                 "empty", "hex", "digits", "table-array")))
    if kind == "array":
        return head + "fusion = " + "[" * n + "]" * n + "\n"
    if kind == "inline":
        return "model = " + "{a = " * n + "1" + "}" * n + "\n"
    if kind == "dotted":
        return head + ".".join(["tiling"] * n) + " = 1\n"
    if kind == "header":
        return head + "[" + ".".join(["schedule"] * n) + "]\n"
    if kind == "long":
        return head.replace('"s"', _toml_str("s" * n * 100)) + f"sm_assignment = {_toml_str('x' * n * 20)}\n"
    if kind == "dup":
        return GOOD + draw(st.sampled_from(GOOD.splitlines()))
    if kind == "bom":
        return "\ufeff" + GOOD
    if kind == "nul":
        at = draw(st.integers(0, len(GOOD)))
        return GOOD[:at] + "\x00" + GOOD[at:]
    if kind == "garbage":
        return draw(st.binary(max_size=200)).decode("latin-1")
    if kind == "empty":
        return draw(st.sampled_from(("", "\n", " ", "#", "[]", "[[]]", "=")))
    if kind == "hex":  # a 64-bit-plus integer TOML can spell in hex
        return head + f"threads_per_block = 0x{'f' * n}\n"
    if kind == "digits":
        return head.replace("[model]\n", f"[model]\nmax_seq = {'9' * n}\n")
    return head + "schedule = " + draw(st.sampled_from(("[1]", "{}", '"x"', "[[1]]"))) + "\n"


@st.composite
def mutated_good(draw: st.DrawFn) -> str:
    """The good file with a few character-level edits."""
    text = GOOD
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(("insert", "delete", "replace", "truncate")))
        if op == "insert":
            text = text[:at] + draw(st.text(max_size=5)) + text[at:]
        elif op == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 10)):]
        elif op == "replace":
            text = text[:at] + draw(st.characters()) + text[at + 1:]
        else:
            text = text[:at]
    return text


schedule_texts = st.one_of(schedule_docs(), raw_texts(), mutated_good())


def assert_schedule_error(e: ScheduleError, path: str) -> str:
    msg = str(e)
    assert msg.startswith(f"{path}: ") and e.path == path, msg
    assert msg.isprintable() and len(msg) < 2000, msg[:300]
    return e.reason.split(":")[0][:40]


@fuzz(300)
@given(text=schedule_texts)
def test_parse_text_raises_only_schedule_errors(text: str) -> None:
    try:
        sf = parse_text(text, "fuzz.toml")
    except ScheduleError as e:
        count("parse_text", "ScheduleError")
        assert_schedule_error(e, "fuzz.toml")
    else:
        count("parse_text", "parsed")
        assert sf.schedules and all(KNOBS[k].check(v) is None for s in sf.schedules for k, v in s.knobs.items())


@fuzz(100)
@given(data=st.one_of(schedule_texts.map(lambda t: t.encode("utf-8", "surrogatepass")), st.binary(max_size=300),
                      st.binary(max_size=40).map(lambda b: b"\xef\xbb\xbf" + GOOD.encode() + b)))
def test_parse_file_raises_only_schedule_errors(data: bytes, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("parse") / "fuzz.toml"
    path.write_bytes(data)
    try:
        parse_file(path)
    except ScheduleError as e:
        count("parse_file", "ScheduleError")
        assert_schedule_error(e, str(path))
    else:
        count("parse_file", "parsed")


def amk(*args: str) -> tuple[int, str, str]:
    """``amk ARGS`` in-process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(args))
        except SystemExit as e:  # argparse
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


def assert_clean(code: int, out: str, err: str, path: Path, allowed: tuple[int, ...]) -> None:
    assert code in allowed, (code, out[-500:], err[-500:])
    for stream in (out, err):
        assert "Traceback" not in stream and "internal error" not in stream, stream[-2000:]
    if code == 2:  # bad input: exactly one line on stderr, naming the file
        assert err.count("\n") == 1 and str(path) in err, err[:500]


@fuzz(120)
@given(text=schedule_texts)
def test_amk_eval_and_lower_give_clean_errors(text: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A malformed file: `amk eval` exits 2 with one line naming it. A well-formed one is lowered
    (`amk lower`, bounded by the lowering's limits) and its program proven (`amk validate`); a
    REJECTED one makes `amk eval` exit 1 without running anything heavy."""
    path = tmp_path_factory.mktemp("eval") / "fuzz.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        parse_file(path)
    except ScheduleError:
        code, out, err = amk("eval", str(path), "--device", "cpu", "--steps", "1")
        assert_clean(code, out, err, path, (2,))
        count("amk eval (malformed)", "exit 2")
        return
    check_wellformed(path, "amk lower/eval (well-formed)")


# Well-formed files are lowered and their program validated when the program is small
# (AMK_FUZZ_MAX_TASKS); beyond MAX_TASKS the lowering rejects them before building.
LARGE = int(os.environ.get("AMK_FUZZ_MAX_TASKS", "5000"))


def check_wellformed(path: Path, prop: str) -> None:
    """`amk lower` exits 0, or 1 with one REJECTED line (then `amk eval` exits 1 too, having run
    nothing heavy); a lowered program goes through `amk validate` (0 or 1)."""
    sf = parse_file(path)
    sched = sf.schedules[0]
    if sf.model.id in PRESETS:
        n = task_count(PRESETS[sf.model.id], sched.knobs, sched.knobs["sm_count"] or TARGETS[sf.gpu].sm_count,
                       sf.model.max_seq)
        if LARGE < n <= MAX_TASKS:
            count(prop, "skipped: a large program")
            return
    prog = path.with_suffix(".json")
    code, out, err = amk("lower", str(path), "-o", str(prog))
    assert_clean(code, out, err, path, (0, 1))
    if code == 1:
        assert err.startswith(f"amk lower: REJECTED {path}::") and err.count("\n") == 1, err
        code, out, err = amk("eval", str(path), "--device", "cpu", "--steps", "1")
        assert_clean(code, out, err, path, (0, 1))
        assert out.startswith(("REJECTED ", "PASS (expected REJECTED)")), out[:300]
        count(prop, "REJECTED")
        return
    code, out, err = amk("validate", str(prog))
    assert_clean(code, out, err, prog, (0, 1))
    count(prop, f"lowered, validate exit {code}")


def knob_values(name: str) -> st.SearchStrategy[Any]:
    knob = KNOBS[name]
    if knob.kind is str:
        return st.sampled_from(knob.choices)
    if knob.kind is list:
        return st.lists(st.sampled_from([list(f) for f in FUSIONS]), max_size=3)
    m = knob.multiple_of
    ints = st.one_of(st.sampled_from((knob.lo, knob.hi, *knob.choices)), st.integers(knob.lo, knob.hi))
    return ints.map(lambda v: max(knob.lo, v - v % m) if m > 1 else v)


@st.composite
def wellformed_docs(draw: st.DrawFn) -> str:
    """Schema-valid files with values anywhere in their ranges, extremes often."""
    model = {"id": draw(st.sampled_from(("toy", "toy", "toy-4L", "llama-3.2-1b-shape", "hf:/nonexistent"))),
             "dtype": draw(st.sampled_from(("fp32", "fp16", "bf16"))), "seed": draw(st.sampled_from((0, 2**63 - 1))),
             "max_seq": draw(st.one_of(st.sampled_from((1, 2, 64, 1 << 20)), st.integers(1, 1 << 20)))}
    sched: dict[str, Any] = {"name": "x"}
    for name in draw(st.lists(st.sampled_from(sorted(KNOBS)), max_size=5, unique=True)):
        set_knob(sched, name, draw(knob_values(name)))
    if draw(st.integers(0, 4)) == 0:
        sched["expect"] = {"outcome": "rejected"}
    return toml_doc({"model": model, "target": {"gpu": draw(st.sampled_from(sorted(TARGETS)))},
                     "schedule": [sched]})


@fuzz(60)
@given(text=wellformed_docs())
def test_wellformed_files_lower_or_reject_cleanly(text: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("wellformed") / "fuzz.toml"
    path.write_text(text, encoding="utf-8")
    check_wellformed(path, "amk lower/eval (schema-valid, extreme)")


# -- program JSON ------------------------------------------------------------------------------

BASES = {name: base_program(name).to_json() for name in ("toy1-sm2-s8-ch2-lm128", "toy1-sm4-s8")}
DEEP = "\x00DEEP"  # a placeholder replaced by deep nesting in the JSON text (json.dumps would recurse)
DEEP_JSON = json.dumps(DEEP)[1:-1]  # how json.dumps spells it
json_scalars = st.one_of(st.sampled_from(HUGE), st.integers(), st.floats(), st.booleans(), st.none(),
                         st.sampled_from(WORDS), st.text(max_size=20),
                         st.sampled_from((1000, 5000)).map(lambda n: f"{DEEP}{n}"))
json_values = st.recursive(json_scalars, lambda ch: st.lists(ch, max_size=3) | st.dictionaries(keys, ch, max_size=3),
                           max_leaves=6)


@st.composite
def program_texts(draw: st.DrawFn) -> str | bytes:
    """A small lowered program with edits at random places of its JSON tree, then text edits."""
    doc = json.loads(json.dumps(BASES[draw(st.sampled_from(sorted(BASES)))]))
    for _ in range(draw(st.integers(1, 3))):
        parent: Any = None
        key: Any = None
        node: Any = doc
        for _ in range(draw(st.integers(0, 5))):  # walk down
            if isinstance(node, dict) and node:
                parent, key = node, draw(st.sampled_from(sorted(node)))
            elif isinstance(node, list) and node:
                parent, key = node, draw(st.integers(0, len(node) - 1))
            else:
                break
            node = parent[key]
        op = draw(st.sampled_from(("replace", "delete", "add", "wrap", "swap-type")))
        if parent is None:
            doc = draw(json_values) if op == "replace" else doc
        elif op == "replace":
            parent[key] = draw(json_values)
        elif op == "delete":
            del parent[key]
        elif op == "add" and isinstance(parent, dict):
            parent[draw(keys)] = draw(json_values)
        elif op == "add":
            parent.insert(key, draw(json_values))
        elif op == "wrap":
            parent[key] = [node]
        else:
            parent[key] = {"x": node} if isinstance(node, list) else [node] if isinstance(node, dict) else str(node)
    text = json.dumps(doc, ensure_ascii=draw(st.booleans()))
    while DEEP_JSON in text:
        at = text.index(DEEP_JSON)
        end = text.index('"', at)
        n = int(text[at + len(DEEP_JSON):end])
        text = text[:at - 1] + "[" * n + "]" * n + text[end + 1:]
    edit = draw(st.sampled_from(("none", "none", "none", "truncate", "bom", "garbage", "dup-key", "bytes")))
    if edit == "truncate":
        text = text[:draw(st.integers(0, len(text)))]
    elif edit == "bom":
        text = "\ufeff" + text
    elif edit == "garbage":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(max_size=4)) + text[at:]
    elif edit == "dup-key":
        text = text.replace('{"buffers"', '{"version": 99, "buffers"', 1) if text.startswith("{") else text
    elif edit == "bytes":
        return text.encode("utf-8", "surrogatepass") + draw(st.binary(max_size=8))
    return text


@fuzz(300)
@given(text=program_texts())
def test_validate_json_never_raises(text: str | bytes) -> None:
    res = validate_json(text)
    assert isinstance(res.ok, bool) and (res.ok or res.errors)
    count("validate_json", "ok" if res.ok else "rejected")


@fuzz(120)
@given(text=program_texts())
def test_amk_validate_gives_clean_errors(text: str | bytes, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("validate") / "fuzz.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    code, out, err = amk("validate", str(path))
    assert_clean(code, out, err, path, (0, 1, 2))
    if code in (0, 1):
        assert out.startswith(f"{path}: ") and not err, (out[:300], err[:300])
    count("amk validate", f"exit {code}")


def _edit_task(op: str, base: str = "toy1-sm4-s8", **params: Any) -> str:
    doc = json.loads(json.dumps(BASES[base]))
    next(t for t in doc["tasks"] if t["op"] == op)["params"].update(params)
    return json.dumps(doc)


def _float_threshold() -> str:
    doc = json.loads(json.dumps(BASES["toy1-sm4-s8"]))
    task = next(t for t in doc["tasks"] if t.get("waits"))
    task["waits"][0]["threshold"] += 0.5  # int() would silently truncate it
    return json.dumps(doc)


TARGETED = {  # program JSON found to hang, exhaust memory or escape as an exception before the fixes
    "deep-array": "[" * 100_000 + "]" * 100_000,
    "deep-in-params": json.dumps(BASES["toy1-sm4-s8"]).replace('"params": {', '"params": {"x": ' + "[" * 5000
                                                                + "]" * 5000 + ", ", 1),
    "infinity-shape": json.dumps(BASES["toy1-sm4-s8"]).replace('"shape": [1]', '"shape": [Infinity]', 1),
    "float-threshold": _float_threshold(),
    "4301-digits": json.dumps(BASES["toy1-sm4-s8"]).replace('"shape": [1]', '"shape": [' + "9" * 4301 + "]", 1),
    "int32-max-heads": _edit_task("ATTN_PARTIAL", "toy1-sm2-s8-ch2-lm128", n_heads=2**31 - 1, n_kv_heads=1,
                                  kv_head=0),
    "int32-max-heads-fused": _edit_task("ROPE_ATTN_PARTIAL", n_heads=2**31 - 1, n_kv_heads=1, kv_head=0),
    "int32-max-blocks": _edit_task("ATTN_COMBINE", "toy1-sm2-s8-ch2-lm128", n_blocks=2**31 - 1,
                                   head_hi=2**31 - 1),
    "int32-max-blocks-fused": _edit_task("GEMV", inp_blocks=2**31 - 1, head_dim=1),
    "int32-max-rows": _edit_task("GEMV", n_hi=2**31 - 1, k=2**31 - 1),
}


@pytest.mark.parametrize("name", sorted(TARGETED))
def test_targeted_program_json(name: str, tmp_path: Path) -> None:
    """Each ends in a verdict within a second: validate_json rejects it; `amk validate` exits 1
    (unsafe) or 2 (not a program) with a clean message."""
    t0 = time.perf_counter()
    res = validate_json(TARGETED[name])
    assert not res.ok and time.perf_counter() - t0 < 1.0, res.summary()
    path = tmp_path / f"{name}.json"
    path.write_text(TARGETED[name])
    assert_clean(*amk("validate", str(path)), path, (1, 2))


# -- huge but schema-valid values ---------------------------------------------------------------

EXTREME = [  # (model, max_seq, knobs): inside the schema, far beyond what any run could hold
    ("llama-3.2-1b-shape", 1 << 20, {}),
    ("llama-3.2-1b-shape", 1 << 20, {"tiling.attention.kv_block": 1 << 20}),
    ("llama-3.2-1b-shape", 512, {"tiling.gemv.n_tile": 1, "tiling.lm_head.n_tile": 1}),
    ("toy", 1 << 20, {"tiling.attention.kv_block": 1}),
    ("toy-4L", 1 << 20, {"tiling.attention.kv_block": 1 << 20}),
    # Valid since attention stages KV blocks in bounded chunks: proven, still within the limits.
    ("toy", 1 << 20, {"tiling.attention.kv_block": 1 << 20, "tiling.gemv.n_tile": 1 << 20,
                      "tiling.lm_head.n_tile": 1 << 24, "tiling.attention.combine_heads": 8, "valid": True}),
    ("toy", 64, {"threads_per_block": 4096, "sm_count": 4096, "pipelining_depth": 16}),
    ("toy", 64, {"tiling.attention.combine_heads": 1024}),
]


@pytest.mark.parametrize(("model", "max_seq", "knobs"), EXTREME, ids=lambda v: str(v)[:40])
def test_huge_schema_valid_values_are_rejected_without_building_them(model: str, max_seq: int,
                                                                     knobs: dict[str, Any]) -> None:
    """Lowering (and the validator) decide these within seconds and a few MB: REJECTED with a
    reason, never an out-of-memory."""
    text = f'[model]\nid = "{model}"\nmax_seq = {max_seq}\n[target]\ngpu = "h100"\n[[schedule]]\nname = "x"\n'
    knobs = dict(knobs)
    want = "valid" if knobs.pop("valid", False) else "rejected"
    text += "".join(f"{k} = {v}\n" for k, v in knobs.items())
    sf = parse_text(text, "extreme.toml")
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        program = pipeline.lower_schedule(sf, sf.schedules[0])
        reason = pipeline.prove(program, TARGETS["h100"])
        outcome = "valid"
    except pipeline.Rejected as e:
        reason, outcome = str(e), "rejected"
    seconds, peak = time.perf_counter() - t0, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 20 and peak < 200 << 20, (seconds, peak >> 20, reason)
    assert outcome == want, reason
    words = ("tasks", "GiB", "SMs", "combine_heads", "shared memory")
    assert want == "valid" or any(w in reason for w in words), reason


def test_task_count_is_exact() -> None:
    """The limit is checked on an arithmetic count before building: it matches the lowering."""
    from pytest_amk.lower import lower

    for model, max_seq, over in [("toy", 64, {}), ("toy-4L", 100, {"fusion": [], "tiling.gemv.n_tile": 7}),
                                 ("toy", 33, {"tiling.attention.kv_block": 5, "sm_assignment": "balanced",
                                              "tiling.lm_head.n_tile": 100, "fusion": [["gemv", "silu_mul"]]}),
                                 ("toy", 8, {"sm_count": 3, "tiling.attention.combine_heads": 4})]:
        knobs = {**default_knobs(), **over}
        program = lower(PRESETS[model], TARGETS["h100"], knobs, "bf16", max_seq)
        assert task_count(PRESETS[model], knobs, knobs["sm_count"] or 132, max_seq) == len(program.tasks)
    assert task_count(PRESETS["toy"], default_knobs(), 132, 1 << 20) > MAX_TASKS


# -- collection through pytest -----------------------------------------------------------------

BAD_FILES: dict[str, bytes] = {
    "deep-array.toml": ("fusion = " + "[" * 5000 + "]" * 5000 + "\n").encode(),
    "deep-table.toml": ("[" + ".".join(["a"] * 5000) + "]\n").encode(),
    "huge-int.toml": GOOD.replace("max_seq = 64", "max_seq = 0x" + "f" * 5000).encode(),
    "negative.toml": GOOD.replace("max_seq = 64", "max_seq = -1").encode(),
    "binary.toml": bytes(range(256)) * 4,
    "bom.toml": b"\xef\xbb\xbf" + GOOD.encode(),
    "nul.toml": GOOD.replace("[target]", "[target]\x00").encode(),
    "newline-key.toml": GOOD.replace('name = "default"', 'name = "default"\n"a\\nb" = 1').encode(),
    "table-for-array.toml": b'[model]\nid = "toy"\n[target]\ngpu = "h100"\n[schedule]\nname = "a"\n',
    "long-name.toml": GOOD.replace('"default"', '"' + "n" * 300 + '"').replace("name = \"narrow\"",
                                                                                 'name = "é"').encode(),
    "empty.toml": b"",
}


@pytest.mark.usefixtures("amk")  # tests/conftest.py: an ini file, schedules/, top-level inner runs
def test_collection_of_adversarial_files(pytester: pytest.Pytester) -> None:
    """One pytest run over the bad files and a good one: each bad file is an error naming it
    (and its key), the good one passes, a huge-but-valid one is REJECTED, no INTERNALERROR."""
    for name, data in BAD_FILES.items():
        (pytester.path / "schedules" / name).write_bytes(data)
    (pytester.path / "schedules" / "good.toml").write_text(GOOD.split("[[schedule]]\nname = \"narrow\"")[0])
    (pytester.path / "schedules" / "huge.toml").write_text(
        GOOD.replace('"toy"', '"llama-3.2-1b-shape"').replace("max_seq = 64", "max_seq = 1048576"))
    result = pytester.runpytest("--amk-steps=1", "--amk-device=cpu", "-p", "no:cacheprovider",
                                "-p", "no:hypothesispytest", "-rA")
    out = result.stdout.str() + result.stderr.str()
    assert "INTERNALERROR" not in out and "Traceback" not in out, out[-3000:]
    outcomes = result.parseoutcomes()
    # long-name.toml is well formed ("é" is a fine name; so is a long one): 2 items, both pass.
    bad = [n for n in BAD_FILES if n != "long-name.toml"]
    assert outcomes.get("errors") == len(bad), outcomes
    for name in bad:
        assert f"ERROR schedules/{name}::malformed - " in out and f"\nschedules/{name}: " in out, name
    assert "schedules/newline-key.toml: schedule[0].a\\nb: unknown key" in out
    n = task_count(PRESETS["llama-3.2-1b-shape"], default_knobs(), 132, 1048576)
    assert f"REJECTED schedules/huge.toml::default - the program would have {n} tasks; at most {MAX_TASKS}" in out
    assert re.search(r"PASSED .*schedules/good\.toml::default", out)
    assert outcomes.get("passed") == 1 + 2 and outcomes.get("rejected") == 2, outcomes
