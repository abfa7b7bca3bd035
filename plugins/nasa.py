"""Negative-Away Steer Attention (NASA, from SNOOPI; Nguyen et al., 2024)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from negguide import hookimpl
from negguide.attention import choose_path
from negguide.attention import contrast
from negguide.method import AttentionMethod
from negguide.method import AttentionMethodConfig
from negguide.method import MethodConfig
from negguide.method import SegmentOutputs
from negguide.method import Segments


@hookimpl
def register_methods(register) -> None:  # noqa: ANN001
    register(NegativeAwaySteerAttention)


class NASAConfig(AttentionMethodConfig):
    """Parameters of Negative-Away Steer Attention."""

    scale: float = Field(0.25, ge=0.0, le=100.0, description="alpha: weight of the subtracted negative attention.")


class NegativeAwaySteerAttention(AttentionMethod):
    """NASA: subtract the attention output of the negative context, with a fixed strength.

    Reference: https://arxiv.org/abs/2412.02687 (SNOOPI). No official code; this follows the
    paper's equation on the same segments as NAG:

    ```
    Z = Z+ - alpha Z-                      (several weighted negatives: Z+ - alpha sum_i w_i Z-_i)
    ```

    ``Z-`` does not cancel when the negative equals the positive: ``Z+ = Z-`` gives
    ``(1 - alpha) Z+``.

    Args:
        scale: ``alpha`` >= 0, default 0.25.
        attention: ``"auto"`` (default), ``"dense"`` or ``"split"``.
        layers: block indices to guide, default all.
        start: first guided step (fraction), default 0.
        stop: end of the guided steps (fraction, exclusive), default 1.
    """

    name = "nasa"
    Config: ClassVar[type[MethodConfig]] = NASAConfig

    def attend(self, seg: Segments) -> SegmentOutputs:
        c = contrast(seg, choose_path(self.config.attention, seg))
        img = c.z_pos.float()
        for z_neg, neg in zip(c.z_negs, seg.negatives):
            img = img - self.config.scale * (z_neg.float() * neg.weight)
        return SegmentOutputs(img.to(c.z_pos.dtype), c.pos, c.negs)
