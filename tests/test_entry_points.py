"""The example third-party plugin (examples/negguide-example), found through its entry point.

CI installs it (`bash scripts/setup.sh` runs `pip install -e examples/negguide-example`); where it
is not installed this module is skipped.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import negguide
from negguide import registry
from negguide import tiny
from negguide.method import Segments
from tests.strategies import segments

negguide_example = pytest.importorskip("negguide_example")

pytestmark = pytest.mark.entry_points

NAME = "perpneg"  # the method's name; "example" is the entry point's


@pytest.fixture
def entry_pm(monkeypatch):
    """A fresh manager that loads every installed entry point."""
    monkeypatch.delenv("NEGGUIDE_LOAD_PLUGINS", raising=False)
    return registry.get_plugin_manager()


def test_entry_point_registers_the_method(entry_pm):
    """The method comes from the `example` entry point of the negguide-example distribution."""
    cls, info = registry.methods(entry_pm)[NAME]
    assert cls is negguide_example.PerpendicularNegative
    assert (info.name, info.package) == ("example", "negguide-example")
    assert info.version == "0.1.0"
    assert NAME in negguide.list_methods(entry_pm)


def test_not_loaded_without_entry_points():
    """`get_plugin_manager(entry_points=False)` has the built-ins only."""
    assert NAME not in registry.methods(registry.get_plugin_manager(entry_points=False))


@pytest.mark.parametrize(
    ("value", "loaded"),
    [("", False), ("example", True), ("other", False), ("other, example", True)],
)
def test_negguide_load_plugins(monkeypatch, value, loaded):
    """NEGGUIDE_LOAD_PLUGINS lists the entry points to load; empty loads none; built-ins always load."""
    monkeypatch.setenv("NEGGUIDE_LOAD_PLUGINS", value)
    found = registry.methods(registry.get_plugin_manager())
    assert (NAME in found) is loaded
    assert {"cfg", "nag", "nasa", "vsf"} <= set(found)


def _run(pipe):
    kwargs = {**tiny.CALL_KWARGS["sd3"], "num_inference_steps": 2, "guidance_scale": 0.0}
    return pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images


def test_runs_end_to_end(sd3_pipe, entry_pm):
    """On a tiny SD3 pipeline the plugin changes the picture; with scale 0 it gives the unguided one."""
    base = _run(sd3_pipe)
    with negguide.apply(sd3_pipe, NAME, negative_prompt="x", pm=entry_pm) as handle:
        assert type(handle.method) is negguide_example.PerpendicularNegative
        guided = _run(sd3_pipe)
    assert guided.shape == base.shape
    assert np.abs(guided - base).max() > 1e-4
    with negguide.apply(sd3_pipe, NAME, negative_prompt="x", scale=0.0, pm=entry_pm):
        off = _run(sd3_pipe)
    np.testing.assert_allclose(off, base, atol=1e-5)


def test_config_fields_are_described():
    """Like the built-ins' (tests/test_docs.py), every parameter of the example has a description."""
    fields = negguide_example.PerpNegConfig.model_fields
    assert {"scale", "attention", "layers", "start", "stop", "enabled"} <= set(fields)
    assert all(f.description for f in fields.values())


def test_config_is_validated(entry_pm, sd3_pipe):
    """Out-of-range parameters fail with the method's name, before anything is patched."""
    with pytest.raises(negguide.ConfigError, match=r"perpneg: expected `scale` >= 0.0, got -1.0"):
        negguide.apply(sd3_pipe, NAME, negative_prompt="x", scale=-1.0, pm=entry_pm)


# ---------------------------------------------------------------------------------- the math


def _attn64(q, k, v, key_mask=None):
    logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], -math.inf)
    return torch.softmax(logits, -1) @ v.double()


def _reference(seg: Segments, scale: float) -> torch.Tensor:
    """Z+ - scale * (Z- - <Z-, Z+> / <Z+, Z+> Z+), per token over heads x head_dim, in float64."""
    if seg.layout == "joint":
        mask = None
        if seg.neg_mask is not None:
            img_keys = torch.ones(seg.k_img.shape[0], seg.k_img.shape[2], dtype=torch.bool)
            mask = torch.cat([img_keys, seg.neg_mask], dim=1)
        zp = _attn64(seg.q_img, torch.cat([seg.k_img, seg.k_pos], 2), torch.cat([seg.v_img, seg.v_pos], 2))
        zn = _attn64(seg.q_img, torch.cat([seg.k_img, seg.k_neg], 2), torch.cat([seg.v_img, seg.v_neg], 2), mask)
    else:
        zp = _attn64(seg.q_img, seg.k_pos, seg.v_pos)
        zn = _attn64(seg.q_img, seg.k_neg, seg.v_neg, seg.neg_mask)
    dot = (zp * zn).sum(dim=(1, 3), keepdim=True)
    norm2 = (zp * zp).sum(dim=(1, 3), keepdim=True)
    return zp - scale * (zn - dot / norm2 * zp)


def _perpneg(seg, scale, path):
    method = negguide_example.PerpendicularNegative(negguide_example.PerpNegConfig(scale=scale, attention=path))
    return method.attend(seg)


@pytest.mark.parametrize("path", ["dense", "split"])
@settings(max_examples=20, deadline=None)
@given(seg=segments(masked=False), scale=st.floats(0.0, 3.0))
def test_matches_float64_reference(path, seg, scale):
    """The image output equals the perpendicular-negative formula computed in float64."""
    out = _perpneg(seg, scale, path).img
    assert out.shape == seg.q_img.shape and out.dtype == seg.q_img.dtype
    torch.testing.assert_close(out.double(), _reference(seg, scale), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", ["dense", "split"])
def test_padded_negative_tokens_are_ignored(path):
    """Per-row negatives of different lengths: the padding keys take no part (joint layout)."""
    g = torch.Generator().manual_seed(0)

    def t(n):
        return torch.randn(2, 2, n, 8, generator=g)

    mask = torch.tensor([[True, True, True], [True, False, False]])
    seg = Segments.one("joint", t(5), t(5), t(5), t(4), t(4), t(4), t(3), t(3), t(3), mask)
    torch.testing.assert_close(_perpneg(seg, 1.5, path).img.double(), _reference(seg, 1.5), rtol=1e-4, atol=1e-5)


def test_parallel_negative_changes_nothing():
    """A negative output parallel to the positive one has no orthogonal part: the output is Z+."""
    z_pos = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(1))
    for factor in (-2.0, 0.5, 1.0, 3.0):
        torch.testing.assert_close(negguide_example.perp_combine(z_pos, factor * z_pos, 2.0), z_pos)


def test_zero_positive_output_subtracts_the_whole_negative():
    """Z+ = 0 has no direction: the whole of Z- counts as orthogonal (and nothing is NaN)."""
    z_neg = torch.randn(1, 2, 3, 4, generator=torch.Generator().manual_seed(2))
    out = negguide_example.perp_combine(torch.zeros_like(z_neg), z_neg, 0.5)
    torch.testing.assert_close(out, -0.5 * z_neg)
