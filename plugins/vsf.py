"""Value Sign Flip (Guo & Du, 2025): negative-prompt values with a flipped sign inside attention."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import Field

from negguide import hookimpl
from negguide.attention import Block
from negguide.attention import Partial
from negguide.attention import attend_blocks
from negguide.attention import block_mask
from negguide.attention import choose_path
from negguide.attention import collector
from negguide.attention import image_prompt_partial
from negguide.attention import key_padding_bias
from negguide.attention import log_weight
from negguide.attention import merge
from negguide.attention import partial
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

    Several weighted negatives ``N_1 .. N_k``: each is its own isolated collector and gets its own
    flipped block, value coefficient ``-alpha`` and logit bias ``-beta + log(w_i)``. A weight is a
    multiplicity (weight 2 equals that flipped block appearing twice, weight 0 removes it), and one
    negative of weight 1 is the formula above.

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
        path = choose_path(self.config.attention, seg)
        if seg.layout == "cross":
            return cross(seg, alpha, beta, path)
        if path == "dense":
            return joint_dense(seg, alpha, beta)
        return joint_split(seg, alpha, beta)


def _flip_bias(beta: float, weight: float) -> float:
    """The flipped block's logit bias ``-beta + log(w)`` (``-inf`` for ``beta = inf`` or ``w = 0``)."""
    return -beta + log_weight(weight) if beta < INF else -INF


def cross(seg: Segments, alpha: float, beta: float, path: str = "dense") -> SegmentOutputs:
    """Cross layout: image queries over ``[P ; N_1 ; ...]``, each ``N_i``'s values times ``-alpha``, bias
    ``-beta + log(w_i)``."""
    blocks = [Block(seg.k_pos, seg.v_pos, key_mask=seg.pos_mask)]
    blocks += [Block(n.k, n.v, _flip_bias(beta, n.weight), -alpha, n.mask) for n in seg.negatives]
    return SegmentOutputs(attend_blocks(seg.q_img, blocks, path, seg.scale))  # type: ignore[arg-type]


def joint_dense(seg: Segments, alpha: float, beta: float) -> SegmentOutputs:
    """The paper's layout in one SDPA call: queries ``[I, P, N_1..N_k]``, keys ``[I, P, N_i(0).., N_i(1)..]``."""
    negs = seg.negatives
    k_count = len(negs)
    n_img, n_pos = seg.q_img.shape[2], seg.q_pos.shape[2]  # type: ignore[union-attr]
    sizes = tuple(n.num_tokens for n in negs)
    q = torch.cat([seg.q_img, seg.q_pos, *(n.q for n in negs)], dim=2)  # type: ignore[list-item]
    k = torch.cat([seg.k_img, seg.k_pos, *(n.k for n in negs), *(n.k for n in negs)], dim=2)  # type: ignore[list-item]
    v = torch.cat([seg.v_img, seg.v_pos, *(n.v for n in negs), *(n.v * -alpha for n in negs)], dim=2)  # type: ignore[list-item]
    hidden = (-INF,) * k_count
    # I sees I, P and every flipped copy N_i(1) with bias -beta + log(w_i)
    table = [(0.0, 0.0, *hidden, *(_flip_bias(beta, n.weight) for n in negs))]
    table.append((0.0, 0.0, *hidden, *hidden))  # P sees I, P
    for i in range(k_count):  # N_i(0) sees I and itself
        table.append((0.0, -INF, *(0.0 if j == i else -INF for j in range(k_count)), *hidden))
    cols = (n_img, n_pos, *sizes, *sizes)
    mask = block_mask((n_img, n_pos, *sizes), cols, tuple(table), q.device, q.dtype)
    pads = [None, seg.pos_mask, *(n.mask for n in negs), *(n.mask for n in negs)]
    if any(p is not None for p in pads):
        mask = mask + key_padding_bias(pads, cols, q.shape[0], q.device, q.dtype)
    out = sdpa(q, k, v, mask, seg.scale)
    bounds = [n_img + n_pos]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    negs_out = tuple(out[:, :, a:b] for a, b in zip(bounds[:-1], bounds[1:]))
    return SegmentOutputs(out[:, :, :n_img], out[:, :, n_img : n_img + n_pos], negs_out)


def joint_split(seg: Segments, alpha: float, beta: float) -> SegmentOutputs:
    """The same result mask-free: the unguided ``[I, P]`` call, the small negative blocks, an LSE merge."""
    n_img = seg.q_img.shape[2]
    q_ip = torch.cat([seg.q_img, seg.q_pos], dim=2)  # type: ignore[list-item]
    main = image_prompt_partial(q_ip, seg)
    img_main = Partial(main.out[:, :, :n_img], main.lse[:, :, :n_img])
    flipped = [partial(seg.q_img, n.k, n.v, n.mask, seg.scale) for n in seg.negatives]
    biases = [0.0, *(_flip_bias(beta, n.weight) for n in seg.negatives)]
    img = merge([img_main, *flipped], biases, [1.0, *([-alpha] * len(flipped))])
    negs = tuple(collector(seg, n, "split") for n in seg.negatives)
    return SegmentOutputs(img, main.out[:, :, n_img:], negs)
