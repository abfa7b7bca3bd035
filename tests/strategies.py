"""Hypothesis strategies for attention segments and method parameters."""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

from negguide.method import Segments


@st.composite
def segments(
    draw,
    layout=None,
    dtype=torch.float32,
    masked=None,
    *,
    max_heads=3,
    dims=(4, 8, 16),
    max_img=24,
    max_pos=8,
    max_neg=6,
    spread=(0.2, 3.0),
    scales=None,
):
    """Random ``Segments`` (joint or cross) with optional per-row negative padding (a row may be all padding).

    Batch 1-3, heads 1-``max_heads``, head size from ``dims``, 1-``max_img`` image, 1-``max_pos`` prompt
    and 1-``max_neg`` negative tokens, values scaled by a factor in ``spread`` (flat to peaked softmaxes);
    the softmax scale is drawn from ``scales`` when given, else ``None`` (the model's ``1/sqrt(d)``).
    """
    layout = layout or draw(st.sampled_from(["joint", "cross"]))
    b = draw(st.integers(1, 3))
    h = draw(st.integers(1, max_heads))
    d = draw(st.sampled_from(dims))
    n_img = draw(st.integers(1, max_img))
    n_pos = draw(st.integers(1, max_pos))
    n_neg = draw(st.integers(1, max_neg))
    seed = draw(st.integers(0, 2**31 - 1))
    factor = draw(st.floats(*spread))
    scale = None if scales is None else draw(scales)
    g = torch.Generator().manual_seed(seed)

    def t(n):
        return (torch.randn(b, h, n, d, generator=g) * factor).to(dtype)

    use_mask = draw(st.booleans()) if masked is None else masked
    mask = None
    if use_mask:
        lengths = [draw(st.integers(0, n_neg)) for _ in range(b)]
        mask = torch.arange(n_neg)[None, :] < torch.tensor(lengths)[:, None]
    if layout == "cross":
        img, pos, neg = t(n_img), (t(n_pos), t(n_pos)), (t(n_neg), t(n_neg))  # drawn in this order
        return Segments.one("cross", img, None, None, None, *pos, None, *neg, mask, scale)
    return Segments.one(
        "joint", t(n_img), t(n_img), t(n_img), t(n_pos), t(n_pos), t(n_pos), t(n_neg), t(n_neg), t(n_neg), mask, scale
    )


alphas = st.floats(0.0, 6.0, allow_nan=False)
betas = st.one_of(st.floats(0.0, 3.0, allow_nan=False), st.just(math.inf))


weights = st.one_of(st.sampled_from([0.0, 1.0, 2.0, 3.0]), st.floats(0.0, 3.0, allow_nan=False))


@st.composite
def several(
    draw,
    layout=None,
    *,
    max_negatives=3,
    pos_masked=None,
    neg_masked=None,
    max_heads=3,
    dims=(4, 8, 16),
    max_img=24,
    max_pos=8,
    max_neg=6,
    spread=(0.2, 3.0),
):
    """Random ``Segments`` with 1-``max_negatives`` weighted negatives (own lengths, optional padding masks that
    leave every row at least one token) and an optional positive padding mask (every row keeps a real token)."""
    from negguide.method import NegativeTokens

    layout = layout or draw(st.sampled_from(["joint", "cross"]))
    b = draw(st.integers(1, 3))
    h = draw(st.integers(1, max_heads))
    d = draw(st.sampled_from(dims))
    n_img = draw(st.integers(1, max_img))
    n_pos = draw(st.integers(1, max_pos))
    factor = draw(st.floats(*spread))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    def t(n):
        return torch.randn(b, h, n, d, generator=g) * factor

    def mask(n, masked):
        if not (draw(st.booleans()) if masked is None else masked):
            return None
        lengths = [draw(st.integers(1, n)) for _ in range(b)]
        return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]

    joint = layout == "joint"
    q_img, k_img, v_img = t(n_img), t(n_img) if joint else None, t(n_img) if joint else None
    q_pos, k_pos, v_pos = t(n_pos) if joint else None, t(n_pos), t(n_pos)
    negatives = []
    for _ in range(draw(st.integers(1, max_negatives))):
        n = draw(st.integers(1, max_neg))
        q = t(n) if joint else None
        negatives.append(NegativeTokens(q, t(n), t(n), mask(n, neg_masked), draw(weights)))
    return Segments(layout, q_img, k_img, v_img, q_pos, k_pos, v_pos, tuple(negatives), mask(n_pos, pos_masked))
