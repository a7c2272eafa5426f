"""The cost model: defaults, the roofline floor, and calibration against synthetic
measurements generated from known constants (no GPU needed)."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import pytest

from pytest_amk import cost
from pytest_amk.ir import BufferKind, Program, get_target
from pytest_amk.lower import LoweringError, lower
from pytest_amk.models import config_for
from pytest_amk.schedule import KNOBS, parse_file
from pytest_amk.search import knob_choices, run_loop

H100 = get_target("h100")
TRUE = cost.Calibration(task_overhead_us=0.7, stage_sync_us=2.5, bw_fraction=0.75, launch_us=3.0)


@functools.cache
def _corpus(n: int = 12, seed: int = 0) -> tuple[tuple[str, dict, Program], ...]:
    """Random valid schedules of toy and toy-4L, lowered for an H100: (model, knobs, program)."""
    rng = random.Random(seed)
    out = []
    for model in ("toy", "toy-4L"):
        while sum(1 for m, _, _ in out if m == model) < n:
            knobs = {name: rng.choice(knob_choices(name)) for name in KNOBS}
            try:
                out.append((model, knobs, lower(config_for(model), H100, knobs, "bf16", 64)))
            except LoweringError:
                continue
    return tuple(out)


def programs() -> list[Program]:
    return [p for _, _, p in _corpus()]


def test_defaults_are_the_documented_formula() -> None:
    for p in programs()[:5]:
        sizes = {b.id: b.dtype.nbytes for b in p.buffers}
        weights = {b.id for b in p.buffers if b.kind is BufferKind.WEIGHT}
        per_sm = H100.hbm_gbps * 1e3 * cost.ACHIEVABLE_BW_FRACTION / p.num_sms
        load = [0.0] * p.num_sms
        for t in p.tasks:
            if t.op == "EMBED":  # one row of the table, whatever the token
                nbytes = (t.params["hi"] - t.params["lo"]) * sizes[t.params["table"]]
            else:
                nbytes = sum((r.hi - r.lo) * sizes[r.buffer] for r in t.reads if r.buffer in weights)
            load[t.sm] += nbytes / per_sm + cost.TASK_OVERHEAD_US
        expected = max(max(load) + cost.STAGE_SYNC_US * len(p.counters), cost.floor_us(p, H100.hbm_gbps))
        assert cost.predict_us(p, H100) == pytest.approx(expected, rel=1e-9)
        assert cost.predict_us(p, H100, calibration=cost.DEFAULT) == cost.predict_us(p, H100)


def test_calibration_recovers_known_constants() -> None:
    points = [(p, cost.predict_us(p, H100, calibration=TRUE)) for p in programs()]
    cal = cost.calibrate(points)
    assert cal.task_overhead_us == pytest.approx(TRUE.task_overhead_us, rel=1e-6)
    assert cal.stage_sync_us == pytest.approx(TRUE.stage_sync_us, rel=1e-6)
    assert cal.bw_fraction == pytest.approx(TRUE.bw_fraction, rel=1e-6)
    assert cal.launch_us == pytest.approx(TRUE.launch_us, rel=1e-6)
    assert cal.points == len(points) and cal.gpu == "h100"
    assert cal.mape is not None and cal.mape < 1e-6
    assert cal.default_mape is not None and cal.default_mape > 10  # the defaults were far off
    assert "mean abs error 0.0%" in cal.describe()


def test_calibration_on_noisy_measurements_reports_its_error() -> None:
    rng = random.Random(1)
    points = [(p, cost.predict_us(p, H100, calibration=TRUE) * (1 + rng.uniform(-0.03, 0.03))) for p in programs()]
    cal = cost.calibrate(points)
    assert cal.mape is not None and cal.default_mape is not None
    assert 0 < cal.mape < 3 < cal.default_mape
    assert cal.bw_fraction == pytest.approx(TRUE.bw_fraction, rel=0.1)
    assert cal.task_overhead_us == pytest.approx(TRUE.task_overhead_us, rel=0.25)


def test_calibration_from_corpus_rows() -> None:
    rows = [{"model": m, "dtype": "bf16", "gpu": "h100", "max_seq": 64, "knobs": k,
             "latency_us": cost.predict_us(p, H100, calibration=TRUE), "latency_kind": "measured-gpu"}
            for m, k, p in _corpus()[::2]]
    rows.append({**rows[0], "latency_us": 1.0, "latency_kind": "predicted"})  # predictions are not fitted
    cal = cost.calibrate(json.loads(json.dumps(rows)))  # as read back from corpus.jsonl
    assert cal.points == len(rows) - 1
    assert cal.bw_fraction == pytest.approx(TRUE.bw_fraction, rel=1e-6)
    with pytest.raises(ValueError, match="no measured latencies"):
        cost.calibrate([rows[-1]])


def test_predictions_never_below_the_floor() -> None:
    fitted = cost.calibrate([(p, cost.floor_us(p, H100.hbm_gbps)) for p in programs()])  # all at the floor
    extremes = [cost.DEFAULT, TRUE, fitted, cost.Calibration(0.0, 0.0, 1.0, 0.0)]
    for p in programs():
        max_seq = int(p.meta["max_seq"])
        for cal in extremes:
            for seq in (1, max_seq):
                assert cost.predict_us(p, H100, seq, calibration=cal) >= cost.floor_us(p, H100.hbm_gbps, seq)
    assert fitted.points == len(programs()) and fitted.mape is not None


def test_calibration_file_and_using(tmp_path: Path) -> None:
    assert cost.load_calibration(tmp_path, "h100") is None
    cal = cost.Calibration(1.0, 2.0, 0.5, 0.0, gpu="h100", points=3, mape=1.0, default_mape=9.0)
    cost.save_calibration(tmp_path, cal)
    assert cost.load_calibration(tmp_path, "h100") == cal
    assert cost.load_calibration(tmp_path, "a100") is None
    p = programs()[0]
    before = cost.predict_us(p, H100)
    with cost.using(cal):
        assert cost.predict_us(p, H100) == cost.predict_us(p, H100, calibration=cal) != before
    assert cost.predict_us(p, H100) == before


def test_search_uses_the_calibration_in_its_directory(tmp_path: Path) -> None:
    f = tmp_path / "toy.toml"
    f.write_text('[model]\nid = "toy"\ndtype = "fp32"\nmax_seq = 16\n\n[target]\ngpu = "h100"\n\n'
                 '[[schedule]]\nname = "default"\n')
    sf = parse_file(f)
    plain = run_loop(sf, sf.schedules[0], 1, tmp_path / "a", device="cpu", steps=1)
    cost.save_calibration(tmp_path / "b", cost.Calibration(**{**TRUE.to_json(), "gpu": "h100", "points": 5,
                                                               "mape": 1.0, "default_mape": 20.0}))
    calibrated = run_loop(sf, sf.schedules[0], 1, tmp_path / "b", device="cpu", steps=1)
    assert ":model:" in plain.experiment and ":model-cal:" in calibrated.experiment
    assert "calibrated on 5 measurements" in calibrated.calibration
    program = lower(config_for("toy"), H100, sf.schedules[0].knobs, "fp32", 16)
    start = calibrated.start
    assert start is not None and start.latency_us == pytest.approx(cost.predict_us(program, H100, calibration=TRUE))
    assert plain.start is not None and plain.start.latency_us == pytest.approx(cost.predict_us(program, H100))
