"""NASA: Z+ - alpha Z- on the same segments as NAG."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from negguide.attention import contrast
from negguide.errors import ConfigError
from negguide.plugins.nasa import NASAConfig
from negguide.plugins.nasa import NegativeAwaySteerAttention
from tests import references
from tests.strategies import segments
from tests.strategies import several

SETTINGS = settings(max_examples=20, deadline=None)


def nasa(seg, alpha, path="dense"):
    return NegativeAwaySteerAttention(NASAConfig(scale=alpha, attention=path)).attend(seg)


def _attn64(q, k, v):
    return torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v.double()


@pytest.mark.parametrize("path", ["dense", "split"])
@SETTINGS
@given(seg=segments(masked=False), alpha=st.floats(0, 3))
def test_matches_reference(path, seg, alpha):
    """Image output equals Z+ - alpha Z- with Z+/Z- computed in float64."""
    if seg.layout == "joint":
        zp = _attn64(seg.q_img, torch.cat([seg.k_img, seg.k_pos], 2), torch.cat([seg.v_img, seg.v_pos], 2))
        zn = _attn64(seg.q_img, torch.cat([seg.k_img, seg.k_neg], 2), torch.cat([seg.v_img, seg.v_neg], 2))
    else:
        zp, zn = _attn64(seg.q_img, seg.k_pos, seg.v_pos), _attn64(seg.q_img, seg.k_neg, seg.v_neg)
    torch.testing.assert_close(nasa(seg, alpha, path).img.double(), zp - alpha * zn, rtol=1e-4, atol=1e-5)


@SETTINGS
@given(seg=segments())
def test_alpha_zero_is_positive_branch(seg):
    """alpha = 0 gives Z+ (the unguided output)."""
    torch.testing.assert_close(nasa(seg, 0.0).img, contrast(seg).z_pos)


@SETTINGS
@given(seg=segments(), a1=st.floats(0, 3), a2=st.floats(0, 3))
def test_linear_in_alpha(seg, a1, a2):
    """The output is affine in alpha."""
    torch.testing.assert_close(
        nasa(seg, a1).img + nasa(seg, a2).img, 2 * nasa(seg, (a1 + a2) / 2).img, rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@settings(max_examples=5, deadline=None)
@given(data=st.data())
def test_keeps_dtype(dtype, data):
    seg = data.draw(segments(dtype=dtype))
    out = nasa(seg, 0.5, "split")
    assert out.img.dtype == dtype and out.img.shape == seg.q_img.shape


def test_bad_scale():
    with pytest.raises(ConfigError, match="nasa: expected `scale` >= 0"):
        NegativeAwaySteerAttention.make_config({"scale": -0.1})


@pytest.mark.parametrize("path", ["dense", "split"])
@SETTINGS
@given(seg=several(), alpha=st.floats(0, 3))
def test_several_weighted_negatives_match_float64(path, seg, alpha):
    """Z = Z+ - alpha sum_i w_i Z-_i (float64 reference, padding masks included)."""
    out = nasa(seg, alpha, path)
    torch.testing.assert_close(out.img.double(), references.nasa64(seg, alpha), rtol=1e-4, atol=1e-4)
