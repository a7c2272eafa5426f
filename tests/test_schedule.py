"""Schedule files (DESIGN §2): parsing, defaults, and a ScheduleError naming the key
for every kind of malformed file."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_amk.ir import TARGETS
from pytest_amk.schedule import (
    FUSIONS,
    KNOBS,
    ScheduleError,
    default_knobs,
    parse_file,
    parse_text,
    search_space,
)

REPO = Path(__file__).resolve().parent.parent
HEAD = '[model]\nid = "toy"\n\n[target]\ngpu = "h100"\n\n'


def parse(text: str, gpu: str | None = None):  # type: ignore[no-untyped-def]
    return parse_text(text, "f.toml", gpu)


def test_full_example() -> None:
    sf = parse("""
[model]
id = "toy-4L"
dtype = "fp16"
seed = 7
max_seq = 256

[target]
gpu = "a100"

[[schedule]]
name = "default"

[[schedule]]
name = "tuned.v2"
pipelining_depth = 4
threads_per_block = 512
sm_assignment = "balanced"
tiling.gemv.n_tile = 64
tiling.attention.kv_block = 128
fusion = [["rmsnorm", "gemv"]]

[schedule.expect]
outcome = "rejected"
reason = "something"
""")
    assert (sf.model.id, sf.model.dtype, sf.model.seed, sf.model.max_seq, sf.gpu) == ("toy-4L", "fp16", 7, 256, "a100")
    first, second = sf.schedules
    assert first.name == "default" and first.knobs == default_knobs() and first.changed_knobs() == {}
    assert second.name == "tuned.v2"
    assert second.changed_knobs() == {
        "pipelining_depth": 4, "threads_per_block": 512, "sm_assignment": "balanced",
        "tiling.gemv.n_tile": 64, "tiling.attention.kv_block": 128, "fusion": [["rmsnorm", "gemv"]],
    }
    assert second.expect.outcome == "rejected" and second.expect.reason == "something"
    assert first.knob_digest() != second.knob_digest()


def test_model_defaults() -> None:
    sf = parse(HEAD + '[[schedule]]\nname = "a"\n')
    assert (sf.model.dtype, sf.model.seed, sf.model.max_seq) == ("bf16", 0, 512)
    assert sf.schedules[0].expect.outcome == "pass"


def test_gpu_override() -> None:
    assert parse(HEAD + '[[schedule]]\nname = "a"\n', gpu="l4").gpu == "l4"
    no_target = '[model]\nid = "toy"\n[[schedule]]\nname = "a"\n'
    assert parse(no_target, gpu="h200").gpu == "h200"


@pytest.mark.parametrize("path", sorted((REPO / "schedules").glob("*.toml")), ids=lambda p: p.name)
def test_example_schedules_parse(path: Path) -> None:
    sf = parse_file(path)
    assert sf.gpu in TARGETS and sf.schedules


def test_search_space_describes_every_knob() -> None:
    space = search_space()
    assert set(space) == set(KNOBS)
    for name, knob in space.items():
        assert knob["default"] == KNOBS[name].default
        assert {"type", "choices", "doc"} <= set(knob)
        if knob["type"] == "int":
            lo, hi = knob["range"]
            assert all(lo <= c <= hi for c in knob["choices"])
            assert lo <= knob["default"] <= hi
    assert [list(f) for f in FUSIONS if f != ("attn_combine", "gemv")] == space["fusion"]["default"]


# Every malformed case: (text, the key the error must name, a word of the reason).
MALFORMED = {
    "bad TOML": ('[model\nid = "toy"\n', "", "invalid TOML"),
    "TOML 1.1 inline table newline": ('[model]\nid = "toy"\n[target]\ngpu = "h100"\n[[schedule]]\n'
                                      'name = "a"\ntiling = {\n  gemv = 8 }\n', "", "invalid TOML"),
    "empty file": ("", "model", "missing [model]"),
    "missing model": ('[target]\ngpu = "h100"\n[[schedule]]\nname = "a"\n', "model", "missing"),
    "missing model id": ('[model]\ndtype = "bf16"\n[target]\ngpu = "h100"\n[[schedule]]\nname = "a"\n',
                         "model.id", "missing"),
    "unknown model": ('[model]\nid = "gpt-5"\n[target]\ngpu = "h100"\n[[schedule]]\nname = "a"\n',
                      "model.id", "unknown model"),
    "model wrong type": ('[model]\nid = "toy"\nmax_seq = "long"\n[[schedule]]\nname = "a"\n', "model.max_seq",
                         "expected int"),
    "model bool for int": ('[model]\nid = "toy"\nseed = true\n[[schedule]]\nname = "a"\n', "model.seed",
                           "expected int"),
    "unknown model key": ('[model]\nid = "toy"\nflavour = "x"\n[[schedule]]\nname = "a"\n', "model.flavour",
                          "unknown key"),
    "bad dtype": ('[model]\nid = "toy"\ndtype = "int8"\n[[schedule]]\nname = "a"\n', "model.dtype", "int8"),
    "max_seq out of range": ('[model]\nid = "toy"\nmax_seq = 0\n[[schedule]]\nname = "a"\n', "model.max_seq",
                             "out of range"),
    "unknown top-level key": (HEAD + '[compiler]\nflags = 1\n[[schedule]]\nname = "a"\n', "compiler",
                              "unknown top-level key"),
    "unknown GPU": ('[model]\nid = "toy"\n[target]\ngpu = "v100"\n[[schedule]]\nname = "a"\n', "target.gpu",
                    "unknown GPU 'v100'"),
    "missing GPU": ('[model]\nid = "toy"\n[[schedule]]\nname = "a"\n', "target.gpu", "missing"),
    "unknown target key": ('[model]\nid = "toy"\n[target]\ngpu = "h100"\nsms = 3\n[[schedule]]\nname = "a"\n',
                           "target.sms", "unknown key"),
    "no schedule": (HEAD, "schedule", "at least one"),
    "schedule not array": (HEAD + '[schedule]\nname = "a"\n', "schedule", "at least one"),
    "missing name": (HEAD + "[[schedule]]\nthreads_per_block = 128\n", "schedule[0].name", "needs a name"),
    "bad name": (HEAD + '[[schedule]]\nname = "a b"\n', "schedule[0].name", "needs a name"),
    "duplicate name": (HEAD + '[[schedule]]\nname = "a"\n[[schedule]]\nname = "a"\n', "schedule[1].name",
                       "duplicate"),
    "unknown knob": (HEAD + '[[schedule]]\nname = "a"\nwarp_specialize = true\n', "schedule[0].warp_specialize",
                     "unknown key"),
    "unknown nested knob": (HEAD + '[[schedule]]\nname = "a"\ntiling.gemv.m_tile = 8\n',
                            "schedule[0].tiling.gemv.m_tile", "unknown key"),
    "knob wrong type": (HEAD + '[[schedule]]\nname = "a"\nthreads_per_block = "256"\n',
                        "schedule[0].threads_per_block", "expected an integer"),
    "knob float": (HEAD + '[[schedule]]\nname = "a"\npipelining_depth = 2.0\n', "schedule[0].pipelining_depth",
                   "expected an integer"),
    "knob bool": (HEAD + '[[schedule]]\nname = "a"\nsm_count = true\n', "schedule[0].sm_count",
                  "expected an integer"),
    "knob out of range": (HEAD + '[[schedule]]\nname = "a"\npipelining_depth = 99\n',
                          "schedule[0].pipelining_depth", "out of range"),
    "knob not a multiple": (HEAD + '[[schedule]]\nname = "a"\nthreads_per_block = 100\n',
                            "schedule[0].threads_per_block", "multiple of 32"),
    "bad choice": (HEAD + '[[schedule]]\nname = "a"\nsm_assignment = "random"\n', "schedule[0].sm_assignment",
                   "'random' is not one of"),
    "bad fusion": (HEAD + '[[schedule]]\nname = "a"\nfusion = [["gemv", "softmax"]]\n', "schedule[0].fusion",
                   "unknown fusion"),
    "fusion not pairs": (HEAD + '[[schedule]]\nname = "a"\nfusion = ["rmsnorm"]\n', "schedule[0].fusion",
                         "list of pairs"),
    "bad expect outcome": (HEAD + '[[schedule]]\nname = "a"\nexpect.outcome = "fail"\n',
                           "schedule[0].expect.outcome", "'fail'"),
    "unknown expect key": (HEAD + '[[schedule]]\nname = "a"\nexpect.why = "x"\n', "schedule[0].expect.why",
                           "unknown key"),
    "expect reason type": (HEAD + '[[schedule]]\nname = "a"\nexpect.reason = 3\n', "schedule[0].expect.reason",
                           "expected a string"),
}


@pytest.mark.parametrize(("text", "key", "reason"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_names_file_and_key(text: str, key: str, reason: str) -> None:
    with pytest.raises(ScheduleError) as exc:
        parse(text)
    e = exc.value
    assert e.path == "f.toml"
    assert e.key == key
    assert reason in e.reason
    assert str(e).startswith(f"f.toml: {key}: " if key else "f.toml: ")


def test_unknown_gpu_override_names_the_option() -> None:
    with pytest.raises(ScheduleError) as exc:
        parse(HEAD + '[[schedule]]\nname = "a"\n', gpu="v100")
    assert exc.value.key == "--amk-gpu" and "v100" in exc.value.reason


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ScheduleError, match="cannot read"):
        parse_file(tmp_path / "missing.toml")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ScheduleError) as exc:
        parse_file(binary)
    assert exc.value.path == str(binary)


def test_values_inside_the_schema_but_beyond_the_target_parse() -> None:
    # Too many threads for any GPU is a REJECTED schedule (lowering/validator), not a malformed file.
    sf = parse(HEAD + '[[schedule]]\nname = "a"\nthreads_per_block = 2048\nsm_count = 4000\n')
    assert sf.schedules[0].knobs["threads_per_block"] == 2048
