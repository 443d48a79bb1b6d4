"""Helpers shared by the statistical layer tests."""

from __future__ import annotations

import math

from torch import Tensor


# An input each kind accepts with a float rate (a population puts its axis in front).
SHAPES = {
    "none": (4, 6),
    "standard": (4, 6),
    "spatial": (4, 3, 5),
    "variational": (4, 5, 3),
    "gaussian": (4, 6),
    "alpha": (4, 6),
    "dropblock": (2, 3, 6, 6),
    "droppath": (4, 6),
    "embedding": (4, 6),
}


def close(actual: Tensor, expected: Tensor) -> Tensor:
    """Element-wise float32 equality up to rounding (|a - e| <= 1e-6·|e|); cheaper than isclose."""
    return (actual - expected).abs() <= 1e-6 * expected.abs()


def assert_fraction(count: int, n: int, p: float, what: str) -> None:
    """Binomial count of n trials with success probability p: σ = sqrt(p(1-p)/n), bound 5σ."""
    frac = count / n
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(frac - p) < 5 * sigma, f"{what}: {frac:.5f}, expected {p} ± {5 * sigma:.5f}"
