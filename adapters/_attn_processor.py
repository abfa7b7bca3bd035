"""Facts shared by families whose cross-attention is diffusers' generic ``Attention`` run by ``AttnProcessor2_0``
(``models/attention_processor.py``): the UNets of SD 1.x/2.x/SDXL (``adapters/unet.py``) and PixArt
(``adapters/pixart.py``), stated once here.

``AttnProcessor2_0`` on a cross-attention call: ``spatial_norm`` (with ``temb``) and ``group_norm`` on the queries'
input if the module has them, ``norm_encoder_hidden_states`` on the context if ``norm_cross``, ``to_q`` / ``to_k`` /
``to_v`` (or the fused ``to_kv``), the per-head ``norm_q`` / ``norm_k`` if present, attention at ``attn.scale``, then
``to_out``, the residual if ``residual_connection`` and the division by ``rescale_output_factor``.

This module is private (its name starts with ``_``): it registers no adapter.
"""

from __future__ import annotations

from typing import Any

import torch

from negguide.adapter import QKV
from negguide.adapter import Projected
from negguide.adapter import heads
from negguide.adapter import merge_heads


def project_cross(attn: Any, hidden_states: torch.Tensor, context: torch.Tensor, temb: Any = None) -> Projected:
    """The video/image queries and the text keys and values of one ``AttnProcessor2_0`` cross-attention call
    (``hidden_states`` ``(batch, tokens, channels)``); the residual travels in ``Projected.carry``."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    if getattr(attn, "fused_projections", False):
        key, value = attn.to_kv(context).chunk(2, dim=-1)
    else:
        key, value = attn.to_k(context), attn.to_v(context)
    q, k, v = heads(attn.to_q(hidden_states), attn.heads), heads(key, attn.heads), heads(value, attn.heads)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return Projected(QKV(q, None, None), QKV(None, k, v), scale=attn.scale, carry=residual)


def finish_cross(
    attn: Any, projected: Projected, image: torch.Tensor, extra: list[tuple[Any, torch.Tensor]] | None = None
) -> torch.Tensor:
    """The module's output from the guided attention ``image`` ``(batch, heads, tokens, head_dim)``; ``extra``
    terms ``(scale, (batch, tokens, channels))`` are added before ``to_out``, in order (an IP-Adapter's
    image-prompt attention, as ``IPAdapterAttnProcessor2_0`` adds it)."""
    hidden = merge_heads(image, projected.image.q.dtype)  # type: ignore[union-attr]
    for scale, term in extra or ():
        hidden = hidden + scale * term
    out = attn.to_out[1](attn.to_out[0](hidden))
    if attn.residual_connection:
        out = out + projected.carry
    return out / attn.rescale_output_factor
