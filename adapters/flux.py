"""Flux.1 (dev, schnell, Kontext; MMDiT with double- and single-stream blocks, text first).

Model facts owned here (those Flux shares with Chroma are stated once, in ``adapters/_flux_family.py``):

* text enters as ``encoder_hidden_states`` ``(rows, L, joint_attention_dim)`` = the T5 tokens
  (CLIP only gives the pooled vector ``pooled_projections``); the text position ids ``txt_ids``
  ``(L, 3)`` are zeros, so the rotary embedding treats every text token alike;
* attention-level methods: the negatives (each encoded without padding: T5 at exactly the real
  token count) are appended to the text stream, ``[P, N_1, ...]``, with as many zero rows in
  ``txt_ids`` (also the deprecated ``(rows, L, 3)`` form); the pooled vector stays the positive
  one. Every attention then runs over ``[P, N, I]``, text first;
* double-stream blocks ``transformer_blocks[i].attn`` project text and image separately
  (``to_out`` on the image, ``to_add_out`` on the text); single-stream blocks
  ``single_transformer_blocks[j].attn`` get the whole ``[text, image]`` sequence and return its
  attention output without projection. Both kinds are guided; for ``layers`` the double blocks
  are ``0 .. D-1`` and the single blocks ``D .. D+S-1``;
* Flux Kontext appends the conditioning image's tokens to the image tokens: everything after
  the text is ``I``;
* the pipeline's own true CFG (``true_cfg_scale > 1`` with a negative prompt) runs the
  unconditional branch as a separate transformer call, inside ``cache_context("uncond")`` in
  ``FluxPipeline`` and without a context in Kontext, img2img, inpaint and ControlNet (then the
  second call of a step with other text is that branch). Only the conditional call is guided;
* the guided attention refuses an ``attention_mask`` (Flux pipelines pass none);
* ControlNet (``FluxControlNetPipeline``): the residuals ``controlnet_block_samples`` /
  ``controlnet_single_block_samples`` are computed from the positive prompt and added to the image
  tokens. Attention-level methods leave the batch as it is; CFG repeats the guided rows' residuals
  for each negative branch, as the pipeline's own true CFG passes the same residuals to its
  unconditional call;
* IP-Adapter (``load_ip_adapter``: ``FluxIPAdapterAttnProcessor`` on the double-stream blocks):
  attention-level methods guide the joint attention and keep the image-prompt term exactly as the
  original processor computes it (``adapters/_flux_family.py``). CFG runs the negative branch with
  the positive rows' ``ip_adapter_image_embeds``: it equals the pipeline's true CFG with
  ``negative_ip_adapter_image_embeds=ip_adapter_image_embeds`` (the image prompt is kept in both
  branches, not amplified; the pipeline's default negative image, a black one, is not used).

``negative_prompt_embeds``: a tensor ``(1 or prompts or rows, n, joint_attention_dim)`` as
``encode_prompt`` returns its first output (attention-level methods use every given token, so
pass only real tokens), or a dict ``{"prompt_embeds": ..., "pooled_prompt_embeds": (1 or prompts
or rows, pooled_projection_dim)}``. Prediction-level methods (CFG) need the pooled vector and run
the negative branch batched beside the positive one, so its ``n`` must equal the positive token
count (the call's ``max_sequence_length``).
"""

from __future__ import annotations

from typing import Any

import torch

from negguide import hookimpl
from negguide.adapter import Conditioning
from negguide.adapter import EncodeCall
from negguide.adapter import text_and_pooled
from negguide.adapters._flux_family import FluxFamilyAdapter
from negguide.adapters._flux_family import t5_length
from negguide.errors import ConfigError
from negguide.errors import NegativePromptError


@hookimpl
def register_adapters(register) -> None:  # noqa: ANN001
    register(FluxAdapter)


class FluxAdapter(FluxFamilyAdapter):
    """Adapter for ``FluxTransformer2DModel`` (Flux.1 dev/schnell, Kontext, img2img, inpaint, ControlNet)."""

    family = "flux"
    # `_cp_plan`: encoder_hidden_states and txt_ids are split along the sequence with the image tokens
    context_parallel = "split"
    # a ControlNet's residuals are lists of (rows, image tokens, channels): the negative branch adds the same
    # residuals as its positive rows, as the pipelines' own true CFG reuses them for the unconditional call; an
    # IP-Adapter's image embeddings (one (rows, images, dim) tensor per adapter) are the positive rows' too
    batched_inputs = (
        "hidden_states",
        "timestep",
        "guidance",
        "controlnet_block_samples.*",
        "controlnet_single_block_samples.*",
        "joint_attention_kwargs.ip_adapter_image_embeds.*",
    )
    conditioning_inputs = {"encoder_hidden_states": "embeds", "pooled_projections": "pooled"}

    @classmethod
    def matches(cls, denoiser: Any) -> bool:
        from diffusers import FluxTransformer2DModel

        return isinstance(denoiser, FluxTransformer2DModel)

    def encode_negative(self, text: str, call: EncodeCall, padded: bool) -> Conditioning:
        pipe = self.pipe
        if padded:  # as the pipeline encodes its own negative, at the positive's length (batched beside it)
            embeds, pooled, _ = call.encode(
                prompt=[text], prompt_2=None, device=call.device, num_images_per_prompt=1,
                max_sequence_length=self.positive(call.output).shape[1], lora_scale=call.arguments.get("lora_scale"),
            )  # fmt: skip
            return Conditioning(embeds, extras={"pooled": pooled})
        if getattr(pipe, "text_encoder_2", None) is None or getattr(pipe, "tokenizer_2", None) is None:
            raise NegativePromptError(
                "flux: expected the pipeline's T5 encoder (`text_encoder_2`) to encode the negative prompt, got None. "
                "Pass negative_prompt_embeds instead."
            )
        n_t5 = t5_length(pipe, pipe.tokenizer_2, text, int(call.arguments.get("max_sequence_length") or 512))
        # T5 attends to every token: encoding at exactly the real length means no padding at all
        embeds = pipe._get_t5_prompt_embeds(prompt=[text], num_images_per_prompt=1, max_sequence_length=n_t5,
                                            device=call.device)  # fmt: skip
        return Conditioning(embeds)

    def negative_from_embeds(self, embeds: Any, call: EncodeCall, padded: bool) -> Conditioning:
        return text_and_pooled(self.family, embeds, needs_pooled=padded)

    def logit_mask(self, attention_mask: torch.Tensor | None) -> None:
        if attention_mask is not None:
            raise ConfigError(
                f"flux: expected no attention mask in a guided Flux attention, got one of shape "
                f"{tuple(attention_mask.shape)}. Remove `attention_mask` from joint_attention_kwargs."
            )
