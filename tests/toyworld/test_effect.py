"""Regression test of the effect: on the shipped ToyWorld model, VSF at its defaults removes the companion,
and VSF on top of the pipeline's own CFG does so with the primary always kept.

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
    settings = {
        "none": ("none", {}, 0.0),
        "vsf": ("vsf", {}, 0.0),
        "cfg2": ("none", {}, 2.0),
        "vsf+cfg2": ("vsf", {"scale": 12.0, "bias": 1.5}, 2.0),
    }
    for key, (method, params, guidance_scale) in settings.items():
        scores = [
            score(generate(pipe, method, params, pos, neg, N, guidance_scale=guidance_scale), pos, neg)
            for pos, neg in PAIRS
        ]
        out[key] = {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}
    return out


def test_unguided_model_draws_the_companion(measured: dict[str, dict[str, float]]) -> None:
    assert measured["none"]["positive"] >= 0.9
    assert measured["none"]["removed"] <= 0.3


def test_vsf_removes_the_companion_and_keeps_the_primary(measured: dict[str, dict[str, float]]) -> None:
    """VSF at its defaults removes the companion far more often than no guidance, with the primary kept."""
    none, vsf = measured["none"], measured["vsf"]
    assert vsf["removed"] - none["removed"] >= 0.4, measured
    assert vsf["positive"] >= 0.8, measured


def test_vsf_beside_the_pipelines_cfg_removes_the_companion_and_keeps_the_primary(
    measured: dict[str, dict[str, float]],
) -> None:
    """The pipeline's CFG (guidance_scale 2, empty negative) keeps the primary but does not remove the companion;
    VSF (scale 12, bias 1.5) beside it removes the companion as well."""
    cfg, both = measured["cfg2"], measured["vsf+cfg2"]
    assert cfg["positive"] >= 0.9 and cfg["removed"] <= 0.3, measured
    assert both["removed"] - cfg["removed"] >= 0.5, measured
    assert both["positive"] >= 0.9 and both["clean"] >= 0.97, measured
