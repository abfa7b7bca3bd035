"""The core's joining of negatives given through several inputs (``Adapter.join_negatives``, padded extras)."""

from __future__ import annotations

import torch

from negguide.adapter import Conditioning
from negguide.adapter import Joined
from negguide.adapter import JointAttentionAdapter
from negguide.installation import _forward_rows
from negguide.installation import stack


def test_stack_pads_extras_like_the_embeds():
    """Rows of different lengths: extras zero-padded (boolean: False) at the end of every axis; a row without an
    extra (an empty negative) is all padding."""
    a = Conditioning(torch.ones(1, 2, 4), extras={"x": torch.ones(1, 3, 2, 5), "m": torch.ones(1, 2, dtype=torch.bool)})
    b = Conditioning(torch.ones(1, 3, 4), extras={"x": torch.ones(1, 3, 4, 5), "m": torch.ones(1, 4, dtype=torch.bool)})
    empty = Conditioning(torch.zeros(1, 0, 4))
    out = stack([a, empty, b], torch.device("cpu"))
    assert out.embeds.shape == (3, 3, 4) and out.mask.tolist() == [[True, True, False], [False] * 3, [True] * 3]
    assert out.extras["x"].shape == (3, 3, 4, 5)
    assert out.extras["x"][0, :, :2].eq(1).all() and not out.extras["x"][0, :, 2:].any()
    assert not out.extras["x"][1].any() and out.extras["x"][2].eq(1).all()
    assert out.extras["m"].tolist() == [[True, True, False, False], [False] * 4, [True] * 4]


def test_forward_rows_fill_the_unguided_rows():
    cond = Conditioning(torch.ones(1, 2, 3), torch.tensor([[True, False]]),
                        {"x": torch.ones(1, 2), "m": torch.tensor([[True, False]])})  # fmt: skip
    out = _forward_rows(cond, 4, slice(2, 4), torch.zeros(1, dtype=torch.float64))
    assert out.embeds.dtype == torch.float64 and out.embeds[:2].eq(0).all() and out.embeds[2:].eq(1).all()
    assert out.mask.tolist() == [[True, True], [True, True], [True, False], [True, False]]
    assert out.extras["x"][:2].eq(0).all() and out.extras["m"][:2].all() and out.extras["m"].dtype == torch.bool


def test_default_join_negatives_concatenates_and_calls_join():
    seen = {}

    class Toy(JointAttentionAdapter):
        family = "toy"

        @classmethod
        def matches(cls, denoiser):
            return False

        encode_negative = negative_from_embeds = attention_modules = project = finish = None

        def join(self, kwargs, negative, mask):
            seen.update(negative=negative, mask=mask)
            return Joined(kwargs, 0)

    first, second = torch.randn(2, 2, 3), torch.randn(2, 1, 3)
    Toy(None).join_negatives({}, [Conditioning(first), Conditioning(second, torch.tensor([[True], [False]]))])
    assert torch.equal(seen["negative"], torch.cat([first, second], dim=1))
    assert seen["mask"].tolist() == [[True, True, True], [True, True, False]]
