"""Qwen-Image (MMDiT with dual-stream joint attention in every block, text first; Edit, Edit-Plus, img2img, inpaint).

Model facts owned here (diffusers 0.42.1, ``models/transformers/transformer_qwenimage.py`` and
``pipelines/qwenimage/pipeline_qwenimage*.py``):

* text enters as ``encoder_hidden_states`` ``(rows, L, joint_attention_dim)``: the last hidden
  state of the Qwen2.5-VL text encoder with the chat template's first
  ``prompt_template_encode_start_idx`` tokens dropped (34 for text-to-image, 64 for the Edit
  pipelines, whose text also holds the input image's vision tokens); one prompt is never
  padded, several are zero-padded to the longest, with ``encoder_hidden_states_mask`` ``(rows,
  L)`` (``None`` when every token is real). The transformer treats the text per token
  (``txt_norm``, ``txt_in``, per-token modulation and MLP); the timestep embedding sees no text;
  so the text reaches the image only through the joint attention;
* every ``transformer_blocks[i].attn`` (``QwenDoubleStreamAttnProcessor2_0``, called with
  keywords) runs one attention over ``[text, image]``, text first; Edit pipelines append the
  input image's latent tokens to the image tokens, so everything after the text is ``I``;
* rotary embedding: the transformer gives text token ``j`` the position ``m + j`` on every axis
  (``m`` = the largest half-size of the image grids, ``QwenEmbedRope``) over the text's whole
  length. The negatives, each encoded alone and without padding, are appended to the text
  (``[P, N_1, ...]``, the mask extended by the default ``join``); the guided call rotates each
  negative's token ``j`` at ``m + j``, where the model puts token ``j`` of a prompt (so also its
  own negative branch), whatever the positive's length or padding;
* the guided call uses the core's padding masks (the positive's and each negative's), never the
  processor's mask; an ``attention_mask`` is refused, as the original processor refuses it;
* the pipeline's own CFG (``true_cfg_scale > 1`` with a ``negative_prompt``) runs the negative as
  a separate transformer call inside ``cache_context("uncond")`` (the conditional call is inside
  ``cache_context("cond")``) and rescales the combination to the conditional prediction's norm:
  only the conditional call is guided. Lightning-style use (``true_cfg_scale=1``, few steps) runs
  one call per step, guided.

``negative_prompt_embeds``: a tensor ``(1 or prompts or rows, n, joint_attention_dim)`` as
``encode_prompt`` returns its first output (every given token is used), or a dict
``{"prompt_embeds": ..., "prompt_embeds_mask": (rows, n) or None}`` (``encode_prompt``'s two
outputs; ``False``/0 marks padding).
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
from negguide.adapter import merge_heads
from negguide.errors import ConfigError
from negguide.errors import NegativePromptError
from negguide.errors import NoAdapterError


@hookimpl
def register_adapters(register) -> None:  # noqa: ANN001
    register(QwenImageAdapter)


class QwenImageAdapter(JointAttentionAdapter):
    """Adapter for ``QwenImageTransformer2DModel`` (Qwen-Image, Edit, Edit-Plus, img2img, inpaint, ControlNet)."""

    family = "qwenimage"
    text_mask_input = "encoder_hidden_states_mask"
    batched_inputs = ("hidden_states", "timestep", "guidance", "additional_t_cond")
    conditioning_inputs = {"encoder_hidden_states": "embeds", "encoder_hidden_states_mask": "mask"}

    @classmethod
    def matches(cls, denoiser: Any) -> bool:
        from diffusers import QwenImageTransformer2DModel

        return isinstance(denoiser, QwenImageTransformer2DModel)

    def encode_negative(self, text: str, call: EncodeCall, padded: bool) -> Conditioning:
        # the pipeline's own encoder with the call's settings (the Edit pipelines' input images included): it drops
        # the template's first tokens, and one prompt alone has no padding, exactly as the pipeline's own negative
        if padded:
            self._check_batched_branch(call)
        arguments = {**call.arguments, "prompt": [text], "prompt_embeds": None, "prompt_embeds_mask": None,
                     "num_images_per_prompt": 1, "device": call.device}  # fmt: skip
        embeds, mask = call.encode(**arguments)
        if mask is not None:  # only real tokens, should a pipeline ever pad a single prompt
            embeds = embeds[:, : int(mask[0].bool().sum())]
        return Conditioning(embeds)

    def negative_from_embeds(self, embeds: Any, call: EncodeCall, padded: bool) -> Conditioning:
        if padded:
            self._check_batched_branch(call)
        mask = None
        if isinstance(embeds, dict):
            mask = embeds.get("prompt_embeds_mask")
            embeds = embeds.get("prompt_embeds")
        width = self.find_denoisers()[0].config.joint_attention_dim
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[-1] != width:
            got = (
                f"a tensor of shape {tuple(embeds.shape)}"
                if isinstance(embeds, torch.Tensor)
                else type(embeds).__name__
            )
            raise NegativePromptError(
                f"qwenimage: expected `negative_prompt_embeds` as a (rows, tokens, {width}) tensor or a dict with "
                f"`prompt_embeds` and `prompt_embeds_mask`, got {got}. Pass what `pipe.encode_prompt` returns."
            )
        if mask is not None and tuple(mask.shape) != tuple(embeds.shape[:2]):
            raise NegativePromptError(
                f"qwenimage: expected `prompt_embeds_mask` of shape {tuple(embeds.shape[:2])} (rows, tokens), got "
                f"{tuple(mask.shape)}. Pass the mask `pipe.encode_prompt` returns with the embeddings."
            )
        return Conditioning(embeds, None if mask is None else mask.bool())

    def _check_batched_branch(self, call: EncodeCall) -> None:
        # zero_cond_t modulates the image tokens by `img_shapes`, which holds one entry per prompt (not per row)
        if call.prompts > 1 and getattr(self.find_denoisers()[0].config, "zero_cond_t", False):
            raise NegativePromptError(
                f"qwenimage: prediction-level methods run the negative branch batched beside the prompts, which a "
                f"transformer with `zero_cond_t` cannot do for several prompts (its modulation follows `img_shapes`, "
                f"one entry per prompt): expected one prompt per call, got {call.prompts}. Call the pipeline once "
                "per prompt, or use an attention-level method (vsf, nag, nasa)."
            )

    def attention_modules(self, denoiser: torch.nn.Module) -> dict[str, int]:
        from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

        modules = {}
        for i, block in enumerate(denoiser.transformer_blocks):
            processor = block.attn.processor
            if not isinstance(processor, QwenDoubleStreamAttnProcessor2_0):
                raise NoAdapterError(
                    f"qwenimage: expected QwenDoubleStreamAttnProcessor2_0 in block {i}, got "
                    f"{type(processor).__name__}. Restore it with `pipe.transformer.set_attn_processor("
                    "QwenDoubleStreamAttnProcessor2_0())` or use 'cfg'."
                )
            if getattr(processor, "_parallel_config", None) is not None:
                raise NoAdapterError(
                    "qwenimage: expected a transformer without context parallelism, got one whose processors split "
                    "the text stream across devices (which cuts through the appended negative tokens). Run without "
                    "`enable_parallelism`, or use 'cfg'."
                )
            modules[f"transformer_blocks.{i}.attn.processor"] = i
        return modules

    # QwenImageTransformerBlock calls its attention with these keywords, in the processor's order
    def project(
        self,
        attn: Any,
        text: TextLayout,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> Projected | None:
        if encoder_hidden_states is None:
            return None  # the original processor refuses it with its own message
        if attention_mask is not None:
            raise ConfigError(
                f"qwenimage: expected no attention mask in a guided Qwen-Image attention (the model builds its own "
                f"from the text mask), got one of shape {tuple(attention_mask.shape)}. Remove `attention_mask` from "
                "attention_kwargs."
            )
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        head_dim = attn.inner_dim // attn.heads
        q, k, v = (f(hidden_states).unflatten(-1, (-1, head_dim)) for f in (attn.to_q, attn.to_k, attn.to_v))
        tq, tk, tv = (
            f(encoder_hidden_states).unflatten(-1, (-1, head_dim))
            for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        )
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if attn.norm_added_q is not None:
            tq = attn.norm_added_q(tq)
        if attn.norm_added_k is not None:
            tk = attn.norm_added_k(tk)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            txt_freqs = text_positions(txt_freqs, text)
            q, k = (apply_rotary_emb_qwen(x, img_freqs, use_real=False) for x in (q, k))
            tq, tk = (apply_rotary_emb_qwen(x, txt_freqs, use_real=False) for x in (tq, tk))
        image = QKV(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, L, D)
        return Projected(image, QKV(tq.transpose(1, 2), tk.transpose(1, 2), tv.transpose(1, 2)))

    def finish(self, attn: Any, projected: Projected, image: torch.Tensor, text: torch.Tensor | None) -> Any:
        dtype = projected.image.q.dtype  # type: ignore[union-attr]
        img = attn.to_out[0](merge_heads(image, dtype))
        if len(attn.to_out) > 1:
            img = attn.to_out[1](img)  # dropout
        return img, attn.to_add_out(merge_heads(text, dtype))  # type: ignore[arg-type]


def text_positions(txt_freqs: torch.Tensor, text: TextLayout) -> torch.Tensor:
    """The text stream's rotary table: the positive keeps the model's positions, negative token ``j`` gets the
    position of a prompt's token ``j`` (row ``j`` of the model's table), each negative counted from its start."""
    spans = text.spans or ((text.num_pos, text.num_text),)
    return torch.cat([txt_freqs[: text.num_pos], *(txt_freqs[: b - a] for a, b in spans)], dim=0)
