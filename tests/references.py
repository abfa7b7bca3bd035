"""Independent float64 references of the guided attention formulas, written from METHODS.md (not from the code).

Every helper takes ``Segments`` (any number of weighted negatives, optional padding masks) and computes
softmaxes explicitly over concatenated keys with additive biases, in float64.
"""

from __future__ import annotations

import math

import torch

from negguide.method import Segments


def attend64(q: torch.Tensor, blocks: list[tuple]) -> torch.Tensor:
    """``softmax([q.K_1 + b_1; ...]) . [c_1 V_1; ...]`` in float64; blocks are ``(k, v, mask, bias, coef)``,
    ``mask`` ``(batch, keys)`` boolean or None; a query that sees no key gets 0."""
    q = q.double()
    logits, values = [], []
    for k, v, mask, bias, coef in blocks:
        s = q @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
        if mask is not None:
            s = s.masked_fill(~mask[:, None, None, :], -math.inf)
        logits.append(s)
        values.append(v.double() * coef)
    p = torch.softmax(torch.cat(logits, -1), -1)
    return torch.nan_to_num(p) @ torch.cat(values, 2)


def log_w(w: float) -> float:
    return math.log(w) if w > 0 else -math.inf


def positive_blocks(seg: Segments) -> list[tuple]:
    """The keys the unguided call gives image queries: ``[I, P]`` (joint) or ``P`` (cross)."""
    blocks = [(seg.k_pos, seg.v_pos, seg.pos_mask, 0.0, 1.0)]
    if seg.layout == "joint":
        blocks.insert(0, (seg.k_img, seg.v_img, None, 0.0, 1.0))
    return blocks


def negative_blocks(seg: Segments, index: int) -> list[tuple]:
    """The keys of ``Z-_i``: ``[I, N_i]`` (joint) or ``N_i`` (cross)."""
    n = seg.negatives[index]
    blocks = [(n.k, n.v, n.mask, 0.0, 1.0)]
    if seg.layout == "joint":
        blocks.insert(0, (seg.k_img, seg.v_img, None, 0.0, 1.0))
    return blocks


def z_pos64(seg: Segments) -> torch.Tensor:
    return attend64(seg.q_img, positive_blocks(seg))


def z_negs64(seg: Segments) -> list[torch.Tensor]:
    return [attend64(seg.q_img, negative_blocks(seg, i)) for i in range(len(seg.negatives))]


def text64(seg: Segments) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """Joint layout: the positive queries over ``[I, P]`` and each negative's queries over ``[I, N_i]``."""
    if seg.layout != "joint":
        return None, []
    pos = attend64(seg.q_pos, positive_blocks(seg))
    negs = [attend64(n.q, negative_blocks(seg, i)) for i, n in enumerate(seg.negatives)]
    return pos, negs


def vsf64(seg: Segments, alpha: float, beta: float) -> torch.Tensor:
    """VSF's image output: keys ``[I?, P, N_1, ...]``, each ``N_i`` with bias ``-beta + log w_i`` and values
    ``-alpha V``."""
    blocks = positive_blocks(seg)
    for n in seg.negatives:
        blocks.append((n.k, n.v, n.mask, -beta + log_w(n.weight) if beta < math.inf else -math.inf, -alpha))
    return attend64(seg.q_img, blocks)


def merged_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def nag64(seg: Segments, s: float, tau: float, alpha: float) -> torch.Tensor:
    """NAG with weighted negatives: ``Z~ = Z+ + (s - 1) sum_i w_i (Z+ - Z-_i)``, clamp at ``tau``, blend."""
    zp = merged_heads(z_pos64(seg))
    zt = zp.clone()
    for n, zn in zip(seg.negatives, z_negs64(seg)):
        zt = zt + (s - 1) * n.weight * (zp - merged_heads(zn))
    r = zt.abs().sum(-1, keepdim=True) / zp.abs().sum(-1, keepdim=True)
    zh = zt * torch.minimum(r, torch.full_like(r, tau)) / r
    out = alpha * zh + (1 - alpha) * zp
    b, h, n, d = seg.q_img.shape
    return out.reshape(b, n, h, -1).transpose(1, 2)


def nasa64(seg: Segments, alpha: float) -> torch.Tensor:
    """NASA with weighted negatives: ``Z+ - alpha sum_i w_i Z-_i``."""
    out = z_pos64(seg)
    for n, zn in zip(seg.negatives, z_negs64(seg)):
        out = out - alpha * n.weight * zn
    return out
