"""Normalized Attention Guidance: invariants against a float64 reference of the formula."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from negguide.errors import ConfigError
from negguide.method import Segments
from negguide.plugins.nag import NAGConfig
from negguide.plugins.nag import NormalizedAttentionGuidance
from negguide.plugins.nag import nag_combine
from tests import references
from tests.strategies import segments
from tests.strategies import several

SETTINGS = settings(max_examples=20, deadline=None)
scales = st.floats(1.0, 10.0)
taus = st.floats(1.0, 5.0)
blend = st.floats(0.0, 1.0)


def tensors(seed: int, shape=(2, 3, 5, 4)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)


def reference(z_pos, z_neg, s, tau, alpha):
    """The paper's NAG in float64, with heads merged into channels before the norm."""
    b, h, n, d = z_pos.shape
    zp = z_pos.double().transpose(1, 2).reshape(b, n, h * d)
    zn = z_neg.double().transpose(1, 2).reshape(b, n, h * d)
    phi = s - 1
    zt = zp + phi * (zp - zn)
    r = zt.abs().sum(-1, keepdim=True) / zp.abs().sum(-1, keepdim=True)
    zh = zt * torch.minimum(r, torch.full_like(r, tau)) / r
    out = alpha * zh + (1 - alpha) * zp
    return out.reshape(b, n, h, d).transpose(1, 2)


@SETTINGS
@given(seed=st.integers(0, 10**6), s=scales, tau=taus, alpha=blend)
def test_matches_reference(seed, s, tau, alpha):
    """nag_combine equals the float64 formula (merged-head L1 norms)."""
    zp, zn = tensors(seed)
    torch.testing.assert_close(
        nag_combine(zp, zn, s, tau, alpha).double(), reference(zp, zn, s, tau, alpha), rtol=1e-5, atol=1e-5
    )


@SETTINGS
@given(seed=st.integers(0, 10**6), s=scales, tau=taus, alpha=blend)
def test_noop_parameters(seed, s, tau, alpha):
    """scale = 1, or alpha = 0, or Z- = Z+ gives Z+."""
    zp, zn = tensors(seed)
    torch.testing.assert_close(nag_combine(zp, zn, 1.0, tau, alpha), zp)
    torch.testing.assert_close(nag_combine(zp, zn, s, tau, 0.0), zp)
    torch.testing.assert_close(nag_combine(zp, zp, s, tau, alpha), zp)


@SETTINGS
@given(seed=st.integers(0, 10**6), s=scales, tau=taus)
def test_norm_is_capped(seed, s, tau):
    """Per token, ||Z^||_1 <= tau ||Z+||_1 (alpha = 1 exposes Z^)."""
    zp, zn = tensors(seed)
    out = nag_combine(zp, zn, s, tau, 1.0)
    assert (out.abs().sum((1, 3)) <= tau * zp.abs().sum((1, 3)) * (1 + 1e-5) + 1e-6).all()


@SETTINGS
@given(seed=st.integers(0, 10**6), s=scales, alpha=blend)
def test_tau_infinite_is_linear_extrapolation(seed, s, alpha):
    """tau -> inf gives Z+ + alpha (s - 1)(Z+ - Z-)."""
    zp, zn = tensors(seed)
    ref = zp + alpha * (s - 1) * (zp - zn)
    torch.testing.assert_close(nag_combine(zp, zn, s, math.inf, alpha), ref, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(seed=st.integers(0, 10**6), s=scales, tau=taus, alpha=blend, c=st.floats(-5, 5).filter(lambda c: abs(c) > 0.1))
def test_homogeneous_degree_one(seed, s, tau, alpha, c):
    """NAG(c Z+, c Z-) = c NAG(Z+, Z-)."""
    zp, zn = tensors(seed)
    torch.testing.assert_close(
        nag_combine(c * zp, c * zn, s, tau, alpha), c * nag_combine(zp, zn, s, tau, alpha), rtol=1e-4, atol=1e-5
    )


@SETTINGS
@given(seed=st.integers(0, 10**6), s=scales, tau=taus)
def test_clamp_keeps_direction(seed, s, tau):
    """The clamp rescales each token of Z~ by a positive factor: the direction never changes."""
    zp, zn = tensors(seed)
    z_hat = nag_combine(zp, zn, s, tau, 1.0).double()
    z_tilde = (s * zp - (s - 1) * zn).double()
    cos = torch.nn.functional.cosine_similarity(
        z_hat.transpose(1, 2).flatten(2), z_tilde.transpose(1, 2).flatten(2), dim=-1
    )
    assert (cos > 1 - 1e-6).all()


def test_zero_positive_norm_gives_no_nan():
    """||Z+||_1 = 0 is guarded: no NaN."""
    zp = torch.zeros(1, 2, 3, 4)
    zn = torch.randn(1, 2, 3, 4)
    out = nag_combine(zp, zn, 5.0, 2.5, 0.5)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("path", ["dense", "split"])
@SETTINGS
@given(seg=segments(), s=scales, tau=taus, alpha=blend)
def test_attend_matches_reference(path, seg, s, tau, alpha):
    """NAG on segments: Z+ over [I, P] (joint) or P (cross), Z- over [I, N] or N, then the formula."""

    def attn(q, k, v, valid=None):
        logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
        if valid is not None:
            logits = logits.masked_fill(~valid[:, None, None, :], -math.inf)
        return torch.nan_to_num(torch.softmax(logits, -1)) @ v.double()

    if seg.layout == "joint":
        ones = torch.ones(seg.k_img.shape[0], seg.k_img.shape[2], dtype=torch.bool)
        valid = None if seg.neg_mask is None else torch.cat([ones, seg.neg_mask], 1)
        zp = attn(seg.q_img, torch.cat([seg.k_img, seg.k_pos], 2), torch.cat([seg.v_img, seg.v_pos], 2))
        zn = attn(seg.q_img, torch.cat([seg.k_img, seg.k_neg], 2), torch.cat([seg.v_img, seg.v_neg], 2), valid)
    else:
        zp = attn(seg.q_img, seg.k_pos, seg.v_pos)
        zn = attn(seg.q_img, seg.k_neg, seg.v_neg, seg.neg_mask)
    out = NormalizedAttentionGuidance(NAGConfig(scale=s, tau=tau, alpha=alpha, attention=path)).attend(seg)
    torch.testing.assert_close(out.img.double(), reference(zp, zn, s, tau, alpha), rtol=1e-4, atol=1e-4)
    assert out.img.dtype == seg.q_img.dtype and out.img.shape == seg.q_img.shape


def test_batch_equals_separate_runs():
    """A batch of rows equals each row run alone."""
    seg = Segments.one("joint", *[torch.randn(3, 2, n, 8) for n in (6, 6, 6, 3, 3, 3, 2, 2, 2)])
    method = NormalizedAttentionGuidance(NAGConfig())
    full = method.attend(seg).img
    for i in range(3):
        torch.testing.assert_close(full[i : i + 1], method.attend(seg.rows(slice(i, i + 1))).img, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("params", "field"), [({"scale": 0.5}, "scale"), ({"tau": 0.9}, "tau"), ({"alpha": 1.5}, "alpha")]
)
def test_bad_parameters(params, field):
    with pytest.raises(ConfigError, match=f"nag: expected `{field}`"):
        NormalizedAttentionGuidance.make_config(params)


def test_family_defaults():
    assert NormalizedAttentionGuidance.make_config({}, "sd3").alpha == 0.125
    assert NormalizedAttentionGuidance.make_config({}, "flux").model_dump()["scale"] == 5.0


@pytest.mark.parametrize("path", ["dense", "split"])
@SETTINGS
@given(seg=several(), s=scales, tau=taus, alpha=blend)
def test_several_weighted_negatives_match_float64(path, seg, s, tau, alpha):
    """Z~ = Z+ + phi sum_i w_i (Z+ - Z-_i), then the clamp and the blend (float64 reference, masks included)."""
    out = NormalizedAttentionGuidance(NAGConfig(scale=s, tau=tau, alpha=alpha, attention=path)).attend(seg)
    torch.testing.assert_close(out.img.double(), references.nag64(seg, s, tau, alpha), rtol=1e-4, atol=1e-4)
    if seg.layout == "joint":
        assert len(out.negs) == len(seg.negatives)


@SETTINGS
@given(seg=several(), s=scales)
def test_all_weights_zero_is_the_positive_branch(seg, s):
    zeroed = dataclasses.replace(seg, negatives=tuple(dataclasses.replace(n, weight=0.0) for n in seg.negatives))
    out = NormalizedAttentionGuidance(NAGConfig(scale=s)).attend(zeroed)
    torch.testing.assert_close(out.img.double(), references.z_pos64(seg), rtol=1e-4, atol=1e-4)
