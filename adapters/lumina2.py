"""Lumina-Image 2.0 (``Lumina2Pipeline``; single-stream DiT with a context and a noise refiner, text first).

Model facts owned here (diffusers 0.42.1, ``models/transformers/transformer_lumina2.py`` and
``pipelines/lumina2/pipeline_lumina2.py``):

* the pipeline calls ``Lumina2Transformer2DModel(hidden_states=latents, timestep, encoder_hidden_states,
  encoder_attention_mask)`` with keywords: ``encoder_hidden_states`` is Gemma-2's ``hidden_states[-2]``
  ``(rows, L, cap_feat_dim)`` of ``system_prompt + " <Prompt Start> " + prompt``, right-padded to
  ``max_sequence_length`` with its 0/1 ``encoder_attention_mask``; the negative prompt of its CFG is encoded
  WITHOUT the system prompt (``encode_prompt`` prefixes ``prompt`` only);
* inside ``forward``: ``time_caption_embed`` embeds the timestep (no text) and each caption token
  (RMSNorm + Linear, per token); ``rope_embedder`` reads the caption length ``c_i = mask.sum()`` and gives
  caption token ``j`` the 3-axis position ``(j, 0, 0)`` and image token ``(r, c)`` the position
  ``(c_i, r, c)``; ``context_refiner`` layers attend over the caption alone (masked), ``noise_refiner``
  layers over the image alone; the main ``layers`` then attend over ``[caption_i[:c_i], image_i]`` per row
  (caption padding dropped; rows zero-padded to one length and masked when lengths differ), every
  attention ``Lumina2AttnProcessor2_0`` (``__call__(attn, hidden_states, encoder_hidden_states,
  attention_mask, image_rotary_emb, base_sequence_length)``: q/k/v, per-head RMS norms, complex RoPE,
  grouped-query key/value heads repeated per query head, SDPA with ``attn.scale``, ``to_out``).

The context refiner mixes caption tokens, and the caption length moves the image positions, so the negatives
never enter ``encoder_hidden_states``: while an attention-level method is installed ``forward`` is routed
through ``patched``, which runs the model's own parts in the model's order: the positive caption and the image
exactly as unpatched, then each negative as a caption of its own (``caption_embedder``, the context refiner
on its tokens alone, positions ``(j, 0, 0)``). The main layers see ``[P, I, N_1, ...]`` with ``P`` the refined
caption cut to the longest real caption (its padding is the positive mask), and rotate each negative at the
caption positions it was refined at; the guided calls use the core's masks. Only the image tokens go on to
``norm_out``.

The pipeline's CFG (``guidance_scale > 1``) runs the negative as a second, separate transformer call per step
(no ``cache_context``), skipped after ``cfg_trunc_ratio`` of the steps, and rescales the combination to the
conditional prediction's norm (``cfg_normalization``): only the first call of a step is guided.

``negative_prompt_embeds``: a tensor ``(1 or prompts or rows, n, cap_feat_dim)`` of Gemma-2 embeddings (every
token is used), or a dict ``{"prompt_embeds": ..., "prompt_attention_mask": (rows, n)}`` as ``encode_prompt``
returns the negative's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from negguide import hookimpl
from negguide.adapter import QKV
from negguide.adapter import Conditioning
from negguide.adapter import EncodeCall
from negguide.adapter import Joined
from negguide.adapter import JointAttentionAdapter
from negguide.adapter import Projected
from negguide.adapter import TextLayout
from negguide.adapter import embeds_and_mask
from negguide.adapter import merge_heads
from negguide.errors import NegativePromptError
from negguide.errors import NoAdapterError


@hookimpl
def register_adapters(register) -> None:  # noqa: ANN001
    register(Lumina2Adapter)


class Lumina2Adapter(JointAttentionAdapter):
    """Adapter for ``Lumina2Transformer2DModel`` (``Lumina2Pipeline``)."""

    family = "lumina2"
    text_mask_input = "encoder_attention_mask"
    conditioning_inputs = {"encoder_hidden_states": "embeds", "encoder_attention_mask": "mask"}
    patched_methods = ("forward",)

    @classmethod
    def matches(cls, denoiser: Any) -> bool:
        from diffusers import Lumina2Transformer2DModel

        return isinstance(denoiser, Lumina2Transformer2DModel)

    # ------------------------------------------------------------------ encoding

    def encode_negative(self, text: str, call: EncodeCall, padded: bool) -> Conditioning:
        # the pipeline's own negative: encode_prompt's negative branch (no system prompt, the call's length)
        pos, pos_mask = call.output[0][:1], call.output[1][:1]
        msl = int(call.arguments.get("max_sequence_length") or pos.shape[1])
        out = call.encode(prompt=None, do_classifier_free_guidance=True, negative_prompt=[text], prompt_embeds=pos,
                          prompt_attention_mask=pos_mask, device=call.device, max_sequence_length=msl)  # fmt: skip
        embeds, mask = out[2], out[3].bool()
        if padded:
            return Conditioning(embeds, mask)
        n = int(mask.sum())
        if not bool(mask[:, :n].all()):
            raise NegativePromptError(
                f"lumina2: expected the real tokens of the encoded negative {text!r} first (right padding), got the "
                f"mask {mask.int().tolist()}. Pass `negative_prompt_embeds` with its `prompt_attention_mask`."
            )
        return Conditioning(embeds[:, :n])  # Gemma is causal: the real tokens never see the padding

    def negative_from_embeds(self, embeds: Any, call: EncodeCall, padded: bool) -> Conditioning:
        embeds, mask = embeds_and_mask("lumina2", embeds, "cap_feat_dim", "Pass what `pipe.encode_prompt` returns.")
        return Conditioning(embeds, mask)

    # ------------------------------------------------------------------ joining the negatives

    def join(self, kwargs: dict[str, Any], negative: torch.Tensor, mask: torch.Tensor | None) -> Joined:
        # the negatives stay out of the caption (the context refiner mixes it): the patched forward appends them.
        # The caption lengths and the model's own rotary tables are read here, host-side, as rope_embedder does.
        latents, caption_mask = kwargs["hidden_states"], kwargs[self.text_mask_input]
        _, cap_freqs, img_freqs, _, lengths, _ = self.find_denoisers()[0].rope_embedder(latents, caption_mask)
        num_pos = max(lengths)
        pos_mask = None
        if len(set(lengths)) > 1:
            pos_mask = (
                torch.arange(num_pos, device=latents.device)[None]
                < torch.tensor(lengths, device=latents.device)[:, None]
            )
        return Joined(dict(kwargs), num_pos, pos_mask, carry=(negative, cap_freqs, img_freqs))

    def patched(self, name: str, original: Callable[..., Any], forward: Any, *args: Any, **kwargs: Any) -> Any:
        from diffusers.utils.peft_utils import apply_lora_scale

        model = original.__self__  # type: ignore[attr-defined]
        # the model's own LoRA scaling around the guided forward, as around the original
        return apply_lora_scale("attention_kwargs")(_guided_forward)(model, forward, *args, **kwargs)

    # ------------------------------------------------------------------ attention level

    def attention_modules(self, denoiser: torch.nn.Module) -> dict[str, int]:
        from diffusers.models.transformers.transformer_lumina2 import Lumina2AttnProcessor2_0

        # only the main layers see image and text together; the refiners see one of them
        modules = {}
        for i, layer in enumerate(denoiser.layers):
            if not isinstance(layer.attn.processor, Lumina2AttnProcessor2_0):
                raise NoAdapterError(
                    f"lumina2: expected Lumina2AttnProcessor2_0 in layer {i}, got "
                    f"{type(layer.attn.processor).__name__}, which attention-level methods cannot guide. Restore it "
                    "with `layer.attn.set_processor(Lumina2AttnProcessor2_0())`, or use 'cfg'."
                )
            modules[f"layers.{i}.attn.processor"] = i
        return modules

    def project(
        self,
        attn: Any,
        text: TextLayout,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
        base_sequence_length: int | None = None,
    ) -> Projected:
        from diffusers.models.embeddings import apply_rotary_emb

        if base_sequence_length is not None:  # the blocks never pass it; its scale depends on the sequence length
            raise NoAdapterError(
                f"lumina2: expected no `base_sequence_length` (proportional attention), got {base_sequence_length}: "
                "its softmax scale depends on the sequence length, which the negatives change. Use 'cfg'."
            )
        # attention_mask only masks batch padding: the core's pos_mask and negative masks say it for [P, I, N]
        dtype = hidden_states.dtype
        q = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        head_dim = q.shape[-1]
        k = attn.to_k(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        v = attn.to_v(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, use_real=False)
            k = apply_rotary_emb(k, image_rotary_emb, use_real=False)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        rep = attn.heads // k.shape[2]  # grouped-query attention: query head h reads key/value head h // rep
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, D)
        p, i = text.num_pos, q.shape[2] - (text.num_text - text.num_pos)  # [P, I, N_1, ...]

        def parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x[:, :, p:i], torch.cat([x[:, :, :p], x[:, :, i:]], dim=2)

        (qi, qt), (ki, kt), (vi, vt) = parts(q), parts(k), parts(v)
        return Projected(QKV(qi, ki, vi), QKV(qt, kt, vt), scale=attn.scale, carry=p)

    def finish(self, attn: Any, projected: Projected, image: torch.Tensor, text: torch.Tensor | None) -> Any:
        p = projected.carry
        out = torch.cat([text[:, :, :p], image, text[:, :, p:]], dim=2)  # type: ignore[index]
        out = attn.to_out[0](merge_heads(out, projected.image.q.dtype))  # type: ignore[union-attr]
        return attn.to_out[1](out)


def _guided_forward(
    model: Any,
    forward: Any,
    hidden_states: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor,
    attention_kwargs: dict[str, Any] | None = None,
    return_dict: bool = True,
) -> Any:
    """``Lumina2Transformer2DModel.forward`` over ``[P, I, N_1, ...]``: the model's parts in its order, each negative
    embedded and refined as a caption of its own (see the module docstring)."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    negative, cap_freqs, img_freqs = forward.carry
    num_pos, spans, masks = forward.text.num_pos, forward.spans, forward.masks
    batch, channels, height, width = hidden_states.shape
    p = model.config.patch_size
    temb, caption = model.time_caption_embed(hidden_states, timestep, encoder_hidden_states)
    image = hidden_states.view(batch, channels, height // p, p, width // p, p).permute(0, 2, 4, 3, 5, 1)
    image = model.x_embedder(image.flatten(3).flatten(1, 2))
    for layer in model.context_refiner:
        caption = layer(caption, encoder_attention_mask, cap_freqs)
    for layer in model.noise_refiner:
        image = layer(image, None, img_freqs, temb)
    # each negative a caption of its own: caption token j at (j, 0, 0), refined on its own real tokens
    negatives, neg_freqs = [], []
    embedded = model.time_caption_embed.caption_embedder(negative)
    for (a, b), mask in zip(spans, masks):
        tokens = embedded[:, a - num_pos : b - num_pos]
        ids = torch.zeros(batch, b - a, 3, dtype=torch.int32, device=tokens.device)
        ids[:, :, 0] = torch.arange(b - a, dtype=torch.int32, device=tokens.device)
        freqs = model.rope_embedder._get_freqs_cis(ids)
        if mask is not None:  # a row without a token of this negative attends to all (it runs unguided)
            mask = mask.to(tokens.device) | ~mask.to(tokens.device).any(dim=1, keepdim=True)
        for layer in model.context_refiner:
            tokens = layer(tokens, mask, freqs)
        negatives.append(tokens)
        neg_freqs.append(freqs)
    positive = caption[:, :num_pos]
    if forward.pos_mask is not None:  # the model drops caption padding: here it is masked, and zero like its fill
        positive = positive * forward.pos_mask[:, :, None].to(positive.dtype)
    hidden = torch.cat([positive, image, *negatives], dim=1)
    rotary = torch.cat([cap_freqs[:, :num_pos], img_freqs, *neg_freqs], dim=1)
    for layer in model.layers:
        if torch.is_grad_enabled() and model.gradient_checkpointing:
            hidden = model._gradient_checkpointing_func(layer, hidden, None, rotary, temb)
        else:
            hidden = layer(hidden, None, rotary, temb)
    hidden = model.norm_out(hidden[:, num_pos : num_pos + image.shape[1]], temb)
    out_channels = model.out_channels
    output = hidden.view(batch, height // p, width // p, p, p, out_channels).permute(0, 5, 1, 3, 2, 4)
    output = output.flatten(4, 5).flatten(2, 3)
    if not return_dict:
        return (output,)
    return Transformer2DModelOutput(sample=output)
