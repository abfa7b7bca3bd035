"""LTX-Video 0.9.x (``LTXPipeline``, ``LTXImageToVideoPipeline``, ``LTXConditionPipeline``; video DiT, text through
cross-attention), including the distilled 13B checkpoints (0.9.7/0.9.8 distilled: CFG off, a few steps).

Model facts owned here (diffusers 0.42.1: ``models/transformers/transformer_ltx.py``,
``pipelines/ltx/pipeline_ltx{,_image2video,_condition,_i2v_long_multi_prompt}.py``); LTX shares PixArt's padded
text with a 2-D ``encoder_attention_mask`` turned into a ``-10000`` bias, stated in ``adapters/pixart.py``:

* every ``LTXVideoTransformerBlock`` has a self-attention ``attn1`` (video tokens only, rotary embeddings,
  ``encoder_hidden_states=None``: never patched) and a cross-attention ``attn2`` (``image_rotary_emb=None``,
  ``attention_mask`` = the text bias), the only place the text is read. Both run ``LTXVideoAttnProcessor``,
  called positionally as ``(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)``:
  q/k RMS norms across all heads *before* the head split, SDPA's default scale;
* ``encoder_hidden_states`` is T5's last hidden state ``(rows, tokens, 4096)``; inside the transformer
  ``caption_projection`` (Linear-GELU-Linear) acts per token and the modulation comes from the timestep only,
  so appended negative tokens cannot leak;
* ``encoder_attention_mask`` ``(rows, tokens)`` marks the prompt's padding (``max_sequence_length``: 128 by
  default, 256 in ``LTXConditionPipeline``); the transformer turns a 2-D mask into ``(1 - mask) * -10000`` of
  shape ``(rows, 1, tokens)``. The join extends the mask over the negatives; the guided call checks the bias
  spans ``[P, N...]`` and uses the core's boolean masks (the same information);
* ``_get_t5_prompt_embeds`` runs T5 WITHOUT its attention mask: the real tokens of a padded encoding have seen
  the padding. A negative is encoded without padding: the pipeline's own ``encode_prompt`` at
  ``max_sequence_length`` = its real token count (eos included), so T5 sees only its tokens:
  ``attn2`` sees ``[P (padded), N_1, ...]``;
* the pipelines' own CFG (``guidance_scale > 1``) runs one batch ``[uncond, cond]`` inside
  ``cache_context("cond_uncond")``: only ``cond`` is guided. The image-to-video and condition pipelines pass a
  per-token ``timestep`` ``(rows, tokens)`` (0 on conditioning frames) and the condition pipeline a
  ``video_coords`` ``(rows, 3, tokens)``, both batched likewise (CFG's negative branch takes its rows'
  entries); the long multi-prompt pipeline encodes one prompt per window and shares one ``video_coords`` row;
* the distilled 13B checkpoints run ``LTXConditionPipeline`` with ``guidance_scale=1`` and a handful of
  ``timesteps``: one forward per step, all guided;
* ``LTXLatentUpsamplePipeline`` has no transformer (a latent upsampler): nothing to guide.

``negative_prompt_embeds``: a tensor ``(1 or prompts or rows, n, 4096)`` of T5 embeddings as ``encode_prompt``
returns them, every token attended (drop the padding: ``embeds[:, :mask.sum()]``), or a dict
``{"prompt_embeds": ..., "prompt_attention_mask": (rows, n)}`` (0 hides a token). CFG zero-pads a shorter one to
the prompt's length and masks the padding, as the pipelines mask their own negative's.
"""

from __future__ import annotations

from typing import Any

import torch

from negguide import hookimpl
from negguide.adapter import QKV
from negguide.adapter import Conditioning
from negguide.adapter import EncodeCall
from negguide.adapter import Projected
from negguide.adapter import TextLayout
from negguide.adapter import heads
from negguide.adapter import merge_heads
from negguide.adapters.pixart import MaskedTextAdapter
from negguide.errors import NegGuideError
from negguide.errors import NoAdapterError


@hookimpl
def register_adapters(register) -> None:  # noqa: ANN001
    register(LTXAdapter)


class LTXAdapter(MaskedTextAdapter):
    """Adapter for ``LTXVideoTransformer3DModel`` (LTX-Video text-to-video, image-to-video, conditions)."""

    family = "ltx"
    num_per_prompt_arg = "num_videos_per_prompt"
    batched_inputs = ("hidden_states", "timestep", "video_coords")
    # no published per-family values for VSF, NAG or NASA on LTX-Video: the methods' own defaults (untuned)

    @classmethod
    def matches(cls, denoiser: Any) -> bool:
        from diffusers import LTXVideoTransformer3DModel

        return isinstance(denoiser, LTXVideoTransformer3DModel)

    def encode_negative(self, text: str, call: EncodeCall, padded: bool) -> Conditioning:
        pipe = self.pipe
        msl = int(call.arguments.get("max_sequence_length") or self.positive(call.output).shape[1])
        if not padded:
            # the real tokens as `_get_t5_prompt_embeds` tokenizes them (eos included, truncated as the call)
            msl = len(pipe.tokenizer(text, truncation=True, max_length=msl, add_special_tokens=True).input_ids)
        embeds, mask, _, _ = call.encode(
            prompt=[text], do_classifier_free_guidance=False, num_videos_per_prompt=1, max_sequence_length=msl,
            device=call.device, dtype=call.dtype,
        )  # fmt: skip
        if padded:  # exactly the pipelines' own negative: at the prompt's length, masked
            return Conditioning(embeds, mask.bool())
        return Conditioning(embeds)  # no padding token: T5 saw the negative's tokens only

    def attention_modules(self, denoiser: torch.nn.Module) -> dict[str, int]:
        from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor

        modules = {}
        for i, block in enumerate(denoiser.transformer_blocks):
            if not isinstance(block.attn2.processor, LTXVideoAttnProcessor):
                raise NoAdapterError(
                    f"ltx: expected LTXVideoAttnProcessor in block {i}'s cross-attention, got "
                    f"{type(block.attn2.processor).__name__}, which attention-level methods cannot guide. Restore it "
                    "with `block.attn2.set_processor(LTXVideoAttnProcessor())`, or use 'cfg'."
                )
            modules[f"transformer_blocks.{i}.attn2.processor"] = i
        return modules

    def num_layers(self, denoiser: torch.nn.Module) -> int:
        return len(denoiser.transformer_blocks)

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
            return None  # the self-attention attn1: not ours
        if image_rotary_emb is not None:
            raise NegGuideError(
                "ltx: expected no rotary embeddings in the text cross-attention (LTX blocks pass None), got some. "
                "Remove the guidance (negguide.remove(pipe)) for this model."
            )
        self.check_bias(attention_mask, text)
        query = attn.norm_q(attn.to_q(hidden_states))  # across all heads, before the split
        key = attn.norm_k(attn.to_k(encoder_hidden_states))
        q, k, v = heads(query, attn.heads), heads(key, attn.heads), heads(attn.to_v(encoder_hidden_states), attn.heads)
        return Projected(QKV(q, None, None), QKV(None, k, v))  # SDPA's default scale, as the processor

    def finish(self, attn: Any, projected: Projected, image: torch.Tensor, text: torch.Tensor | None) -> Any:
        return attn.to_out[1](attn.to_out[0](merge_heads(image, projected.image.q.dtype)))  # type: ignore[union-attr]
