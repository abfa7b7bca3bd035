"""Mochi 1 (``MochiPipeline``; video DiT, asymmetric joint attention over ``[video, text]``).

Model facts owned here (diffusers 0.42.1: ``models/transformers/transformer_mochi.py``,
``models/attention_processor.py`` (``MochiAttention``, ``MochiAttnProcessor2_0``), ``models/embeddings.py``
(``MochiCombinedTimestepCaptionEmbedding``, ``MochiAttentionPool``) and ``pipelines/mochi/pipeline_mochi.py``):

* one denoiser, ``MochiTransformer3DModel``, for ``MochiPipeline`` (the only Mochi pipeline). Its forward takes
  ``encoder_hidden_states`` (T5 outputs, ``(rows, tokens, text_embed_dim)``) and ``encoder_attention_mask``
  (``(rows, tokens)``, ``False`` on padding; required);
* the text enters twice. ``time_embed`` (``MochiCombinedTimestepCaptionEmbedding``) pools the masked text
  (``MochiAttentionPool``: attention from the masked mean over the tokens) into the conditioning vector that
  modulates every block, and projects each token to the text stream's own, smaller width
  (``caption_proj``: ``text_embed_dim`` -> ``pooled_projection_dim``). Appended negatives would leak into the
  pooled vector: ``time_embed.forward`` is patched to pool the prompt's tokens only (exactly as unpatched) and
  to project the negatives' tokens per token after them;
* every block's ``attn1`` (``MochiAttention``, a plain module with a ``processor`` attribute and no
  ``get_processor``) runs ``MochiAttnProcessor2_0``, called with the keywords ``hidden_states``,
  ``encoder_hidden_states``, ``attention_mask`` (the 2-D text mask) and ``image_rotary_emb``: the video
  through ``to_q/k/v``, the text through its own ``add_q_proj/add_k_proj/add_v_proj`` (the asymmetric part:
  both project to the same heads), RMS norms per head (``norm_q/k``, ``norm_added_q/k``), Mochi's rotary
  embedding (interleaved pairs, float32) on the video tokens only: text tokens carry no position, so a
  negative token is encoded exactly like a prompt token wherever it sits. Per sample it drops the masked
  text tokens, attends over ``[video, real text]`` with SDPA's default scale, and zero-fills the text
  outputs after the real ones; then ``to_out`` (video) and ``to_add_out`` (text; absent in the last block,
  ``context_pre_only``, whose text output is unused). The guided call uses the core's masks instead (the
  prompt's padding and each negative's, the same keys) and zeroes the text outputs at masked tokens, as
  the processor does for T5's right padding;
* a negative is the pipeline's own T5 encoding (T5 runs with the mask) cut to its real tokens: the blocks
  see ``[P (padded), N_1, ...]``. Empty prompts under ``force_zeros_for_empty_prompt`` are all-masked;
* the pipeline's own CFG (``guidance_scale > 1``, the default 4.5) runs one batch ``[uncond, cond]`` inside
  ``cache_context("cond_uncond")``: only ``cond`` is guided.

``negative_prompt_embeds``: a tensor ``(1 or prompts or rows, n, text_embed_dim)`` of T5 embeddings as
``encode_prompt`` returns them, every token attended (keep the real ones: ``embeds[:, :mask.sum()]``), or a dict
``{"prompt_embeds": ..., "prompt_attention_mask": (rows, n)}`` (``False`` hides a token). CFG runs the negative
beside the prompt: a shorter one is zero-padded to the prompt's length and masked, as the pipeline pads its own.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from negguide import hookimpl
from negguide.adapter import QKV
from negguide.adapter import Conditioning
from negguide.adapter import EncodeCall
from negguide.adapter import JointAttentionAdapter
from negguide.adapter import Projected
from negguide.adapter import TextLayout
from negguide.adapter import embeds_and_mask
from negguide.adapter import merge_heads
from negguide.errors import NegGuideError
from negguide.errors import NoAdapterError


@hookimpl
def register_adapters(register) -> None:  # noqa: ANN001
    register(MochiAdapter)


class MochiAdapter(JointAttentionAdapter):
    """Adapter for ``MochiTransformer3DModel`` (``MochiPipeline``)."""

    family = "mochi"
    pipeline_cfg = "batched"
    num_per_prompt_arg = "num_videos_per_prompt"
    text_mask_input = "encoder_attention_mask"
    conditioning_inputs = {"encoder_hidden_states": "embeds", "encoder_attention_mask": "mask"}
    patched_methods = ("time_embed.forward",)
    # no published per-family values for VSF, NAG or NASA on Mochi: the methods' own defaults (untuned)

    @classmethod
    def matches(cls, denoiser: Any) -> bool:
        from diffusers import MochiTransformer3DModel

        return isinstance(denoiser, MochiTransformer3DModel)

    def encode_negative(self, text: str, call: EncodeCall, padded: bool) -> Conditioning:
        # padded: at the prompt's length (the pipeline batches its own negative beside it); else the call's truncation
        length = self.positive(call.output).shape[1]
        msl = length if padded else int(call.arguments.get("max_sequence_length") or length)
        embeds, mask, _, _ = call.encode(
            prompt=[text], do_classifier_free_guidance=False, num_videos_per_prompt=1, max_sequence_length=msl,
            device=call.device, dtype=call.dtype,
        )  # fmt: skip
        if padded:  # exactly the pipeline's own negative: at the prompt's length, masked
            return Conditioning(embeds, mask.bool())
        return Conditioning(embeds[:, : int(mask.sum())])  # T5 masks its padding: the real tokens are exact

    def negative_from_embeds(self, embeds: Any, call: EncodeCall, padded: bool) -> Conditioning:
        width = self.find_denoisers()[0].config.text_embed_dim
        hint = "Encode it with `pipe.encode_prompt(..., do_classifier_free_guidance=False)`."
        return Conditioning(*embeds_and_mask("mochi", embeds, width, hint))

    def patched(self, name: str, original: Callable[..., Any], forward: Any, *args: Any, **kwargs: Any) -> Any:
        # time_embed(timestep, encoder_hidden_states, encoder_attention_mask, hidden_dtype): the conditioning vector
        # pools the prompt's tokens only (as unpatched); every token, the negatives too, goes through caption_proj
        inputs = inspect.signature(original).bind(*args, **kwargs).arguments
        text, mask, p = inputs["encoder_hidden_states"], inputs["encoder_attention_mask"], forward.text.num_pos
        temb, caption = original(inputs["timestep"], text[:, :p], mask[:, :p], inputs.get("hidden_dtype"))
        negatives = original.__self__.caption_proj(text[:, p:])  # type: ignore[attr-defined]
        return temb, torch.cat([caption, negatives.to(caption.dtype)], dim=1)

    def attention_modules(self, denoiser: torch.nn.Module) -> dict[str, int]:
        from diffusers.models.attention_processor import MochiAttnProcessor2_0

        modules = {}
        for i, block in enumerate(denoiser.transformer_blocks):
            processor = block.attn1.processor
            if not isinstance(processor, MochiAttnProcessor2_0):
                raise NoAdapterError(
                    f"mochi: expected MochiAttnProcessor2_0 in block {i}, got {type(processor).__name__}, which "
                    "attention-level methods cannot guide. Restore it with "
                    "`block.attn1.processor = MochiAttnProcessor2_0()`, or use 'cfg'."
                )
            modules[f"transformer_blocks.{i}.attn1.processor"] = i
        return modules

    def num_layers(self, denoiser: torch.nn.Module) -> int:
        return len(denoiser.transformer_blocks)

    # MochiTransformerBlock calls attn1(hidden_states=, encoder_hidden_states=, image_rotary_emb=, attention_mask=)
    def project(
        self,
        attn: Any,
        text: TextLayout,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Projected:
        if attention_mask is None or attention_mask.ndim != 2 or attention_mask.shape[1] != text.num_text:
            got = None if attention_mask is None else tuple(attention_mask.shape)
            raise NegGuideError(
                f"mochi: expected the (rows, {text.num_text}) text mask over [P, N...] in a guided attention (the "
                f"transformer passes `encoder_attention_mask` on), got {got}. Pass a 2-D `encoder_attention_mask`, "
                "or remove the guidance (negguide.remove(pipe))."
            )

        def qkv(x: torch.Tensor, projections: tuple[Any, ...], norm_q: Any, norm_k: Any) -> list[torch.Tensor]:
            q, k, v = (f(x).unflatten(2, (attn.heads, -1)) for f in projections)  # (B, L, H, D)
            return [q if norm_q is None else norm_q(q), k if norm_k is None else norm_k(k), v]

        q, k, v = qkv(hidden_states, (attn.to_q, attn.to_k, attn.to_v), attn.norm_q, attn.norm_k)
        if image_rotary_emb is not None:  # the video tokens only
            q, k = rotate(q, *image_rotary_emb), rotate(k, *image_rotary_emb)
        projections = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        tq, tk, tv = qkv(encoder_hidden_states, projections, attn.norm_added_q, attn.norm_added_k)

        def bhld(*xs: torch.Tensor) -> QKV:
            return QKV(*(x.transpose(1, 2) for x in xs))

        return Projected(bhld(q, k, v), bhld(tq, tk, tv), carry=(hidden_states.dtype, attention_mask.bool()))

    def finish(self, attn: Any, projected: Projected, image: torch.Tensor, text: torch.Tensor | None) -> Any:
        dtype, mask = projected.carry
        img = attn.to_out[1](attn.to_out[0](merge_heads(image, dtype)))
        # the processor zero-fills the masked text tokens' outputs (before to_add_out)
        txt = merge_heads(text * mask[:, None, :, None].to(text.dtype), dtype)  # type: ignore[index]
        if hasattr(attn, "to_add_out"):
            txt = attn.to_add_out(txt)
        return img, txt


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Mochi's rotary embedding of ``x`` ``(batch, tokens, heads, dim)``: interleaved pairs rotated in float32, as
    ``MochiAttnProcessor2_0`` applies it (``cos``, ``sin``: ``(tokens, heads, dim / 2)``)."""
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    out = (even * cos - odd * sin).to(x.dtype), (even * sin + odd * cos).to(x.dtype)
    return torch.stack(out, dim=-1).flatten(-2)
