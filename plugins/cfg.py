"""Classifier-free guidance with the negative prompt as the unconditional branch."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from pydantic import Field

from negguide import hookimpl
from negguide.method import MethodConfig
from negguide.method import PredictionMethod


@hookimpl
def register_methods(register) -> None:  # noqa: ANN001
    register(ClassifierFreeGuidance)


class CFGConfig(MethodConfig):
    """Parameters of classifier-free guidance."""

    scale: float = Field(
        4.0, ge=0.0, le=100.0, description="Guidance scale w: 1 = no guidance (positive only), 0 = negative only."
    )


class ClassifierFreeGuidance(PredictionMethod):
    """Classifier-free guidance (Ho & Salimans, 2022), run by negguide itself.

    Reference: https://arxiv.org/abs/2207.12598

    negguide runs the negative branch (batched beside the positive one), so it works with the
    pipeline's own CFG switched off (``guidance_scale=0`` on SD3/Wan, Flux without
    ``true_cfg_scale``) and gives the same result as the pipeline's CFG with the same negative.

    ```
    v = v_neg + w * (v_pos - v_neg)
    ```

    Several weighted negatives: ``v = v_pos + (w - 1) * sum_i w_i (v_pos - v_neg_i)``, computed as the
    rule above with the weighted mean ``v_neg = sum_i w_i v_neg_i / W`` and ``w' = 1 + (w - 1) W``
    (``W = sum_i w_i``): the same expression, and for one negative of weight 1 the same numbers
    as the pipeline's own CFG.

    Args:
        scale: ``w``, default 4.0. Typical range 2-8 on non-distilled models; distilled few-step
            models (SD3.5-Turbo, Flux-Schnell) over-saturate with it, which is why VSF exists.
        start: first guided step as a fraction of the steps, default 0.
        stop: end of the guided steps (exclusive), default 1.
    """

    name = "cfg"
    Config: ClassVar[type[MethodConfig]] = CFGConfig

    def combine(
        self, pred_pos: torch.Tensor, preds_neg: Sequence[torch.Tensor], weights: Sequence[float]
    ) -> torch.Tensor:
        w = self.config.scale
        if len(preds_neg) == 1 and weights[0] == 1.0:
            pred_neg = preds_neg[0]
        else:
            total = math.fsum(weights)
            if total == 0.0:
                return pred_pos
            # the ratios w_i / W in double precision: tiny weights do not underflow
            mixed = sum(p.float() * (wi / total) for p, wi in zip(preds_neg, weights))
            pred_neg = mixed.to(pred_pos.dtype)  # type: ignore[union-attr]
            w = 1.0 + (w - 1.0) * total
        return pred_neg + w * (pred_pos - pred_neg)
