from __future__ import annotations

import torch

from pytest_amk.oracle import TOLERANCES, compare_logits


def test_tolerances_are_ordered_by_precision() -> None:
    assert TOLERANCES["fp32"][0] < TOLERANCES["fp16"][0] <= TOLERANCES["bf16"][0]


def test_equal_and_perturbed_logits() -> None:
    ref = torch.randn(100)
    assert compare_logits(ref.clone(), ref, "fp32").ok
    bad = ref.clone()
    bad[7] += 1.0
    c = compare_logits(bad, ref, "bf16")
    assert not c.ok and "index 7" in c.message


def test_top1_disagreement_fails_unless_near_tie() -> None:
    ref = torch.zeros(10)
    ref[3], ref[4] = 1.0, 0.99999
    got = ref.clone()
    got[3], got[4] = 0.99999, 1.0
    assert compare_logits(got, ref, "bf16").ok  # a near-tie that rounding may flip
    ref2 = torch.zeros(10)
    ref2[3] = 0.5
    got2 = ref2.clone()
    got2[4] = 0.6
    c = compare_logits(got2, ref2, "fp32")
    assert not c.ok


def test_nan_fails() -> None:
    ref = torch.randn(10)
    got = ref.clone()
    got[2] = float("nan")
    c = compare_logits(got, ref, "bf16")
    assert not c.ok and "non-finite" in c.message
