"""Regression test of the effect: on the shipped ToyWorld model, VSF at its defaults removes the companion.

Fixed seeds, CPU, 8 images per (primary, companion) pair. The thresholds sit well inside the gap measured
when the weights were committed (see docs/toyworld.md), so they catch a method or adapter that stops
working, not noise.
"""

from __future__ import annotations

import numpy as np
import pytest

from negguide.toyworld import load
from negguide.toyworld.bench import generate
from negguide.toyworld.world import PAIRS
from negguide.toyworld.world import score

N = 8


@pytest.fixture(scope="module")
def measured() -> dict[str, dict[str, float]]:
    pipe = load()
    out = {}
    for method in ("none", "vsf"):
        scores = [score(generate(pipe, method, {}, pos, neg, N), pos, neg) for pos, neg in PAIRS]
        out[method] = {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}
    return out


def test_unguided_model_draws_the_companion(measured: dict[str, dict[str, float]]) -> None:
    assert measured["none"]["positive"] >= 0.9
    assert measured["none"]["removed"] <= 0.3


def test_vsf_removes_the_companion_and_keeps_the_primary(measured: dict[str, dict[str, float]]) -> None:
    """VSF at its defaults removes the companion far more often than no guidance, with the primary kept."""
    none, vsf = measured["none"], measured["vsf"]
    assert vsf["removed"] - none["removed"] >= 0.4, measured
    assert vsf["positive"] >= 0.8, measured
