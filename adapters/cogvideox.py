"""CogVideoX (video DiT, text and video tokens in one joint sequence, text first; T2V, I2V, V2V, Fun control).

Model facts owned here (diffusers 0.42.1, ``models/transformers/cogvideox_transformer_3d.py``,
``models/embeddings.py`` (``CogVideoXPatchEmbed``), ``models/attention_processor.py``
(``CogVideoXAttnProcessor2_0``) and ``pipelines/cogvideo/``):

* one denoiser, ``CogVideoXTransformer3DModel``, for ``CogVideoXPipeline``,
  ``CogVideoXImageToVideoPipeline`` (the image latents are concatenated to the video latents'
  channels; 1.5 adds an ``ofs`` embedding), ``CogVideoXVideoToVideoPipeline`` and
  ``CogVideoXFunControlPipeline`` (control latents concatenated to the channels);
* text enters only as ``encoder_hidden_states``: T5 outputs, padded to ``max_sequence_length`` (226)
  and encoded WITHOUT an attention mask, so T5 and the transformer both attend to the padding (no
  text mask anywhere). ``patch_embed`` projects the text per token (``text_proj``), joins it ahead of
  the video patches and adds the positional embedding over the whole ``[text, video]`` sequence,
  whose length is fixed at ``max_text_seq_length + patches``: sinusoidal with a zero text part
  (CogVideoX-2b), learned (CogVideoX-5b-I2V: the text part is a learned table too) or none
  (rotary models). Then every block's ``attn1`` runs one attention over ``[text, video]``
  (``CogVideoXAttnProcessor2_0`` or the fused one: shared ``to_q``/``to_k``/``to_v``, LayerNorm on
  q and k per head, the rotary embedding on the video tokens only, one ``to_out`` for both);
  the modulated norms and the feed-forward act per token, and the output head reads the video
  tokens only: the text reaches the video only through ``attn1``;
* attention-level methods: each negative, encoded alone without padding (T5 at exactly its real
  token count, end-of-sequence included), is appended to ``encoder_hidden_states`` (``[P, N_1, ...]``,
  so the blocks see a longer text stream). ``patch_embed.forward`` is patched: it embeds ``[P, video]``
  exactly as before (positions included) and inserts the negatives' projected tokens after ``P``,
  each with the text positional embedding of a prompt's token ``j`` at its token ``j`` (zero, or
  the learned table's row ``j``); no rotary embedding touches text. The guided ``attn1`` follows
  VSF's joint layout (the isolated collector ``N`` plus the flipped copy seen only by video
  queries); an ``attention_mask`` is refused;
* the pipelines' own CFG (``guidance_scale > 1``) runs one batch ``[uncond, cond]`` (inside
  ``cache_context("cond_uncond")``): only the ``cond`` half is guided. ``use_dynamic_cfg`` changes
  the pipeline's own guidance scale per step, nothing negguide reads (its ``cfg`` keeps ``scale``).

``negative_prompt_embeds``: a tensor ``(1 or prompts or rows, n, text_embed_dim)`` of T5 outputs as
``encode_prompt`` returns them. Attention-level methods use every given token (pass only real
tokens); prediction-level methods (CFG) run the negative branch batched beside the positive one,
so its ``n`` must equal the positive's (the call's ``max_sequence_length``).
"""

from __future__ import annotations

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
from negguide.adapter import merge_heads
from negguide.errors import ConfigError
from negguide.errors import NegativePromptError
from negguide.errors import NoAdapterError


@hookimpl
def register_adapters(register) -> None:  # noqa: ANN001
    register(CogVideoXAdapter)


class CogVideoXAdapter(JointAttentionAdapter):
    """Adapter for ``CogVideoXTransformer3DModel`` (CogVideoX 1.0 / 1.5: T2V, I2V, V2V, Fun control)."""

    family = "cogvideox"
    pipeline_cfg = "batched"
    num_per_prompt_arg = "num_videos_per_prompt"
    patched_methods = ("patch_embed.forward",)

    @classmethod
    def matches(cls, denoiser: Any) -> bool:
        from diffusers import CogVideoXTransformer3DModel

        return isinstance(denoiser, CogVideoXTransformer3DModel)

    def encode_negative(self, text: str, call: EncodeCall, padded: bool) -> Conditioning:
        msl = int(call.arguments.get("max_sequence_length") or 226)
        if padded:  # as the pipeline encodes its own negative, at the positive's length (batched beside it)
            embeds, _ = call.encode(
                prompt=[text], negative_prompt=None, do_classifier_free_guidance=False, num_videos_per_prompt=1,
                max_sequence_length=msl, device=call.device, dtype=call.dtype,
            )  # fmt: skip
            return Conditioning(embeds)
        pipe = self.pipe
        # T5 (run without a mask) attends to every token it is given: encoding at exactly the real length is no padding
        n = len(pipe.tokenizer(text, truncation=True, max_length=msl).input_ids)
        embeds = pipe._get_t5_prompt_embeds(prompt=[text], num_videos_per_prompt=1, max_sequence_length=n,
                                            device=call.device, dtype=call.dtype)  # fmt: skip
        return Conditioning(embeds)

    def negative_from_embeds(self, embeds: Any, call: EncodeCall, padded: bool) -> Conditioning:
        width = self.find_denoisers()[0].config.text_embed_dim
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[-1] != width:
            got = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise NegativePromptError(
                f"cogvideox: expected `negative_prompt_embeds` as a (rows, tokens, {width}) tensor of T5 embeddings, "
                f"got {got}. Encode it with `pipe.encode_prompt(..., do_classifier_free_guidance=False)`."
            )
        return Conditioning(embeds)

    def patched(self, name: str, original: Callable[..., Any], forward: Any, *args: Any, **kwargs: Any) -> Any:
        # patch_embed(text_embeds, image_embeds): [P, video] as the model embeds it, then each negative after P
        embed = original.__self__  # type: ignore[attr-defined]
        text_embeds, image_embeds = _inputs(*args, **kwargs)
        p = forward.text.num_pos
        out = original(text_embeds[:, :p], image_embeds)
        negative = embed.text_proj(text_embeds[:, p:])
        if _learned_table_used(embed, image_embeds):  # a prompt's token j sits at the learned table's row j
            table = embed.pos_embedding[:, : embed.max_text_seq_length]
            rows = torch.cat([table[:, : b - a] for a, b in forward.spans], dim=1)
            negative = negative + rows.to(device=negative.device, dtype=negative.dtype)
        # (sinusoidal positions are zero on every text token; rotary ones never touch text)
        return torch.cat([out[:, :p], negative.to(out.dtype), out[:, p:]], dim=1)

    def attention_modules(self, denoiser: torch.nn.Module) -> dict[str, int]:
        from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
        from diffusers.models.attention_processor import FusedCogVideoXAttnProcessor2_0

        modules = {}
        for i, block in enumerate(denoiser.transformer_blocks):
            processor = block.attn1.processor
            if not isinstance(processor, (CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0)):
                raise NoAdapterError(
                    f"cogvideox: expected CogVideoXAttnProcessor2_0 in block {i}, got {type(processor).__name__}. "
                    "Restore it with `pipe.transformer.set_attn_processor(CogVideoXAttnProcessor2_0())` or use 'cfg'."
                )
            modules[f"transformer_blocks.{i}.attn1.processor"] = i
        return modules

    # CogVideoXBlock calls attn1(hidden_states=..., encoder_hidden_states=..., image_rotary_emb=..., **attention_kwargs)
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
                f"cogvideox: expected no attention mask in a guided CogVideoX attention (the pipelines pass none), got "
                f"one of shape {tuple(attention_mask.shape)}. Remove `attention_mask` from attention_kwargs."
            )
        t = encoder_hidden_states.shape[1]
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # text first
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(joint).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(joint), attn.to_k(joint), attn.to_v(joint)
        q, k, v = (x.unflatten(-1, (attn.heads, -1)).transpose(1, 2) for x in (q, k, v))  # (B, H, L, D)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if image_rotary_emb is not None:  # the video tokens only
            from diffusers.models.embeddings import apply_rotary_emb

            q = torch.cat([q[:, :, :t], apply_rotary_emb(q[:, :, t:], image_rotary_emb)], dim=2)
            if not attn.is_cross_attention:
                k = torch.cat([k[:, :, :t], apply_rotary_emb(k[:, :, t:], image_rotary_emb)], dim=2)
        return Projected(QKV(q[:, :, t:], k[:, :, t:], v[:, :, t:]), QKV(q[:, :, :t], k[:, :, :t], v[:, :, :t]))

    def finish(self, attn: Any, projected: Projected, image: torch.Tensor, text: torch.Tensor | None) -> Any:
        dtype = projected.image.q.dtype  # type: ignore[union-attr]
        t = text.shape[2]  # type: ignore[union-attr]
        out = attn.to_out[1](attn.to_out[0](merge_heads(torch.cat([text, image], dim=2), dtype)))  # type: ignore[list-item]
        return out[:, t:], out[:, :t]


def _learned_table_used(embed: Any, image_embeds: torch.Tensor) -> bool:
    """Whether ``CogVideoXPatchEmbed`` adds its learned table in this call: only at the size it was trained for; at
    another frame count it computes sinusoidal positions, zero on the text (``models/embeddings.py``)."""
    if not embed.use_learned_positional_embeddings:
        return False
    frames, height, width = image_embeds.shape[1], image_embeds.shape[-2], image_embeds.shape[-1]
    trained = (embed.sample_frames, embed.sample_height, embed.sample_width)
    return trained == ((frames - 1) * embed.temporal_compression_ratio + 1, height, width)


def _inputs(text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``CogVideoXPatchEmbed.forward(text_embeds, image_embeds)``'s arguments, passed by position or by name."""
    return text_embeds, image_embeds
