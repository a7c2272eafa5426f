"""Logit equivalence and token agreement, with tolerances per dtype (defined once here).

Logits match when ``max|got - ref| <= atol + rtol * max|ref|``. Top-1 agrees when
the chosen tokens are equal, or when ``ref`` itself cannot tell them apart: the
reference logit of the token ``got`` chose is within the tolerance of the
reference maximum (a near-tie that rounding may flip).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TOLERANCES: dict[str, tuple[float, float]] = {
    # dtype: (atol, rtol) on fp32 logits
    "fp32": (1e-3, 1e-4),
    "fp16": (3e-2, 1e-2),
    "bf16": (8e-2, 2e-2),
}


@dataclass(frozen=True)
class Comparison:
    ok: bool
    max_abs_err: float
    tolerance: float
    top1_agree: bool
    message: str


def compare_logits(got: Any, ref: Any, dtype: str, what: str = "logits") -> Comparison:
    """Compare two fp32 logit vectors (torch tensors)."""
    import torch

    got, ref = got.float().reshape(-1), ref.float().reshape(-1)
    if got.shape != ref.shape:
        return Comparison(False, float("inf"), 0.0, False, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}")
    atol, rtol = TOLERANCES[dtype]
    tol = atol + rtol * float(ref.abs().max())
    diff = (got - ref).abs()
    if not bool(torch.isfinite(got).all()):
        bad = int((~torch.isfinite(got)).nonzero()[0])
        return Comparison(False, float("inf"), tol, False, f"{what}: non-finite value at index {bad}")
    err = float(diff.max())
    g, r = int(got.argmax()), int(ref.argmax())
    top1 = g == r or float(ref[r] - ref[g]) <= tol
    if err > tol:
        i = int(diff.argmax())
        msg = (f"{what}: max abs error {err:.3g} > tolerance {tol:.3g} ({dtype}) at index {i}: "
               f"got {float(got[i]):.6g}, expected {float(ref[i]):.6g}")
    elif not top1:
        msg = f"{what}: top-1 token {g} != expected {r} (logits {float(ref[g]):.4g} vs {float(ref[r]):.4g})"
    else:
        msg = f"{what}: max abs error {err:.3g} <= {tol:.3g} ({dtype}), top-1 {g}"
    return Comparison(err <= tol and top1, err, tol, top1, msg)
