"""Facts shared by the Wan-style families: Wan 2.1 / 2.2 (``adapters/wan.py``) and SkyReels-V2 (``skyreels.py``).

Both denoisers (diffusers ``transformer_wan.py``, ``transformer_skyreels_v2.py``, whose attention,
processor and blocks are Wan's under another name) share these facts, stated once here:

* text enters every block through the cross-attention ``blocks[i].attn2`` only (self-attention
  ``attn1`` never sees it); ``encoder_hidden_states`` is the raw UMT5 output ``(B, P, text_dim)``,
  zero-padded to ``max_sequence_length``, and the transformer's text embedder
  (``PixArtAlphaTextProjection``) is per token, so the negatives' raw UMT5 tokens, encoded without
  padding, are appended after it: ``[P, N_1, ...]``;
* the pipelines' ``_get_t5_prompt_embeds`` cleans the text (``prompt_clean``), tokenizes it padded
  to ``max_sequence_length``, encodes it with UMT5 under the padding mask and zeroes the padding:
  a negative encoded at exactly its real token count (end-of-sequence included) is its real tokens;
* image-to-video (``image_dim`` set): the transformer embeds ``encoder_hidden_states_image`` and
  puts it *ahead* of the text, so ``attn2`` sees ``[image_ctx, P, N]``. The processors hard-code
  ``image_context_length = total - 512``; the guided call splits at ``total - (P + N)`` and
  computes the image-context attention exactly like the original (``add_k_proj``/``add_v_proj``
  or the fused ``to_added_kv``, ``norm_added_k``, unguided), added to the guided text attention,
  then ``to_out``;
* the processors are called as ``(attn, hidden_states, encoder_hidden_states, attention_mask,
  rotary_emb)``: q/k RMS norms over all heads (``norm_q``/``norm_k`` before the head split), the
  default softmax scale; ``attn2`` gets no mask and no rotary embedding;
* the pipelines' own CFG runs a separate forward inside ``cache_context("uncond")``: that forward
  is left unguided.

This module is private (its name starts with ``_``): it registers no adapter.
"""

from __future__ import annotations

import importlib
from typing import Any
from typing import ClassVar

import torch

from negguide.adapter import QKV
from negguide.adapter import Conditioning
from negguide.adapter import CrossAttentionAdapter
from negguide.adapter import EncodeCall
from negguide.adapter import Projected
from negguide.adapter import TextLayout
from negguide.adapter import heads
from negguide.adapter import merge_heads
from negguide.attention import sdpa
from negguide.errors import NegativePromptError
from negguide.errors import NegGuideError
from negguide.errors import NoAdapterError


class WanFamilyAdapter(CrossAttentionAdapter):
    """The shared facts above; a family states its denoiser classes, inputs and attention modules."""

    num_per_prompt_arg = "num_videos_per_prompt"
    pad_text_with_zeros = True
    #: the model's name in messages
    model_name: ClassVar[str] = "Wan"
    #: the diffusers module whose ``prompt_clean`` the family's pipelines clean their prompts with
    prompt_module: ClassVar[str] = "diffusers.pipelines.wan.pipeline_wan"
    #: the family's attention processors (module, class names; the ``2_0`` names are older diffusers' own): a guided
    #: module with any other processor is refused, its computation being unknown
    processor_classes: ClassVar[tuple[str, tuple[str, ...]]] = (
        "diffusers.models.transformers.transformer_wan", ("WanAttnProcessor", "WanAttnProcessor2_0"),
    )  # fmt: skip

    def checked(self, denoiser: torch.nn.Module, modules: dict[str, int]) -> dict[str, int]:
        """``modules`` after checking that each holds one of the family's own processors (``NoAdapterError``)."""
        module = importlib.import_module(self.processor_classes[0])
        known = tuple(c for c in (getattr(module, n, None) for n in self.processor_classes[1]) if isinstance(c, type))
        processors = denoiser.attn_processors
        for name in modules:
            processor = processors.get(name)
            if not isinstance(processor, known):
                raise NoAdapterError(
                    f"{self.family}: expected {self.processor_classes[1][0]} on `{name}`, got "
                    f"{type(processor).__name__}: negguide cannot guide a processor whose computation it does not "
                    f"know. Restore it with `pipe.transformer.set_attn_processor({self.processor_classes[1][0]}())` "
                    "or use 'cfg'."
                )
        return modules

    def encode_negative(self, text: str, call: EncodeCall, padded: bool) -> Conditioning:
        msl = int(call.arguments.get("max_sequence_length") or 512)
        pipe = self.pipe
        if padded:
            embeds, _ = call.encode(
                prompt=[text], negative_prompt=None, do_classifier_free_guidance=False, num_videos_per_prompt=1,
                max_sequence_length=msl, device=call.device, dtype=call.dtype,
            )  # fmt: skip
            return Conditioning(embeds)
        prompt_clean = importlib.import_module(self.prompt_module).prompt_clean
        # count the real tokens exactly as `_get_t5_prompt_embeds` tokenizes (cleaned text, eos included)
        n = len(pipe.tokenizer(prompt_clean(text), truncation=True, max_length=msl).input_ids)
        embeds = pipe._get_t5_prompt_embeds(prompt=[text], num_videos_per_prompt=1, max_sequence_length=n,
                                            device=call.device, dtype=call.dtype)  # fmt: skip
        return Conditioning(embeds)

    def negative_from_embeds(self, embeds: Any, call: EncodeCall, padded: bool) -> Conditioning:
        width = self.find_denoisers()[0].config.text_dim
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[-1] != width:
            got = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise NegativePromptError(
                f"{self.family}: expected `negative_prompt_embeds` as a (rows, tokens, {width}) tensor of UMT5 "
                f"embeddings, got {got}. Encode it with `pipe.encode_prompt(..., do_classifier_free_guidance=False)`."
            )
        return Conditioning(embeds)

    def project(
        self,
        attn: Any,
        text: TextLayout,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: Any = None,
    ) -> Projected | None:
        if encoder_hidden_states is None or rotary_emb is not None:
            return None  # a self-attention call: not ours
        if attention_mask is not None:
            raise NegGuideError(
                f"{self.family}: the guided cross-attention got an `attention_mask`, which {self.model_name} blocks "
                "never pass; expected None. Remove the guidance (negguide.remove(pipe)) to use a custom mask."
            )
        context = encoder_hidden_states
        image_context = None
        if attn.add_k_proj is not None:  # the image context is ahead of the text: [image_ctx, P, N]
            n_image = context.shape[1] - text.num_text
            image_context, context = context[:, :n_image], context[:, n_image:]
        query = attn.to_q(hidden_states)
        if getattr(attn, "fused_projections", False):
            key, value = attn.to_kv(context).chunk(2, dim=-1)
        else:
            key, value = attn.to_k(context), attn.to_v(context)
        q, k, v = heads(attn.norm_q(query), attn.heads), heads(attn.norm_k(key), attn.heads), heads(value, attn.heads)
        return Projected(QKV(q, None, None), QKV(None, k, v), carry=image_context)

    def finish(self, attn: Any, projected: Projected, image: torch.Tensor, text: torch.Tensor | None) -> Any:
        q = projected.image.q
        out = merge_heads(image, q.dtype)  # type: ignore[union-attr]
        if projected.carry is not None:
            out = out + image_attention(attn, q, projected.carry)  # type: ignore[arg-type]
        return attn.to_out[1](attn.to_out[0](out))


def image_attention(attn: Any, q: torch.Tensor, image_context: torch.Tensor) -> torch.Tensor:
    """The unguided attention of the video queries ``q`` (B, H, L, D) over the image context, ``(B, L, H * D)``."""
    if getattr(attn, "fused_projections", False):
        key, value = attn.to_added_kv(image_context).chunk(2, dim=-1)
    else:
        key, value = attn.add_k_proj(image_context), attn.add_v_proj(image_context)
    k, v = heads(attn.norm_added_k(key), attn.heads), heads(value, attn.heads)
    return merge_heads(sdpa(q, k, v), q.dtype)
