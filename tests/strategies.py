"""Hypothesis strategies for attention segments and method parameters."""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

from negguide.method import Segments


@st.composite
def segments(draw, layout=None, dtype=torch.float32, masked=None):
    """Random ``Segments`` (joint or cross) with optional per-row negative padding."""
    layout = layout or draw(st.sampled_from(["joint", "cross"]))
    b = draw(st.integers(1, 3))
    h = draw(st.integers(1, 3))
    d = draw(st.sampled_from([4, 8, 16]))
    n_img = draw(st.integers(1, 24))
    n_pos = draw(st.integers(1, 8))
    n_neg = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    spread = draw(st.floats(0.2, 3.0))
    g = torch.Generator().manual_seed(seed)

    def t(n):
        return (torch.randn(b, h, n, d, generator=g) * spread).to(dtype)

    use_mask = draw(st.booleans()) if masked is None else masked
    mask = None
    if use_mask:
        lengths = [draw(st.integers(0, n_neg)) for _ in range(b)]
        mask = torch.arange(n_neg)[None, :] < torch.tensor(lengths)[:, None]
    if layout == "cross":
        return Segments("cross", t(n_img), None, None, None, t(n_pos), t(n_pos), None, t(n_neg), t(n_neg), mask)
    return Segments(
        "joint", t(n_img), t(n_img), t(n_img), t(n_pos), t(n_pos), t(n_pos), t(n_neg), t(n_neg), t(n_neg), mask
    )


alphas = st.floats(0.0, 6.0, allow_nan=False)
betas = st.one_of(st.floats(0.0, 3.0, allow_nan=False), st.just(math.inf))
