"""Value Sign Flip (Guo & Du, 2025): negative-prompt values with a flipped sign inside attention."""

from __future__ import annotations

import math
from typing import ClassVar
from typing import Literal

import torch
from pydantic import Field

from negguide import hookimpl
from negguide.attention import Block
from negguide.attention import Partial
from negguide.attention import attend_blocks
from negguide.attention import block_mask
from negguide.attention import key_padding_bias
from negguide.attention import merge
from negguide.attention import partial
from negguide.attention import resolve_path
from negguide.attention import sdpa
from negguide.method import AttentionMethod
from negguide.method import AttentionMethodConfig
from negguide.method import MethodConfig
from negguide.method import SegmentOutputs
from negguide.method import Segments

INF = math.inf


@hookimpl
def register_methods(register) -> None:  # noqa: ANN001
    register(ValueSignFlip)


class VSFConfig(AttentionMethodConfig):
    """Parameters of Value Sign Flip."""

    scale: float = Field(3.5, ge=0.0, le=100.0, description="alpha: the negative values are multiplied by -alpha.")
    bias: float = Field(
        0.1, ge=0.0, description="beta: logit bias -beta on the flipped negative keys; inf isolates them (no effect)."
    )
    attention: Literal["auto", "dense", "split"] = Field(
        "auto",
        description="Kernel path: 'dense' = one SDPA call with an additive mask (the reference), 'split' = "
        "mask-free partial attentions merged by log-sum-exp, 'auto' = split where a log-sum-exp kernel exists.",
    )


class ValueSignFlip(AttentionMethod):
    """Value Sign Flip: negative-prompt tokens appended to attention with sign-flipped values.

    Reference: https://arxiv.org/abs/2508.10931 (Guo & Du, ICLR 2026).

    For an image query ``q`` with positive keys ``K+`` (image and prompt) and negative keys ``K-``:

    ```
    Z = softmax([q.K+ ; q.K- - beta]) . [V+ ; -alpha V-]
      = W Z+ - alpha (1 - W) Z-,     W = A+ / (A+ + e^-beta A-)
    ```

    with ``Z+``, ``Z-`` the attention outputs over the positive and the negative keys alone and
    ``A+``, ``A-`` their softmax masses. Joint models (SD3, Flux) follow the paper's mask table:
    the negative tokens ``N`` ride in the text stream as an isolated "collector" (``N`` sees
    ``I, N``; nobody sees ``N`` unflipped) and a flipped copy ``N(1)`` of their keys/values, seen
    only by image queries, carries the guidance. Cross-attention models (Wan): image queries see
    ``[P ; N]`` with ``N``'s values flipped and biased.

    Args:
        scale: ``alpha`` >= 0, default 3.5 (SD3.5-Turbo: 3-3.5; Flux-Schnell: 3.5-4; Wan: 1.5).
        bias: ``beta`` >= 0, default 0.1; ``inf`` makes VSF the identity.
        attention: ``"auto"`` (default), ``"dense"`` or ``"split"``.
        layers: block indices to guide, default all.
        start: first guided step (fraction), default 0.
        stop: end of the guided steps (fraction, exclusive), default 1.
    """

    name = "vsf"
    Config: ClassVar[type[MethodConfig]] = VSFConfig
    defaults: ClassVar[dict[str, dict[str, object]]] = {
        "sd3": {"scale": 3.5, "bias": 0.1},
        "flux": {"scale": 3.5, "bias": 0.1},
        "wan": {"scale": 1.5, "bias": 0.1},
    }

    def attend(self, seg: Segments) -> SegmentOutputs:
        alpha, beta = self.config.scale, self.config.bias
        path = resolve_path(self.config.attention, seg.q_img.device)
        if seg.layout == "cross":
            return cross(seg, alpha, beta, path)
        if path == "dense":
            return joint_dense(seg, alpha, beta)
        return joint_split(seg, alpha, beta)


def cross(seg: Segments, alpha: float, beta: float, path: str = "dense") -> SegmentOutputs:
    """Cross layout: image queries over ``[P ; N]`` with ``N``'s values times ``-alpha`` and bias ``-beta``."""
    blocks = [Block(seg.k_pos, seg.v_pos), Block(seg.k_neg, seg.v_neg, -beta, -alpha, seg.neg_mask)]
    return SegmentOutputs(attend_blocks(seg.q_img, blocks, path, seg.scale))  # type: ignore[arg-type]


def joint_dense(seg: Segments, alpha: float, beta: float) -> SegmentOutputs:
    """The paper's layout in one SDPA call: queries ``[I, P, N]``, keys ``[I, P, N(0), N(1)]``."""
    n_img, n_pos, n_neg = seg.q_img.shape[2], seg.q_pos.shape[2], seg.q_neg.shape[2]
    q = torch.cat([seg.q_img, seg.q_pos, seg.q_neg], dim=2)
    k = torch.cat([seg.k_img, seg.k_pos, seg.k_neg, seg.k_neg], dim=2)
    v = torch.cat([seg.v_img, seg.v_pos, seg.v_neg, seg.v_neg * -alpha], dim=2)
    table = (
        (0.0, 0.0, -INF, -beta),  # I sees I, P and the flipped copy N(1) with bias -beta
        (0.0, 0.0, -INF, -INF),  # P sees I, P
        (0.0, -INF, 0.0, -INF),  # N(0) sees I, N(0)
    )
    cols = (n_img, n_pos, n_neg, n_neg)
    mask = block_mask((n_img, n_pos, n_neg), cols, table, q.device, q.dtype)
    if seg.neg_mask is not None:
        mask = mask + key_padding_bias([None, None, seg.neg_mask, seg.neg_mask], cols, q.shape[0], q.device, q.dtype)
    out = sdpa(q, k, v, mask, seg.scale)
    return SegmentOutputs(out[:, :, :n_img], out[:, :, n_img : n_img + n_pos], out[:, :, n_img + n_pos :])


def joint_split(seg: Segments, alpha: float, beta: float) -> SegmentOutputs:
    """The same result mask-free: the unguided ``[I, P]`` call, the small negative blocks, an LSE merge."""
    n_img = seg.q_img.shape[2]
    q_ip = torch.cat([seg.q_img, seg.q_pos], dim=2)
    k_ip = torch.cat([seg.k_img, seg.k_pos], dim=2)
    v_ip = torch.cat([seg.v_img, seg.v_pos], dim=2)
    main = partial(q_ip, k_ip, v_ip, scale=seg.scale)
    img_main = Partial(main.out[:, :, :n_img], main.lse[:, :, :n_img])
    flipped = partial(seg.q_img, seg.k_neg, seg.v_neg, seg.neg_mask, seg.scale)
    img = merge([img_main, flipped], [0.0, -beta], [1.0, -alpha])
    neg = attend_blocks(
        seg.q_neg, [Block(seg.k_img, seg.v_img), Block(seg.k_neg, seg.v_neg, key_mask=seg.neg_mask)], "split", seg.scale
    )
    return SegmentOutputs(img, main.out[:, :, n_img:], neg)
