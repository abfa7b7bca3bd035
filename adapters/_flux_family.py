"""Facts shared by the Flux-style families: Flux.1 (``adapters/flux.py``) and Chroma (``adapters/chroma.py``).

Both denoisers (diffusers ``transformer_flux.py``, ``transformer_chroma.py``, which imports
``FluxAttention`` and ``FluxAttnProcessor`` from the first) share these facts, stated once here:

* the text is T5 tokens only in ``encoder_hidden_states``, with text position ids ``txt_ids``
  ``(L, 3)`` (or the deprecated ``(rows, L, 3)``) that are all zeros: the rotary embedding treats
  every text token alike, so a negative token gets zero ids too (``join``);
* T5 attends to every token of its input, so a negative is encoded without padding by encoding it
  at exactly its real token count (``t5_length``);
* double-stream blocks ``transformer_blocks[i].attn`` project text and image separately, text
  first (``to_out`` on the image, ``to_add_out`` on the text); single-stream blocks
  ``single_transformer_blocks[j].attn`` get the whole ``[text, image]`` sequence and return its
  attention output unprojected. ``FluxAttnProcessor`` is called as ``(attn, hidden_states,
  encoder_hidden_states, attention_mask, image_rotary_emb)``, applies RMS norms to q and k per
  head and the rotary embedding over the whole ``[text, image]`` sequence, and calls attention with
  the default scale. For ``layers`` the double blocks are ``0 .. D-1``, the single ``D .. D+S-1``;
* an IP-Adapter (``load_ip_adapter``) puts ``FluxIPAdapterAttnProcessor`` on the double-stream blocks:
  the same joint attention, plus an image-prompt term (the image queries, normed, without rotary
  embedding, over each adapter's projected image tokens ``ip_hidden_states``, times its ``scale``)
  returned third and added to the image tokens by the block. The term sees no text, so a guided
  call keeps it exactly as the original computes it and guides the joint attention.

This module is private (its name starts with ``_``): it registers no adapter.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from negguide.adapter import QKV
from negguide.adapter import Joined
from negguide.adapter import JointAttentionAdapter
from negguide.adapter import Projected
from negguide.adapter import TextLayout
from negguide.adapter import merge_heads
from negguide.attention import sdpa
from negguide.errors import NoAdapterError

#: zero channels added to q, k and v when an additive mask rides along as one logit channel: head sizes stay
#: multiples of 8, which the fused attention kernels need
MASK_CHANNELS = 8


def t5_length(pipe: Any, tokenizer: Any, text: str, max_sequence_length: int) -> int:
    """The real T5 tokens of ``text`` (end-of-sequence included) as the pipeline's ``_get_t5_prompt_embeds``
    tokenizes it (textual inversion tokens converted), truncated at ``max_sequence_length``."""
    tokens = text
    convert = getattr(pipe, "maybe_convert_prompt", None)
    if convert is not None:  # textual inversion tokens, as _get_t5_prompt_embeds does
        tokens = convert([text], tokenizer)[0]
    return len(tokenizer(tokens, truncation=True, max_length=max_sequence_length).input_ids)


class FluxFamilyAdapter(JointAttentionAdapter):
    """The shared facts above; a family states its encoders, inputs and attention masks (``logit_mask``)."""

    def join(self, kwargs: dict[str, Any], negative: torch.Tensor, mask: torch.Tensor | None) -> Joined:
        joined = super().join(kwargs, negative, mask)
        ids = kwargs.get("txt_ids")
        if ids is not None:  # text positions are zeros: the negatives' are too
            n = negative.shape[1]
            if ids.ndim == 3:  # deprecated (rows, L, 3)
                extra = ids.new_zeros(ids.shape[0], n, ids.shape[2])
            else:
                extra = ids.new_zeros(n, ids.shape[-1])
            joined.kwargs["txt_ids"] = torch.cat([ids, extra], dim=-2)
        return joined

    def attention_modules(self, denoiser: torch.nn.Module) -> dict[str, int]:
        double = len(denoiser.transformer_blocks)
        modules = {f"transformer_blocks.{i}.attn.processor": i for i in range(double)}
        for j in range(len(denoiser.single_transformer_blocks)):
            modules[f"single_transformer_blocks.{j}.attn.processor"] = double + j
        from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

        processors = denoiser.attn_processors
        for name, index in modules.items():
            processor = processors[name]
            known = type(processor) is FluxIPAdapterAttnProcessor and index < double
            if "IPAdapter" in type(processor).__name__ and not known:
                raise NoAdapterError(
                    f"{self.family}: expected FluxAttnProcessor, or diffusers' FluxIPAdapterAttnProcessor in a "
                    f"double-stream block, in block {index}, got {type(processor).__name__}, whose image-prompt "
                    "attention negguide does not know. Unload the IP-Adapter (pipe.unload_ip_adapter()) or use 'cfg'."
                )
        return modules

    def logit_mask(self, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The additive logit mask the model adds in this call, as per-token factors ``(rows, cols)``
        ``(batch, tokens)`` with ``mask[i, j] = rows[i] * cols[j]``, or ``None`` when it adds none.

        A family raises here for a mask it cannot carry; boolean padding masks are the core's masks
        (``Joined.pos_mask`` and the negatives' masks), not logits.
        """
        return None

    # FluxAttention passes (hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb) positionally
    def project(
        self,
        attn: Any,
        text: TextLayout,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        ip_hidden_states: list[torch.Tensor] | None = None,
        ip_adapter_masks: Any = None,  # in FluxIPAdapterAttnProcessor's signature, unused there too
    ) -> Projected:
        factors = self.logit_mask(attention_mask)
        from diffusers.models.embeddings import apply_rotary_emb

        fused = getattr(attn, "fused_projections", False)
        if fused:
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q = attn.norm_q(q.unflatten(-1, (-1, attn.head_dim)))
        k = attn.norm_k(k.unflatten(-1, (-1, attn.head_dim)))
        v = v.unflatten(-1, (-1, attn.head_dim))
        ip_terms = None
        if encoder_hidden_states is not None and ip_hidden_states is not None:
            ip_terms = _ip_adapter_terms(attn, q, ip_hidden_states)
        if encoder_hidden_states is not None:  # double-stream: text [P, N] beside the image
            if fused and hasattr(attn, "to_added_qkv"):
                tq, tk, tv = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                tq = attn.add_q_proj(encoder_hidden_states)
                tk = attn.add_k_proj(encoder_hidden_states)
                tv = attn.add_v_proj(encoder_hidden_states)
            tq = attn.norm_added_q(tq.unflatten(-1, (-1, attn.head_dim)))
            tk = attn.norm_added_k(tk.unflatten(-1, (-1, attn.head_dim)))
            tv = tv.unflatten(-1, (-1, attn.head_dim))
            q, k, v = torch.cat([tq, q], dim=1), torch.cat([tk, k], dim=1), torch.cat([tv, v], dim=1)
        if image_rotary_emb is not None:  # over the whole [P, N, I] sequence (text ids are zeros)
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, D)
        scale, width = None, None
        if factors is not None:
            q, k, v, scale = _with_logit_mask(q, k, v, *factors)
            width = attn.head_dim
        t = text.num_text
        image = QKV(q[:, :, t:], k[:, :, t:], v[:, :, t:])
        double = encoder_hidden_states is not None
        return Projected(image, QKV(q[:, :, :t], k[:, :, :t], v[:, :, :t]), scale, (double, width, ip_terms))

    def finish(self, attn: Any, projected: Projected, image: torch.Tensor, text: torch.Tensor | None) -> Any:
        dtype = projected.image.q.dtype  # type: ignore[union-attr]
        double, width, ip_terms = projected.carry
        if width is not None:  # drop the mask channels (their values are zeros)
            image, text = image[..., :width], text[..., :width]  # type: ignore[index]
        if not double:  # single-stream: the [text, image] output, unprojected
            return merge_heads(torch.cat([text, image], dim=2), dtype)  # type: ignore[list-item]
        img = attn.to_out[1](attn.to_out[0](merge_heads(image, dtype)))
        txt = attn.to_add_out(merge_heads(text, dtype))  # type: ignore[arg-type]
        if ip_terms is None:
            return img, txt
        ip = torch.zeros_like(img)  # as FluxIPAdapterAttnProcessor sums its image-prompt terms
        for scale, term in ip_terms:
            ip += scale * term
        return img, txt, ip


def _ip_adapter_terms(attn: Any, query: torch.Tensor, ip_hidden_states: list[torch.Tensor]) -> list[Any]:
    """The image-prompt attention of diffusers' ``FluxIPAdapterAttnProcessor``: the image queries ``query``
    ``(batch, tokens, heads, head_dim)`` (normed, no rotary embedding) over each IP-Adapter's image tokens, as
    ``(scale, output (batch, tokens, heads * head_dim))``. It sees neither the text nor the negatives: guidance
    leaves it exactly as the unguided processor computes it (the block adds it to the image tokens)."""
    processor = getattr(attn.processor, "original", attn.processor)  # a guided processor: the one it replaced
    if not hasattr(processor, "to_k_ip"):
        raise NoAdapterError(
            f"expected diffusers' FluxIPAdapterAttnProcessor (with `to_k_ip`, `to_v_ip`) on an attention call "
            f"given `ip_hidden_states`, got {type(processor).__name__}. Load the IP-Adapter with "
            "pipe.load_ip_adapter(...), or pass no `ip_adapter_image`."
        )
    batch = query.shape[0]
    terms = []
    for states, scale, to_k_ip, to_v_ip in zip(ip_hidden_states, processor.scale, processor.to_k_ip,
                                               processor.to_v_ip):  # fmt: skip
        key = to_k_ip(states).view(batch, -1, attn.heads, attn.head_dim)
        value = to_v_ip(states).view(batch, -1, attn.heads, attn.head_dim)
        out = sdpa(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)).transpose(1, 2)
        terms.append((scale, out.reshape(batch, -1, attn.heads * attn.head_dim).to(query.dtype)))
    return terms


def _with_logit_mask(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """q, k, v ``(B, H, L, D)`` with ``MASK_CHANNELS`` more channels so that, at the softmax scale ``1/sqrt(D)``
    (returned), every logit gains ``rows[i] * cols[j]``: the model's additive mask as one extra product term."""
    root = math.sqrt(q.shape[-1])

    def channel(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        c = x.to(like.dtype)[:, None, :, None].expand(like.shape[0], like.shape[1], -1, 1)
        return F.pad(c, (0, MASK_CHANNELS - 1))

    q = torch.cat([q, channel(rows, q)], dim=-1)
    k = torch.cat([k, channel(cols.float() * root, k)], dim=-1)
    return q, k, F.pad(v, (0, MASK_CHANNELS)), 1.0 / root
