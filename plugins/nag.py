"""Normalized Attention Guidance (Chen et al., NeurIPS 2025)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from pydantic import Field

from negguide import hookimpl
from negguide.attention import choose_path
from negguide.attention import contrast
from negguide.attention import fused
from negguide.method import AttentionMethod
from negguide.method import AttentionMethodConfig
from negguide.method import MethodConfig
from negguide.method import SegmentOutputs
from negguide.method import Segments


@hookimpl
def register_methods(register) -> None:  # noqa: ANN001
    register(NormalizedAttentionGuidance)


class NAGConfig(AttentionMethodConfig):
    """Parameters of Normalized Attention Guidance."""

    scale: float = Field(
        5.0, ge=1.0, le=100.0, description="s = 1 + phi (diffusers/ComfyUI convention): 1 switches NAG off."
    )
    tau: float = Field(2.5, ge=1.0, description="Cap on the per-token L1 norm ratio ||Z~|| / ||Z+||.")
    alpha: float = Field(0.25, ge=0.0, le=1.0, description="Blend of the normalized output with Z+ (0 = off).")


class NormalizedAttentionGuidance(AttentionMethod):
    """Normalized Attention Guidance: extrapolate attention away from the negative, then renormalize.

    Reference: https://arxiv.org/abs/2505.21179

    ``Z+`` and ``Z-`` are the image tokens' attention outputs with the positive and with the
    negative context (joint models: over ``[I, P]`` and ``[I, N]``, one shared image stream):

    ```
    Z~ = s Z+ - (s - 1) Z-                 (paper: Z+ + phi (Z+ - Z-), phi = s - 1)
    r  = ||Z~||_1 / ||Z+||_1               (per token, over the merged-head channels)
    Z^ = Z~ min(r, tau) / r
    Z  = alpha Z^ + (1 - alpha) Z+
    ```

    Several weighted negatives: ``Z~ = Z+ + phi * sum_i w_i (Z+ - Z-_i)``, then the same clamp and
    blend. Computed as the one-negative rule with the weighted mean ``Z- = sum_i w_i Z-_i / W`` and
    ``s = 1 + phi W`` (``W = sum_i w_i``), which is the same expression; one negative of weight 1
    is the rule above.

    Args:
        scale: ``s`` >= 1, default 5 (1 = off).
        tau: norm-ratio cap >= 1, default 2.5.
        alpha: blend in [0, 1], default 0.25 (SD3.5: 0.125).
        attention: ``"auto"`` (default), ``"dense"`` or ``"split"``.
        layers: block indices to guide, default all.
        start: first guided step (fraction), default 0.
        stop: end of the guided steps (fraction, exclusive), default 1.
    """

    name = "nag"
    Config: ClassVar[type[MethodConfig]] = NAGConfig
    defaults: ClassVar[dict[str, dict[str, object]]] = {
        "sd3": {"scale": 5.0, "tau": 2.5, "alpha": 0.125},
        "flux": {"scale": 5.0, "tau": 2.5, "alpha": 0.25},
        "wan": {"scale": 4.0, "tau": 2.5, "alpha": 0.25},
    }

    def attend(self, seg: Segments) -> SegmentOutputs:
        c = contrast(seg, choose_path(self.config.attention, seg))
        z_neg, scale = weighted_negative(c.z_negs, [n.weight for n in seg.negatives], self.config.scale)
        img = nag_combine(c.z_pos, z_neg, scale, self.config.tau, self.config.alpha)
        return SegmentOutputs(img, c.pos, c.negs)


def weighted_negative(
    z_negs: Sequence[torch.Tensor], weights: Sequence[float], scale: float
) -> tuple[torch.Tensor, float]:
    """``(sum_i (w_i / W) Z-_i, 1 + (scale - 1) W)`` with ``W = sum_i w_i``: several weighted negatives as one
    (exactly so for one negative of weight 1). The ratios ``w_i / W`` are taken in double precision, so tiny
    weights do not underflow. All weights 0 give ``s = 1``: no guidance."""
    if len(z_negs) == 1 and weights[0] == 1.0:
        return z_negs[0], scale
    total = math.fsum(weights)
    if total == 0.0:
        return z_negs[0], 1.0
    mixed = sum(z.float() * (w / total) for z, w in zip(z_negs, weights))
    return mixed.to(z_negs[0].dtype), 1.0 + (scale - 1.0) * total  # type: ignore[union-attr]


@fused
def nag_combine(z_pos: torch.Tensor, z_neg: torch.Tensor, scale: float, tau: float, alpha: float) -> torch.Tensor:
    """NAG on ``(batch, heads, tokens, dim)`` outputs; the norm is over heads and dim of each token.

    Fused into compiled kernels where ``negguide.attention.fuse_enabled`` (CUDA by default).
    """
    zp = z_pos.float()
    z_tilde = scale * zp - (scale - 1.0) * z_neg.float()
    n_tilde = z_tilde.abs().sum(dim=(1, 3), keepdim=True)
    n_pos = zp.abs().sum(dim=(1, 3), keepdim=True)
    # Z~ * min(r, tau) / r without dividing by ||Z+||: no NaN when ||Z+|| = 0
    over = n_tilde > tau * n_pos
    factor = torch.where(
        over, tau * n_pos / torch.where(over, n_tilde, torch.ones_like(n_tilde)), torch.ones_like(n_tilde)
    )
    z_hat = z_tilde * factor
    return (alpha * z_hat + (1.0 - alpha) * zp).to(z_pos.dtype)
