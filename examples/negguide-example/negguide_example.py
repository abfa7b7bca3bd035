"""An example negguide plugin: perpendicular negative attention ("perpneg").

Like NASA it subtracts the image tokens' attention output with the negative context, but only
the part of it that is orthogonal to the positive output (per token, over the merged heads), in
the spirit of Perp-Neg (Armandpour et al., 2023, https://arxiv.org/abs/2304.04968), which does
the same with model predictions. A negative that only agrees with the positive changes nothing.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

import negguide
from negguide.attention import choose_path
from negguide.attention import contrast


@negguide.hookimpl
def register_methods(register) -> None:
    register(PerpendicularNegative)


class PerpNegConfig(negguide.AttentionMethodConfig):
    """Parameters of perpendicular negative attention (``attention``, ``layers`` and the step window come with
    ``AttentionMethodConfig``)."""

    scale: float = Field(1.0, ge=0.0, le=100.0, description="Weight of the subtracted orthogonal component.")


class PerpendicularNegative(negguide.AttentionMethod):
    """Subtract the component of ``Z-`` orthogonal to ``Z+``.

    ```
    Z = Z+ - scale (Z- - (<Z-, Z+> / <Z+, Z+>) Z+)     (per token, over heads x head_dim)
    ```

    Several weighted negatives: ``Z = Z+ - scale sum_i w_i perp(Z-_i)``.

    Args:
        scale: weight of the orthogonal component, default 1.0 (0 = off).
        attention: ``"auto"`` (default), ``"dense"`` or ``"split"``.
    """

    name = "perpneg"
    Config: ClassVar[type[negguide.MethodConfig]] = PerpNegConfig

    def attend(self, seg: negguide.Segments) -> negguide.SegmentOutputs:
        c = contrast(seg, choose_path(self.config.attention, seg))
        if len(seg.negatives) == 1:
            img = perp_combine(c.z_pos, c.z_neg, self.config.scale * seg.negatives[0].weight)
        else:
            total = sum(n.weight * perpendicular(c.z_pos, z) for n, z in zip(seg.negatives, c.z_negs))
            img = (c.z_pos.float() - self.config.scale * total).to(c.z_pos.dtype)
        return negguide.SegmentOutputs(img, c.pos, c.negs)


def perp_combine(z_pos: torch.Tensor, z_neg: torch.Tensor, scale: float) -> torch.Tensor:
    """``Z+ - scale * perp(Z-)`` on ``(batch, heads, tokens, dim)`` outputs, computed in float32."""
    return (z_pos.float() - scale * perpendicular(z_pos, z_neg)).to(z_pos.dtype)


def perpendicular(z_pos: torch.Tensor, z_neg: torch.Tensor) -> torch.Tensor:
    """The part of ``Z-`` orthogonal to ``Z+``, per token over heads and head_dim, in float32."""
    zp, zn = z_pos.float(), z_neg.float()
    dot = (zp * zn).sum(dim=(1, 3), keepdim=True)
    norm2 = (zp * zp).sum(dim=(1, 3), keepdim=True)
    # a zero Z+ has no direction: the whole of Z- is orthogonal to it
    coef = torch.where(norm2 > 0, dot / torch.where(norm2 > 0, norm2, torch.ones_like(norm2)), torch.zeros_like(dot))
    return zn - coef * zp
