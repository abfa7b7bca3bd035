"""The mask-free split path equals the dense-mask oracle, and its pieces equal a float64 softmax.

Random shapes, parameters and padding masks (hypothesis), CPU. The dense path is one SDPA call
with an additive ``L x L`` mask (the reference approach); the split path runs the unguided
``[I, P]`` block on a log-sum-exp kernel, the small negative blocks beside it, and merges them.
``partial`` and ``merge`` are checked against an independent float64 softmax.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from negguide.attention import Block
from negguide.attention import attend_blocks
from negguide.attention import merge
from negguide.attention import partial
from negguide.method import Segments
from negguide.plugins.nag import NAGConfig
from negguide.plugins.nag import NormalizedAttentionGuidance
from negguide.plugins.nasa import NASAConfig
from negguide.plugins.nasa import NegativeAwaySteerAttention
from negguide.plugins.vsf import ValueSignFlip
from negguide.plugins.vsf import VSFConfig
from tests import strategies

SETTINGS = settings(max_examples=30, deadline=None)
FLOAT32 = {"rtol": 1e-5, "atol": 1e-5}
# float32 results against a float64 reference: values reach |coef * v| ~ 10, so absolute float32 error ~1e-5
F64REF = {"rtol": 1e-5, "atol": 1e-4}
BF16_REL = 1e-2


# ---------------------------------------------------------------------- strategies


#: bigger shapes than the method tests draw (the kernels' head sizes 8-32, up to 64 image tokens), and a
#: drawn softmax scale
segments = functools.partial(
    strategies.segments,
    max_heads=4,
    dims=(8, 16, 32),
    max_img=64,
    max_pos=16,
    max_neg=12,
    spread=(0.5, 3.0),
    scales=st.none() | st.floats(0.05, 0.5),
)


layouts = st.sampled_from(["joint", "cross"])
vsf_alpha = st.floats(0.0, 5.0)
vsf_beta = st.floats(0.0, 3.0) | st.just(math.inf)


def _outputs(out: object) -> list[torch.Tensor]:
    return [t for t in (out.img, out.pos, *out.negs) if t is not None]


def _close(split: object, dense: object) -> None:
    """Equal within 1e-5 relative error: in Frobenius norm, and per element relative to the output's scale."""
    for a, b in zip(_outputs(split), _outputs(dense), strict=True):
        assert torch.isfinite(a).all()
        assert _rel(a, b) <= 1e-5
        scale = max(1.0, b.abs().max().item())  # float32 rounding grows with the magnitude of the values
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


# ---------------------------------------------------------------------- split == dense, per method


@SETTINGS
@given(data=st.data(), layout=layouts, alpha=vsf_alpha, beta=vsf_beta)
def test_vsf_split_equals_dense(data: st.DataObject, layout: str, alpha: float, beta: float) -> None:
    """VSF's mask-free split path equals its dense-mask path within 1e-5 in float32."""
    seg = data.draw(segments(layout))
    split = ValueSignFlip(VSFConfig(scale=alpha, bias=beta, attention="split")).attend(seg)
    dense = ValueSignFlip(VSFConfig(scale=alpha, bias=beta, attention="dense")).attend(seg)
    _close(split, dense)


@SETTINGS
@given(
    data=st.data(),
    layout=layouts,
    scale=st.floats(1.0, 5.0),
    tau=st.floats(1.0, 4.0),
    alpha=st.floats(0.0, 1.0),
)
def test_nag_split_equals_dense(data: st.DataObject, layout: str, scale: float, tau: float, alpha: float) -> None:
    """NAG's split path (one shared image block merged twice) equals its dense path within 1e-5 in float32."""
    seg = data.draw(segments(layout))
    split = NormalizedAttentionGuidance(NAGConfig(scale=scale, tau=tau, alpha=alpha, attention="split")).attend(seg)
    dense = NormalizedAttentionGuidance(NAGConfig(scale=scale, tau=tau, alpha=alpha, attention="dense")).attend(seg)
    _close(split, dense)


@SETTINGS
@given(data=st.data(), layout=layouts, scale=st.floats(0.0, 5.0))
def test_nasa_split_equals_dense(data: st.DataObject, layout: str, scale: float) -> None:
    """NASA's split path equals its dense path within 1e-5 in float32."""
    seg = data.draw(segments(layout))
    split = NegativeAwaySteerAttention(NASAConfig(scale=scale, attention="split")).attend(seg)
    dense = NegativeAwaySteerAttention(NASAConfig(scale=scale, attention="dense")).attend(seg)
    _close(split, dense)


@SETTINGS
@given(data=st.data(), layout=layouts, method=st.sampled_from(["vsf", "nag", "nasa"]), alpha=vsf_alpha, beta=vsf_beta)
def test_several_negatives_split_equals_dense(
    data: st.DataObject, layout: str, method: str, alpha: float, beta: float
) -> None:
    """With several weighted negatives and padding masks on the prompt and the negatives, split equals dense."""
    seg = data.draw(
        strategies.several(layout, max_heads=4, dims=(8, 16, 32), max_img=64, max_pos=16, max_neg=12, spread=(0.5, 3.0))
    )
    cls, cfg = {
        "vsf": (ValueSignFlip, lambda a: VSFConfig(scale=alpha, bias=beta, attention=a)),
        "nag": (NormalizedAttentionGuidance, lambda a: NAGConfig(scale=1 + alpha, tau=2.5, alpha=0.5, attention=a)),
        "nasa": (NegativeAwaySteerAttention, lambda a: NASAConfig(scale=alpha / 5, attention=a)),
    }[method]
    _close(cls(cfg("split")).attend(seg), cls(cfg("dense")).attend(seg))


@settings(max_examples=25, deadline=None)
@given(data=st.data(), layout=layouts, method=st.sampled_from(["vsf", "nag", "nasa"]))
def test_bf16_split_equals_dense(data: st.DataObject, layout: str, method: str) -> None:
    """In bfloat16 the split path stays within 1e-2 relative error (Frobenius norm) of the dense path, same dtype."""
    seg = data.draw(segments(layout, torch.bfloat16))
    cls, cfg = {
        "vsf": (ValueSignFlip, lambda a: VSFConfig(scale=3.5, bias=0.1, attention=a)),
        "nag": (NormalizedAttentionGuidance, lambda a: NAGConfig(scale=5.0, tau=2.5, alpha=0.25, attention=a)),
        "nasa": (NegativeAwaySteerAttention, lambda a: NASAConfig(scale=0.25, attention=a)),
    }[method]
    split, dense = cls(cfg("split")).attend(seg), cls(cfg("dense")).attend(seg)
    for a, b in zip(_outputs(split), _outputs(dense), strict=True):
        assert a.dtype == b.dtype == torch.bfloat16
        assert _rel(a, b) <= BF16_REL


# ---------------------------------------------------------------------- partial / merge vs float64


@st.composite
def key_blocks(draw: st.DrawFn) -> tuple[torch.Tensor, list[Block], float | None]:
    """Queries and 1-3 key blocks, each with a bias (finite or -inf), a value coefficient and maybe padding."""
    batch = draw(st.integers(1, 3))
    heads = draw(st.integers(1, 4))
    dim = draw(st.sampled_from([8, 16, 32]))
    n_q = draw(st.integers(1, 48))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.none() | st.floats(0.05, 0.5))
    q = torch.randn(batch, heads, n_q, dim, generator=gen) * 2
    blocks = []
    for i in range(draw(st.integers(1, 3))):
        n = draw(st.integers(1, 40))
        k = torch.randn(batch, heads, n, dim, generator=gen) * 2
        v = torch.randn(batch, heads, n, dim, generator=gen)
        # the first block stays visible so every query has at least one key
        bias = draw(st.floats(-4.0, 4.0) | (st.just(-math.inf) if i else st.nothing()))
        coef = draw(st.floats(-5.0, 5.0))
        key_mask = None
        if i and draw(st.booleans()):
            lengths = draw(st.lists(st.integers(0, n), min_size=batch, max_size=batch))
            key_mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
        blocks.append(Block(k, v, bias, coef, key_mask))
    return q, blocks, scale


def reference(q: torch.Tensor, blocks: list[Block], scale: float | None) -> torch.Tensor:
    """``softmax([q.K_i * scale + b_i]) . [c_i V_i]`` in float64, masked keys excluded."""
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    logits, values = [], []
    for b in blocks:
        lg = torch.matmul(q.double(), b.k.double().transpose(-1, -2)) * s + b.bias
        if b.key_mask is not None:
            lg = lg.masked_fill(~b.key_mask[:, None, None, :], -math.inf)
        logits.append(lg)
        values.append(b.v.double() * b.coef)
    return torch.matmul(torch.softmax(torch.cat(logits, -1), -1), torch.cat(values, 2))


@SETTINGS
@given(blocks=key_blocks())
def test_partial_matches_float64(blocks: tuple[torch.Tensor, list[Block], float | None]) -> None:
    """``partial`` returns the softmax output and the log-sum-exp of one key block (float64 reference)."""
    q, bs, scale = blocks
    b = bs[0]
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    logits = torch.matmul(q.double(), b.k.double().transpose(-1, -2)) * s
    for key_mask in (None, torch.ones(q.shape[0], b.k.shape[2], dtype=torch.bool)):  # LSE kernel, math fallback
        p = partial(q, b.k, b.v, key_mask, scale)
        assert p.lse.dtype == torch.float32 and p.lse.shape == q.shape[:3]
        torch.testing.assert_close(p.lse.double(), torch.logsumexp(logits, -1), **F64REF)
        torch.testing.assert_close(p.out.double(), torch.softmax(logits, -1) @ b.v.double(), **F64REF)


def test_partial_fully_masked_row_has_no_weight() -> None:
    """A query whose keys are all masked gets ``lse = -inf`` and a zero output, so ``merge`` ignores it."""
    q, k, v = torch.randn(2, 1, 3, 8), torch.randn(2, 1, 4, 8), torch.randn(2, 1, 4, 8)
    mask = torch.tensor([[True, True, False, False], [False, False, False, False]])
    p = partial(q, k, v, mask)
    assert torch.isneginf(p.lse[1]).all() and torch.isfinite(p.lse[0]).all()
    assert (p.out[1] == 0).all()
    other = partial(q, k, v)
    torch.testing.assert_close(merge([other, p], [0.0, 0.0], [1.0, -2.0])[1], other.out[1])


def test_query_that_sees_no_key_gets_zero_on_both_paths() -> None:
    """A query whose every key is masked gets a zero output on the split path, as SDPA gives on the dense one."""
    q, k, v = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8)
    mask = torch.tensor([[True, False, True, False], [False, False, False, False]])
    blocks = [Block(k, v, -0.5, -3.0, mask)]
    split, dense = attend_blocks(q, blocks, "split"), attend_blocks(q, blocks, "dense")
    assert (split[1] == 0).all()
    torch.testing.assert_close(split, dense, **F64REF)
    torch.testing.assert_close(split[0].double(), reference(q, blocks, None)[0], **F64REF)


@SETTINGS
@given(blocks=key_blocks())
def test_merge_matches_float64(blocks: tuple[torch.Tensor, list[Block], float | None]) -> None:
    """``merge`` of per-block partials equals one softmax over all blocks with their biases and value factors."""
    q, bs, scale = blocks
    parts = [partial(q, b.k, b.v, b.key_mask, scale) for b in bs]
    got = merge(parts, [b.bias for b in bs], [b.coef for b in bs])
    torch.testing.assert_close(got.double(), reference(q, bs, scale), **F64REF)


@SETTINGS
@given(blocks=key_blocks(), path=st.sampled_from(["dense", "split"]))
def test_attend_blocks_matches_float64(blocks: tuple[torch.Tensor, list[Block], float | None], path: str) -> None:
    """``attend_blocks`` on either path equals the float64 softmax over the biased, scaled key blocks."""
    q, bs, scale = blocks
    got = attend_blocks(q, bs, path, scale)
    assert got.dtype == q.dtype and got.shape == q.shape[:3] + (bs[0].v.shape[-1],)
    torch.testing.assert_close(got.double(), reference(q, bs, scale), **F64REF)


@pytest.mark.parametrize("layout", ["joint", "cross"])
def test_vsf_split_isolates_at_infinite_bias(layout: str) -> None:
    """With ``beta = inf`` the split path's image (and positive) outputs are the plain float64 attention over I, P."""
    torch.manual_seed(0)
    b, h, d = 2, 3, 16
    q_i, k_i, v_i = (torch.randn(b, h, 20, d) for _ in range(3))
    q_p, k_p, v_p = (torch.randn(b, h, 7, d) for _ in range(3))
    q_n, k_n, v_n = (torch.randn(b, h, 5, d) for _ in range(3))
    if layout == "cross":
        seg = Segments.one("cross", q_i, None, None, None, k_p, v_p, None, k_n, v_n)
        keys, values = k_p, v_p
    else:
        seg = Segments.one("joint", q_i, k_i, v_i, q_p, k_p, v_p, q_n, k_n, v_n)
        keys, values = torch.cat([k_i, k_p], 2), torch.cat([v_i, v_p], 2)
    out = ValueSignFlip(VSFConfig(scale=3.5, bias=math.inf, attention="split")).attend(seg)
    queries = q_i if layout == "cross" else torch.cat([q_i, q_p], 2)
    ref = torch.softmax(queries.double() @ keys.double().transpose(-1, -2) / math.sqrt(d), -1) @ values.double()
    got = out.img if layout == "cross" else torch.cat([out.img, out.pos], 2)
    torch.testing.assert_close(got.double(), ref, **F64REF)


def test_dense_is_chosen_only_while_its_mask_fits_the_budget(monkeypatch) -> None:
    """choose_path: 'dense' stays dense under NEGGUIDE_DENSE_LIMIT, else runs split with one warning per size."""
    import warnings

    from negguide.attention import choose_path
    from negguide.attention import dense_mask_bytes
    from negguide.errors import NegGuideWarning

    seg = Segments.one("joint", *[torch.randn(1, 2, n, 8) for n in (10, 10, 10, 4, 4, 4, 3, 3, 3)])
    size = dense_mask_bytes(seg)
    assert size == 1 * 17 * 20 * 4  # queries [I, P, N] x keys [I, P, N(0), N(1)], float32
    monkeypatch.setenv("NEGGUIDE_DENSE_LIMIT", str(size))
    assert choose_path("dense", seg) == "dense" and choose_path("auto", seg) == "split"
    monkeypatch.setenv("NEGGUIDE_DENSE_LIMIT", str(size - 1))
    with pytest.warns(NegGuideWarning, match="would build a .* mask .* running the split path instead"):
        assert choose_path("dense", seg) == "split"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_path("dense", seg) == "split"  # the same size warns once
    cross = Segments.one("cross", torch.randn(2, 2, 9, 8), None, None, None, *[torch.randn(2, 2, n, 8) for n in (5, 5)],
                         None, *[torch.randn(2, 2, n, 8) for n in (3, 3)])  # fmt: skip
    assert dense_mask_bytes(cross) == 2 * 9 * 8 * 4
