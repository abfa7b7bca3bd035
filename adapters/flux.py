"""Flux.1 (dev, schnell, Kontext; MMDiT with double- and single-stream blocks, text first).

Model facts owned here:

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
* the guided attention refuses an ``attention_mask`` (Flux pipelines pass none).

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
from negguide.adapter import QKV
from negguide.adapter import Conditioning
from negguide.adapter import EncodeCall
from negguide.adapter import Joined
from negguide.adapter import JointAttentionAdapter
from negguide.adapter import Projected
from negguide.adapter import TextLayout
from negguide.adapter import merge_heads
from negguide.adapter import text_and_pooled
from negguide.errors import ConfigError
from negguide.errors import NegativePromptError
from negguide.errors import NoAdapterError


@hookimpl
def register_adapters(register) -> None:  # noqa: ANN001
    register(FluxAdapter)


class FluxAdapter(JointAttentionAdapter):
    """Adapter for ``FluxTransformer2DModel`` (Flux.1 dev/schnell, Kontext, img2img, inpaint, ControlNet)."""

    family = "flux"
    batched_inputs = ("hidden_states", "timestep", "guidance")
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
        msl = int(call.arguments.get("max_sequence_length") or 512)
        tokens = text
        convert = getattr(pipe, "maybe_convert_prompt", None)
        if convert is not None:  # textual inversion tokens, as _get_t5_prompt_embeds does
            tokens = convert([text], pipe.tokenizer_2)[0]
        n_t5 = len(pipe.tokenizer_2(tokens, truncation=True, max_length=msl).input_ids)
        # T5 attends to every token: encoding at exactly the real length means no padding at all
        embeds = pipe._get_t5_prompt_embeds(prompt=[text], num_images_per_prompt=1, max_sequence_length=n_t5,
                                            device=call.device)  # fmt: skip
        return Conditioning(embeds)

    def negative_from_embeds(self, embeds: Any, call: EncodeCall, padded: bool) -> Conditioning:
        return text_and_pooled(self.family, embeds, needs_pooled=padded)

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
        processors = denoiser.attn_processors
        for name, index in modules.items():
            if "IPAdapter" in type(processors[name]).__name__:
                raise NoAdapterError(
                    f"flux: expected FluxAttnProcessor in block {index}, got {type(processors[name]).__name__}. "
                    "Attention-level methods cannot guide IP-Adapter layers: unload the IP-Adapter "
                    "(pipe.unload_ip_adapter()) or use 'cfg'."
                )
        return modules

    # FluxAttention passes (hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb) positionally
    def project(
        self,
        attn: Any,
        text: TextLayout,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> Projected:
        if attention_mask is not None:
            raise ConfigError(
                f"flux: expected no attention mask in a guided Flux attention, got one of shape "
                f"{tuple(attention_mask.shape)}. Remove `attention_mask` from joint_attention_kwargs."
            )
        from diffusers.models.embeddings import apply_rotary_emb

        fused = getattr(attn, "fused_projections", False)
        if fused:
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q = attn.norm_q(q.unflatten(-1, (-1, attn.head_dim)))
        k = attn.norm_k(k.unflatten(-1, (-1, attn.head_dim)))
        v = v.unflatten(-1, (-1, attn.head_dim))
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
        t = text.num_text
        image = QKV(q[:, :, t:], k[:, :, t:], v[:, :, t:])
        return Projected(image, QKV(q[:, :, :t], k[:, :, :t], v[:, :, :t]), carry=encoder_hidden_states is not None)

    def finish(self, attn: Any, projected: Projected, image: torch.Tensor, text: torch.Tensor | None) -> Any:
        dtype = projected.image.q.dtype  # type: ignore[union-attr]
        if not projected.carry:  # single-stream: the [text, image] output, unprojected
            return merge_heads(torch.cat([text, image], dim=2), dtype)  # type: ignore[list-item]
        img = attn.to_out[1](attn.to_out[0](merge_heads(image, dtype)))
        return img, attn.to_add_out(merge_heads(text, dtype))  # type: ignore[arg-type]
