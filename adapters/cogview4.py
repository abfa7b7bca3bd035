"""CogView4 (``CogView4Pipeline``, ``CogView4ControlPipeline``; one joint attention per block, text first).

Model facts owned here (diffusers 0.42.1, ``models/transformers/transformer_cogview4.py`` and
``pipelines/cogview4/pipeline_cogview4*.py``):

* text enters only as ``encoder_hidden_states`` ``(rows, L, text_embed_dim)``: the GLM-4 encoder's
  ``hidden_states[-2]`` (``_get_glm_embeds``). Prompts are tokenized with ``[gMASK] <sop>`` in
  front, padded to the longest, then left-padded with the pad token to a multiple of 16, and
  encoded without an attention mask: the padding tokens are real, attended tokens (in the causal
  GLM they come first, so every real token sees them) and no text mask reaches the transformer;
* the transformer treats text per token outside attention (``patch_embed.text_proj``, per-token
  norms, modulation and feed-forward); the timestep embedding sees the image size conditions
  (``original_size``, ``target_size``, ``crop_coords``), never the text. The text reaches the
  image only through ``transformer_blocks[i].attn1`` (``CogView4AttnProcessor``, called as
  ``(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)``): one
  attention over ``[text, image]`` with shared projections, per-head LayerNorm on q and k, the
  rotary embedding on the image tokens only, and ``to_out`` over the whole sequence. Text tokens
  carry no position, so the negatives, appended to the text (``[P, N_1, ...]``), need none;
* each negative is encoded alone, without padding: its own tokens (prefix included, truncated at
  the call's ``max_sequence_length``) through the pipeline's GLM, no pad token in front (the pad
  tokens would change every real token of a causal encoder);
* the pipeline's own CFG (``guidance_scale > 1``) runs the negative as a separate transformer call
  (``CogView4Pipeline``: inside ``cache_context("uncond")``; ``CogView4ControlPipeline``: the
  second call of a step, with other text): only the conditional call is guided. negguide's CFG
  batches each negative beside the prompt, so it encodes the negative left-padded to the prompt's
  token count, as the pipeline encodes a shorter prompt batched with a longer one (the same as
  the pipeline's own negative when both round to the same multiple of 16); a negative longer than
  the prompt is refused;
* the transformer's own ``attention_mask`` input (which the pipelines never pass) is refused in a
  guided call.

``negative_prompt_embeds``: a tensor ``(1 or prompts or rows, n, text_embed_dim)`` as
``encode_prompt`` returns it (attention-level methods use every given token, so pass only real
tokens; CFG needs the prompt's token count ``n``).
"""

from __future__ import annotations

from typing import Any

import torch

from negguide import hookimpl
from negguide.adapter import QKV
from negguide.adapter import Conditioning
from negguide.adapter import EncodeCall
from negguide.adapter import JointAttentionAdapter
from negguide.adapter import Projected
from negguide.adapter import TextLayout
from negguide.adapter import heads
from negguide.adapter import merge_heads
from negguide.errors import ConfigError
from negguide.errors import NegativePromptError
from negguide.errors import NoAdapterError


@hookimpl
def register_adapters(register) -> None:  # noqa: ANN001
    register(CogView4Adapter)


class CogView4Adapter(JointAttentionAdapter):
    """Adapter for ``CogView4Transformer2DModel`` (CogView4 text-to-image, CogView4 Control)."""

    family = "cogview4"
    batched_inputs = ("hidden_states", "timestep", "original_size", "target_size", "crop_coords")

    @classmethod
    def matches(cls, denoiser: Any) -> bool:
        from diffusers import CogView4Transformer2DModel

        return isinstance(denoiser, CogView4Transformer2DModel)

    def encode_negative(self, text: str, call: EncodeCall, padded: bool) -> Conditioning:
        pipe = self.pipe
        if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
            raise NegativePromptError(
                "cogview4: expected the pipeline's GLM text encoder and tokenizer to encode the negative prompt, got "
                "None. Pass negative_prompt_embeds instead."
            )
        msl = int(call.arguments.get("max_sequence_length") or 1024)
        ids = pipe.tokenizer(text, max_length=msl, truncation=True, add_special_tokens=True,
                             return_tensors="pt").input_ids  # fmt: skip
        if padded:  # batched beside the prompt: left-padded to its length, as the pipeline pads prompts
            length = self.positive(call.output).shape[1]
            if ids.shape[1] > length:
                raise NegativePromptError(
                    f"cogview4: CFG runs the negative batched beside the prompt, so it expected at most {length} "
                    f"negative tokens (the prompt's, padding included), got {ids.shape[1]} for {text!r}. Use a "
                    "shorter negative prompt, or an attention-level method (vsf, nag, nasa)."
                )
            pad = ids.new_full((1, length - ids.shape[1]), pipe.tokenizer.pad_token_id)
            ids = torch.cat([pad, ids], dim=1)
        embeds = pipe.text_encoder(ids.to(call.device), output_hidden_states=True).hidden_states[-2]
        return Conditioning(embeds.to(call.dtype))

    def negative_from_embeds(self, embeds: Any, call: EncodeCall, padded: bool) -> Conditioning:
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3:
            got = (
                f"a tensor of shape {tuple(embeds.shape)}"
                if isinstance(embeds, torch.Tensor)
                else type(embeds).__name__
            )
            raise NegativePromptError(
                f"cogview4: expected `negative_prompt_embeds` as a (rows, tokens, text_embed_dim) tensor, got {got}. "
                "Pass what `pipe.encode_prompt` returns (only the real tokens for attention-level methods)."
            )
        return Conditioning(embeds)

    def attention_modules(self, denoiser: torch.nn.Module) -> dict[str, int]:
        from diffusers.models.transformers.transformer_cogview4 import CogView4AttnProcessor

        modules = {}
        for i, block in enumerate(denoiser.transformer_blocks):
            processor = block.attn1.processor
            if not isinstance(processor, CogView4AttnProcessor):
                raise NoAdapterError(
                    f"cogview4: expected CogView4AttnProcessor in block {i}, got {type(processor).__name__}. Restore "
                    "it with `block.attn1.set_processor(CogView4AttnProcessor())` or use 'cfg'."
                )
            modules[f"transformer_blocks.{i}.attn1.processor"] = i
        return modules

    def project(
        self,
        attn: Any,
        text: TextLayout,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> Projected:
        if attention_mask is not None:
            raise ConfigError(
                f"cogview4: expected no attention mask in a guided CogView4 attention (the pipelines pass none), got "
                f"one of shape {tuple(attention_mask.shape)}. Call the transformer without `attention_mask`."
            )
        from diffusers.models.embeddings import apply_rotary_emb

        dtype, t = encoder_hidden_states.dtype, encoder_hidden_states.shape[1]
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        q, k, v = (heads(f(joint), attn.heads) for f in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q).to(dtype)
        if attn.norm_k is not None:
            k = attn.norm_k(k).to(dtype)
        iq, ik = q[:, :, t:], k[:, :, t:]
        if image_rotary_emb is not None:  # the image tokens only: text tokens carry no position
            iq = apply_rotary_emb(iq, image_rotary_emb, use_real_unbind_dim=-2)
            ik = apply_rotary_emb(ik, image_rotary_emb, use_real_unbind_dim=-2)
        image = QKV(iq, ik, v[:, :, t:])
        return Projected(image, QKV(q[:, :, :t], k[:, :, :t], v[:, :, :t]))

    def finish(self, attn: Any, projected: Projected, image: torch.Tensor, text: torch.Tensor | None) -> Any:
        t = text.shape[2]  # type: ignore[union-attr]
        out = merge_heads(torch.cat([text, image], dim=2), projected.image.q.dtype)  # type: ignore[list-item, union-attr]
        out = attn.to_out[1](attn.to_out[0](out))  # one output projection over [text, image]
        return out[:, t:], out[:, :t]
