"""Value Sign Flip: the paper's invariants, checked against float64 references written from the formula."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from negguide.attention import sdpa
from negguide.errors import ConfigError
from negguide.method import NegativeTokens
from negguide.method import Segments
from negguide.plugins.vsf import ValueSignFlip
from negguide.plugins.vsf import VSFConfig
from negguide.plugins.vsf import cross
from negguide.plugins.vsf import joint_dense
from tests import references
from tests.strategies import alphas
from tests.strategies import betas
from tests.strategies import segments
from tests.strategies import several

PATHS = ["dense", "split"]
SETTINGS = settings(max_examples=20, deadline=None)
#: float32 results against a float64 reference
F64 = {"rtol": 1e-4, "atol": 1e-4}


def vsf(seg: Segments, alpha: float, beta: float, path: str):
    return ValueSignFlip(VSFConfig(scale=alpha, bias=beta, attention=path)).attend(seg)


def _softmax_out(q, k, v, valid=None):
    """float64 softmax(q k^T / sqrt(d)) v and the log of its mass, per query row."""
    logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None, None, :], -math.inf)
    lse = torch.logsumexp(logits, -1)
    p = torch.exp(logits - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    return p @ v.double(), lse


def weighted_reference(seg: Segments, alpha: float, beta: float) -> torch.Tensor:
    """Image output as ``W Z+ - alpha (1 - W) Z-`` (paper eqs. 6-8), in float64."""
    if seg.layout == "joint":
        k_pos = torch.cat([seg.k_img, seg.k_pos], 2)
        v_pos = torch.cat([seg.v_img, seg.v_pos], 2)
    else:
        k_pos, v_pos = seg.k_pos, seg.v_pos
    z_pos, lse_pos = _softmax_out(seg.q_img, k_pos, v_pos)
    z_neg, lse_neg = _softmax_out(seg.q_img, seg.k_neg, seg.v_neg, seg.neg_mask)
    z_neg = torch.nan_to_num(z_neg)
    a_pos = torch.exp(lse_pos)
    a_neg = torch.exp(lse_neg - beta) if beta != math.inf else torch.zeros_like(a_pos)
    w = (a_pos / (a_pos + a_neg))[..., None]
    return w * z_pos - alpha * (1 - w) * z_neg


def unguided_reference(seg: Segments):
    """Image and prompt outputs of the unpatched joint attention over ``[I, P]``, float64."""
    q = torch.cat([seg.q_img, seg.q_pos], 2)
    k = torch.cat([seg.k_img, seg.k_pos], 2)
    v = torch.cat([seg.v_img, seg.v_pos], 2)
    out, _ = _softmax_out(q, k, v)
    n = seg.q_img.shape[2]
    return out[:, :, :n], out[:, :, n:]


@pytest.mark.parametrize("path", PATHS)
@SETTINGS
@given(seg=segments(), alpha=alphas, beta=betas)
def test_weighted_form(path, seg, alpha, beta):
    """One attention call equals W*Z+ - alpha*(1-W)*Z- computed in float64."""
    out = vsf(seg, alpha, beta, path)
    ref = weighted_reference(seg, alpha, beta)
    torch.testing.assert_close(out.img.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
@SETTINGS
@given(seg=segments(layout="joint"), alpha=alphas)
def test_beta_inf_is_identity(path, seg, alpha):
    """With beta = inf the image and prompt outputs equal the unguided ones."""
    out = vsf(seg, alpha, math.inf, path)
    img, pos = unguided_reference(seg)
    torch.testing.assert_close(out.img.double(), img, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pos.double(), pos, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
@SETTINGS
@given(seg=segments(), a1=alphas, a2=alphas, beta=st.floats(0.0, 3.0))
def test_affine_in_alpha(path, seg, a1, a2, beta):
    """The output is affine in alpha: Z(a1) + Z(a2) = 2 Z((a1 + a2) / 2)."""
    z1, z2 = vsf(seg, a1, beta, path).img, vsf(seg, a2, beta, path).img
    zm = vsf(seg, (a1 + a2) / 2, beta, path).img
    torch.testing.assert_close(z1 + z2, 2 * zm, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", PATHS)
@SETTINGS
@given(seg=segments(masked=False), beta=st.floats(0.0, 3.0))
def test_alpha_zero_is_a_sink_not_the_baseline(path, seg, beta):
    """alpha = 0 with finite beta gives W*Z+: a zero-value sink, strictly shrinking when W < 1."""
    out = vsf(seg, 0.0, beta, path).img.double()
    ref = weighted_reference(seg, 0.0, beta)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    if seg.layout == "joint":
        base, _ = unguided_reference(seg)
        assert out.norm() < base.norm()


@pytest.mark.parametrize("path", PATHS)
@SETTINGS
@given(seg=segments(masked=False), alpha=alphas, beta=betas, data=st.data())
def test_permuting_negative_tokens(path, seg, alpha, beta, data):
    """Permuting the tokens inside N leaves the image outputs unchanged."""
    perm = torch.tensor(data.draw(st.permutations(list(range(seg.num_neg)))))
    permuted = Segments.one(
        seg.layout, seg.q_img, seg.k_img, seg.v_img, seg.q_pos, seg.k_pos, seg.v_pos,
        None if seg.q_neg is None else seg.q_neg[:, :, perm], seg.k_neg[:, :, perm], seg.v_neg[:, :, perm],
    )  # fmt: skip
    torch.testing.assert_close(
        vsf(seg, alpha, beta, path).img, vsf(permuted, alpha, beta, path).img, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("path", PATHS)
@SETTINGS
@given(seg=segments(layout="cross", masked=False))
def test_cross_flip_minus_one_is_plain_concatenation(path, seg):
    """Cross layout with alpha = -1, beta = 0 equals plain attention over the concatenated [P; N] context."""
    out = cross(seg, -1.0, 0.0, path).img
    ref, _ = _softmax_out(seg.q_img, torch.cat([seg.k_pos, seg.k_neg], 2), torch.cat([seg.v_pos, seg.v_neg], 2))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
@SETTINGS
@given(seg=segments(layout="joint"), alpha=alphas, beta=betas)
def test_negative_queries_are_a_collector(path, seg, alpha, beta):
    """N(0) queries see I and N only (their own values, unflipped), whatever alpha and beta."""
    out = vsf(seg, alpha, beta, path)
    k = torch.cat([seg.k_img, seg.k_neg], 2)
    v = torch.cat([seg.v_img, seg.v_neg], 2)
    valid = None
    if seg.neg_mask is not None:
        valid = torch.cat([torch.ones(seg.k_img.shape[0], seg.k_img.shape[2], dtype=torch.bool), seg.neg_mask], 1)
    ref, _ = _softmax_out(seg.q_neg, k, v, valid)
    torch.testing.assert_close(out.neg.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["joint", "cross"])
@settings(max_examples=5, deadline=None)
@given(data=st.data())
def test_keeps_shape_dtype_device(path, dtype, layout, data):
    """Every output keeps the shape, dtype and device of its queries."""
    seg = data.draw(segments(layout=layout, dtype=dtype, masked=True))
    out = vsf(seg, 3.0, 0.1, path)
    assert out.img.shape == seg.q_img.shape and out.img.dtype == dtype and out.img.device == seg.q_img.device
    assert torch.isfinite(out.img.float()).all()
    if layout == "joint":
        assert out.pos.shape == seg.q_pos.shape and out.pos.dtype == dtype
        assert out.neg.shape == seg.q_neg.shape and out.neg.dtype == dtype
        assert torch.isfinite(out.neg.float()).all()


@settings(max_examples=10, deadline=None)
@given(seg=segments(layout="joint", dtype=torch.bfloat16, masked=False))
def test_bf16_close_to_float64(seg):
    """bfloat16 stays within 2e-2 relative error of the float64 formula."""
    out = vsf(seg, 3.0, 0.1, "split").img.double()
    ref = weighted_reference(seg, 3.0, 0.1)
    assert (out - ref).norm() / ref.norm() < 2e-2


def test_dense_mask_has_no_fully_masked_row():
    """The paper's mask: P never sees N(0)/N(1), N(0) sees I and N(0) only, no row fully masked."""
    from negguide.attention import block_mask

    n_img, n_pos, n_neg = 5, 3, 2
    inf = math.inf
    table = ((0.0, 0.0, -inf, -0.1), (0.0, 0.0, -inf, -inf), (0.0, -inf, 0.0, -inf))
    mask = block_mask((n_img, n_pos, n_neg), (n_img, n_pos, n_neg, n_neg), table, torch.device("cpu"), torch.float32)
    m = mask[0, 0]
    assert torch.isfinite(m).any(dim=1).all()
    assert torch.isinf(m[n_img : n_img + n_pos, n_img + n_pos :]).all()  # P rows never see N(0), N(1)
    assert torch.isinf(m[n_img + n_pos :, n_img : n_img + n_pos]).all()  # N rows never see P
    assert torch.isinf(m[:, n_img + n_pos + n_neg :][n_img:]).all()  # only image rows see N(1)
    # cached: the same object for the same shape, device, dtype
    again = block_mask((n_img, n_pos, n_neg), (n_img, n_pos, n_neg, n_neg), table, torch.device("cpu"), torch.float32)
    assert again is mask


@settings(max_examples=10, deadline=None)
@given(seg=segments(layout="joint", masked=True))
def test_dense_path_uses_paper_mask_in_one_call(seg):
    """The dense path (one SDPA call with the paper's mask) matches the split path."""
    dense = joint_dense(seg, 2.0, 0.3)
    split = vsf(seg, 2.0, 0.3, "split")
    torch.testing.assert_close(dense.img, split.img, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense.neg, split.neg, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"scale": -1.0}, "scale"),
        ({"bias": -0.1}, "bias"),
        ({"start": 0.5, "stop": 0.5}, "start"),
        ({"sclae": 1}, "sclae"),
    ],
)
def test_bad_parameters_name_the_field(params, field):
    """Invalid parameters raise ConfigError naming the field, the value and the bound."""
    with pytest.raises(ConfigError, match=f"vsf: .*{field}"):
        ValueSignFlip.make_config(params)


def test_bias_inf_is_allowed_and_family_defaults_apply():
    cfg = ValueSignFlip.make_config({"bias": math.inf}, family="wan")
    assert cfg.bias == math.inf and cfg.scale == ValueSignFlip.defaults["wan"]["scale"]


@settings(max_examples=5, deadline=None)
@given(seg=segments(layout="cross", masked=False))
def test_plain_sdpa_reference_matches_softmax(seg):
    """Sanity of the float64 helper itself against PyTorch SDPA."""
    ref, _ = _softmax_out(seg.q_img, seg.k_pos, seg.v_pos)
    torch.testing.assert_close(sdpa(seg.q_img, seg.k_pos, seg.v_pos).double(), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- several weighted negatives


@pytest.mark.parametrize("path", PATHS)
@SETTINGS
@given(seg=several(), alpha=alphas, beta=betas)
def test_several_weighted_negatives_match_float64(path, seg, alpha, beta):
    """Each N_i its own flipped block (coefficient -alpha, bias -beta + log w_i) and its own isolated collector;
    P sees [I, P] only (float64 reference over explicit keys, padding masks included)."""
    out = vsf(seg, alpha, beta, path)
    torch.testing.assert_close(out.img.double(), references.vsf64(seg, alpha, beta), **F64)
    pos, negs = references.text64(seg)
    if seg.layout == "joint":
        torch.testing.assert_close(out.pos.double(), pos, **F64)
        assert len(out.negs) == len(negs)
        for got, want in zip(out.negs, negs):
            torch.testing.assert_close(got.double(), want, **F64)


@pytest.mark.parametrize("path", PATHS)
@SETTINGS
@given(seg=several(), alpha=alphas, beta=betas, data=st.data())
def test_a_weight_zero_negative_equals_its_absence(path, seg, alpha, beta, data):
    extra = data.draw(several(seg.layout, max_negatives=1)).negatives[0]
    extra = NegativeTokens(*_fit(extra, seg), weight=0.0)
    with_zero = dataclasses.replace(seg, negatives=(*seg.negatives, extra))
    a, b = vsf(seg, alpha, beta, path), vsf(with_zero, alpha, beta, path)
    torch.testing.assert_close(b.img, a.img, rtol=1e-5, atol=1e-5)
    if seg.layout == "joint":
        torch.testing.assert_close(b.pos, a.pos, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
@SETTINGS
@given(seg=several(), alpha=alphas, beta=betas, data=st.data())
def test_the_order_of_negatives_does_not_matter(path, seg, alpha, beta, data):
    order = data.draw(st.permutations(list(range(len(seg.negatives)))))
    shuffled = dataclasses.replace(seg, negatives=tuple(seg.negatives[i] for i in order))
    a, b = vsf(seg, alpha, beta, path), vsf(shuffled, alpha, beta, path)
    torch.testing.assert_close(b.img, a.img, rtol=1e-5, atol=1e-5)
    for i, j in enumerate(order):
        if seg.layout == "joint":
            torch.testing.assert_close(b.negs[i], a.negs[j], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
@SETTINGS
@given(seg=several(max_negatives=1), alpha=alphas, beta=st.floats(0.0, 3.0), k=st.integers(2, 4))
def test_an_integer_weight_is_that_many_copies(path, seg, alpha, beta, k):
    """A weight k equals the same flipped block appearing k times (weights are multiplicities)."""
    neg = seg.negatives[0]
    weighted = dataclasses.replace(seg, negatives=(dataclasses.replace(neg, weight=float(k)),))
    copies = dataclasses.replace(seg, negatives=(dataclasses.replace(neg, weight=1.0),) * k)
    torch.testing.assert_close(vsf(weighted, alpha, beta, path).img, vsf(copies, alpha, beta, path).img,
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def _fit(neg: NegativeTokens, seg: Segments) -> tuple:
    """``neg`` with the batch, heads and head size of ``seg`` (drawn independently)."""
    b, h, _, d = seg.q_img.shape
    n = neg.k.shape[2]
    g = torch.Generator().manual_seed(n)

    def t():
        return torch.randn(b, h, n, d, generator=g)

    return (t() if seg.layout == "joint" else None), t(), t(), None
