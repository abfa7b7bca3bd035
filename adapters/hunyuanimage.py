"""HunyuanImage 2.1 (``HunyuanImagePipeline``: base and distilled; ``HunyuanImageRefinerPipeline``).

Model facts owned here (diffusers 0.42.1, ``models/transformers/transformer_hunyuanimage.py`` and
``pipelines/hunyuan_image/pipeline_hunyuanimage*.py``):

* two text streams enter the transformer. ``encoder_hidden_states`` ``(rows, L, 3584)`` with
  ``encoder_attention_mask``: the Qwen2.5-VL encoder's ``hidden_states[-3]`` of the templated
  prompt, the template's first ``prompt_template_encode_start_idx`` tokens dropped, right-padded
  to ``tokenizer_max_length`` (1000; the refiner 256) and masked. ``encoder_hidden_states_2`` with
  ``encoder_attention_mask_2`` (base pipeline only): ByT5 embeddings of the prompt's *quoted* text
  (``extract_glyph_text``, for glyph rendering), zeros and an all-zero mask when it quotes none;
* inside ``forward``, ``context_embedder`` (``HunyuanImageTokenRefiner``) mixes the Qwen tokens:
  their masked mean conditions its modulation and its self-attention blocks attend across them;
  ``context_embedder_2`` projects ByT5 tokens one by one. Each row is then reordered
  ``[real ByT5, real Qwen, ByT5 padding, Qwen padding]`` with the mask, and every block attends
  over ``[image, text]`` (image first) with that mask on the text keys. The timestep (and
  guidance) embedding sees no text. ``transformer_blocks[i].attn`` (double-stream) project image
  and text separately (``to_out`` / ``to_add_out``); ``single_transformer_blocks[j].attn`` get
  both and return their attention outputs unprojected. ``HunyuanImageAttnProcessor`` applies RMS
  norms per head and the rotary embedding to the image tokens only: text tokens carry no
  position;
* attention-level methods: the negatives are carried by the Qwen stream (the prompt's meaning is
  there; ByT5 only spells quoted text), each encoded alone by the pipeline's own ``encode_prompt``
  and cut to its real tokens. They are appended to ``encoder_hidden_states`` marked as padding in
  ``encoder_attention_mask``, so the model's reorder puts them last, after the prompt's padding:
  the text stream is ``[P, N_1, ...]`` with ``P`` the whole reordered prompt (the positive mask
  is its real tokens). ``context_embedder.forward`` is patched to refine the prompt's tokens alone,
  exactly as unpatched, and each negative alone as a prompt of its own (its own masked mean, its
  own self-attention): nothing of a negative reaches the positive path outside the guided
  attention. The guided call uses the core's masks, not the model's;
* the pipelines' own CFG is their ``guider`` (``AdaptiveProjectedMixGuidance`` on the base model;
  any diffusers guider): one transformer call per branch, inside ``cache_context("pred_cond")``
  and ``cache_context("pred_uncond")``: only ``pred_cond`` is guided. Without a guider (the
  distilled model: guidance embedding and MeanFlow's ``timestep_r``) one call per step.

``negative_prompt_embeds``: a tensor ``(1 or prompts or rows, n, 3584)`` of real Qwen tokens, or a
dict ``{"prompt_embeds": ..., "prompt_embeds_mask": ..., "prompt_embeds_2": ..., "prompt_embeds_mask_2":
...}`` with ``encode_prompt``'s outputs (CFG needs all four on the base pipeline, the first two on
the refiner).
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
from negguide.adapter import merge_heads
from negguide.errors import NegativePromptError
from negguide.errors import NoAdapterError
from negguide.errors import warn

#: the names of ``encode_prompt``'s outputs, in order, as ``negative_prompt_embeds`` takes them
OUTPUTS = ("prompt_embeds", "prompt_embeds_mask", "prompt_embeds_2", "prompt_embeds_mask_2")


@hookimpl
def register_adapters(register) -> None:  # noqa: ANN001
    register(HunyuanImageAdapter)


class HunyuanImageAdapter(JointAttentionAdapter):
    """Adapter for ``HunyuanImageTransformer2DModel`` (HunyuanImage 2.1, 2.1 Distilled, 2.1 Refiner)."""

    family = "hunyuanimage"
    text_mask_input = "encoder_attention_mask"
    batched_inputs = ("hidden_states", "timestep", "timestep_r", "guidance")
    conditioning_inputs = {
        "encoder_hidden_states": "embeds",
        "encoder_attention_mask": "mask",
        "encoder_hidden_states_2": "glyph",
        "encoder_attention_mask_2": "glyph_mask",
    }
    patched_methods = ("context_embedder.forward",)

    @classmethod
    def matches(cls, denoiser: Any) -> bool:
        from diffusers import HunyuanImageTransformer2DModel

        return isinstance(denoiser, HunyuanImageTransformer2DModel)

    # ------------------------------------------------------------------ encoding

    def encode_negative(self, text: str, call: EncodeCall, padded: bool) -> Conditioning:
        # the pipeline's own encoder, one prompt alone: (Qwen, its mask[, ByT5, its mask])
        outputs = call.encode(prompt=[text], device=call.device, batch_size=1, num_images_per_prompt=1)
        embeds, mask = outputs[0], outputs[1].bool()
        glyph = {} if len(outputs) < 4 else {"glyph": outputs[2], "glyph_mask": outputs[3]}
        if padded:  # CFG: exactly the pipeline's own negative, both streams
            return Conditioning(embeds, mask, glyph)
        if glyph and bool(glyph["glyph_mask"].any()):
            warn(
                f"negguide: the negative {text!r} quotes text, which HunyuanImage also spells out for its glyph "
                "(ByT5) stream; attention-level methods guide with its Qwen tokens only (its meaning, not the "
                "quoted glyphs). Use 'cfg' to guide with both streams."
            )
        return Conditioning(embeds[:, : int(mask[0].sum())])  # only real tokens (right padding, masked encoder)

    def negative_from_embeds(self, embeds: Any, call: EncodeCall, padded: bool) -> Conditioning:
        given = dict(embeds) if isinstance(embeds, dict) else {"prompt_embeds": embeds}
        unknown = sorted(set(given) - set(OUTPUTS))
        tensor = given.get("prompt_embeds")
        if unknown or not isinstance(tensor, torch.Tensor) or tensor.ndim != 3:
            raise NegativePromptError(
                "hunyuanimage: expected `negative_prompt_embeds` as a (rows, tokens, text_embed_dim) tensor of real "
                f"Qwen tokens or a dict with keys {list(OUTPUTS)} (encode_prompt's outputs), got "
                f"{f'the keys {unknown}' if unknown else type(tensor).__name__}."
            )
        mask = given.get("prompt_embeds_mask")
        extras = {}
        if given.get("prompt_embeds_2") is not None:
            extras["glyph"] = given["prompt_embeds_2"]
            extras["glyph_mask"] = given.get("prompt_embeds_mask_2")
            if extras["glyph_mask"] is None:
                raise NegativePromptError(
                    "hunyuanimage: expected `prompt_embeds_mask_2` beside `prompt_embeds_2`, got None. Pass "
                    "encode_prompt's fourth output too."
                )
        return Conditioning(tensor, None if mask is None else mask.bool(), extras)

    # ------------------------------------------------------------------ joining the negatives

    def join(self, kwargs: dict[str, Any], negative: torch.Tensor, mask: torch.Tensor | None) -> Joined:
        text, pos = kwargs[self.text_input], kwargs[self.text_mask_input]
        out = dict(kwargs)
        out[self.text_input] = torch.cat([text, negative.to(device=text.device, dtype=text.dtype)], dim=1)
        # marked as padding: the model's reorder puts them after everything of the prompt (their own masks are
        # the core's; the patched context_embedder refines them with those)
        out[self.text_mask_input] = torch.cat([pos, pos.new_zeros(negative.shape[:2])], dim=1)
        glyph, glyph_mask = kwargs.get("encoder_hidden_states_2"), kwargs.get("encoder_attention_mask_2")
        real = pos.bool().sum(1)
        length = text.shape[1]
        if glyph is not None and self.find_denoisers()[0].context_embedder_2 is not None:  # the model reorders
            real, length = real + glyph_mask.bool().sum(1), length + glyph.shape[1]
        pos_mask = torch.arange(length, device=real.device)[None] < real[:, None]
        return Joined(out, length, pos_mask)

    def patched(self, name: str, original: Callable[..., Any], forward: Any, *args: Any, **kwargs: Any) -> Any:
        # context_embedder(hidden_states, timestep, attention_mask): the prompt's tokens, then the negative block
        hidden, timestep, mask = _refiner_inputs(*args, **kwargs)
        n = forward.text.num_text - forward.text.num_pos
        p = hidden.shape[1] - n
        parts = [original(hidden[:, :p], timestep, None if mask is None else mask[:, :p])]
        for (a, b), neg_mask in zip(forward.spans, forward.masks):
            start = a - forward.text.num_pos + p
            if neg_mask is not None:  # a row without a token of this negative keeps one (never read): no 0/0 mean
                neg_mask = neg_mask.clone()
                neg_mask[~neg_mask.any(1), 0] = True
            parts.append(original(hidden[:, start : start + b - a], timestep, neg_mask))
        return torch.cat(parts, dim=1)

    # ------------------------------------------------------------------ attention level

    def attention_modules(self, denoiser: torch.nn.Module) -> dict[str, int]:
        from diffusers.models.transformers.transformer_hunyuanimage import HunyuanImageAttnProcessor

        double = len(denoiser.transformer_blocks)
        modules = {f"transformer_blocks.{i}.attn.processor": i for i in range(double)}
        for j in range(len(denoiser.single_transformer_blocks)):
            modules[f"single_transformer_blocks.{j}.attn.processor"] = double + j
        processors = denoiser.attn_processors
        for name, index in modules.items():
            if not isinstance(processors[name], HunyuanImageAttnProcessor):
                raise NoAdapterError(
                    f"hunyuanimage: expected HunyuanImageAttnProcessor in block {index}, got "
                    f"{type(processors[name]).__name__}. Restore it with `pipe.transformer.set_attn_processor("
                    "HunyuanImageAttnProcessor())` or use 'cfg'."
                )
        return modules

    # the blocks call attn(hidden_states=..., encoder_hidden_states=..., attention_mask=..., image_rotary_emb=...)
    def project(
        self,
        attn: Any,
        text: TextLayout,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> Projected | None:
        if encoder_hidden_states is None:
            return None
        # attention_mask hides the text padding (and the negatives, marked as padding): the core's masks replace it
        from diffusers.models.embeddings import apply_rotary_emb

        double = attn.add_q_proj is not None
        t = encoder_hidden_states.shape[1]
        joint = hidden_states if double else torch.cat([hidden_states, encoder_hidden_states], dim=1)
        q, k, v = (f(joint).unflatten(2, (attn.heads, -1)) for f in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if double:
            tq, tk, tv = (f(encoder_hidden_states).unflatten(2, (attn.heads, -1))
                          for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))  # fmt: skip
            if attn.norm_added_q is not None:
                tq = attn.norm_added_q(tq)
            if attn.norm_added_k is not None:
                tk = attn.norm_added_k(tk)
        else:
            q, tq, k, tk, v, tv = q[:, :-t], q[:, -t:], k[:, :-t], k[:, -t:], v[:, :-t], v[:, -t:]
        if image_rotary_emb is not None:  # the image tokens only
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        image = QKV(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, L, D)
        return Projected(image, QKV(tq.transpose(1, 2), tk.transpose(1, 2), tv.transpose(1, 2)), carry=double)

    def finish(self, attn: Any, projected: Projected, image: torch.Tensor, text: torch.Tensor | None) -> Any:
        dtype = projected.image.q.dtype  # type: ignore[union-attr]
        img, txt = merge_heads(image, dtype), merge_heads(text, dtype)  # type: ignore[arg-type]
        if projected.carry:  # double-stream: the output projections; single-stream blocks project after attention
            img = attn.to_out[1](attn.to_out[0](img))
            txt = attn.to_add_out(txt)
        return img, txt


def _refiner_inputs(
    hidden_states: torch.Tensor, timestep: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``HunyuanImageTokenRefiner.forward``'s arguments, however they were passed."""
    return hidden_states, timestep, attention_mask
