"""Stable Diffusion 3 / 3.5 (MMDiT, joint attention, image tokens first).

Model facts owned here:

* text enters as ``encoder_hidden_states`` = ``[CLIP (77, features padded to the T5 width) ; T5]``;
  the negatives are appended after it, each encoded without padding (CLIP and T5 parts each cut
  to their real tokens), so the text stream is ``[P, N_1, ...]``; the pooled vector stays the
  positive one;
* every ``transformer_blocks[i].attn`` is a joint attention with the image first: queries
  ``[I, P, N]``; SD3.5's image-only ``attn2`` is left alone; the last block's
  ``context_pre_only`` (no text output projection) is respected;
* the pipeline's own CFG runs one batch ``[uncond, cond]``: only the ``cond`` half is guided.

``negative_prompt_embeds``: a tensor ``(1 or prompts or rows, n, joint_attention_dim)`` as
``encode_prompt`` returns it (attention-level methods use every given token), or a dict
``{"prompt_embeds": ..., "pooled_prompt_embeds": (rows, pooled_dim)}``; the pooled vector is
required by prediction-level methods (CFG).
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
from negguide.adapter import text_and_pooled
from negguide.errors import NoAdapterError


@hookimpl
def register_adapters(register) -> None:  # noqa: ANN001
    register(SD3Adapter)


class SD3Adapter(JointAttentionAdapter):
    """Adapter for ``SD3Transformer2DModel`` (SD3, SD3.5 Medium/Large/Turbo, img2img, inpaint)."""

    family = "sd3"
    pipeline_cfg = "batched"
    conditioning_inputs = {"encoder_hidden_states": "embeds", "pooled_projections": "pooled"}

    @classmethod
    def matches(cls, denoiser: Any) -> bool:
        from diffusers import SD3Transformer2DModel

        return isinstance(denoiser, SD3Transformer2DModel)

    def _refuse_controlnet_cfg(self) -> None:
        """Prediction level with a ControlNet: refused (its residuals depend on each branch's prompt)."""
        if getattr(self.pipe, "controlnet", None) is not None:
            raise NoAdapterError(
                f"sd3: expected a pipeline without a ControlNet for 'cfg', got {type(self.pipe).__name__}: its own "
                "CFG runs the ControlNet on the negative prompt (and pooled vector) too, and negguide's CFG runs only "
                "the transformer's negative branch. Use the pipeline's own `negative_prompt` with guidance_scale > 1, "
                "or an attention-level method ('vsf', 'nag', 'nasa')."
            )

    def encode_negative(self, text: str, call: EncodeCall, padded: bool) -> Conditioning:
        if padded:
            self._refuse_controlnet_cfg()
        args = call.arguments
        msl = int(args.get("max_sequence_length") or 256)
        clip_skip = args.get("clip_skip")
        if padded:
            embeds, _, pooled, _ = call.encode(
                prompt=[text], prompt_2=None, prompt_3=None, device=call.device, num_images_per_prompt=1,
                do_classifier_free_guidance=False, clip_skip=clip_skip, max_sequence_length=msl,
                lora_scale=args.get("lora_scale"),
            )  # fmt: skip
            return Conditioning(embeds, extras={"pooled": pooled})
        pipe = self.pipe
        width = pipe.transformer.config.joint_attention_dim
        parts = []
        if pipe.text_encoder is not None:
            n_clip = len(pipe.tokenizer(text, truncation=True, max_length=pipe.tokenizer_max_length).input_ids)
            c1, _ = pipe._get_clip_prompt_embeds(prompt=[text], device=call.device, clip_skip=clip_skip,
                                                 clip_model_index=0)  # fmt: skip
            c2, _ = pipe._get_clip_prompt_embeds(prompt=[text], device=call.device, clip_skip=clip_skip,
                                                 clip_model_index=1)  # fmt: skip
            clip = torch.cat([c1, c2], dim=-1)[:, :n_clip]  # CLIP is causal: cutting the padding is exact
            parts.append(torch.nn.functional.pad(clip, (0, width - clip.shape[-1])))
        if pipe.text_encoder_3 is not None:
            n_t5 = len(pipe.tokenizer_3(text, truncation=True, max_length=msl).input_ids)
            # T5 attends to every token: encode at exactly the real length (no padding at all)
            parts.append(pipe._get_t5_prompt_embeds(prompt=[text], max_sequence_length=n_t5, device=call.device))
        return Conditioning(torch.cat([p.to(call.dtype) for p in parts], dim=1))

    def negative_from_embeds(self, embeds: Any, call: EncodeCall, padded: bool) -> Conditioning:
        if padded:
            self._refuse_controlnet_cfg()
        return text_and_pooled(self.family, embeds, needs_pooled=padded)

    def attention_modules(self, denoiser: torch.nn.Module) -> dict[str, int]:
        return {f"transformer_blocks.{i}.attn.processor": i for i in range(len(denoiser.transformer_blocks))}

    def project(
        self,
        attn: Any,
        text: TextLayout,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Projected | None:
        if encoder_hidden_states is None:
            return None
        h = attn.heads
        q, k, v = (heads(f(hidden_states), h) for f in (attn.to_q, attn.to_k, attn.to_v))
        tq, tk, tv = (heads(f(encoder_hidden_states), h) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if attn.norm_added_q is not None:
            tq, tk = attn.norm_added_q(tq), attn.norm_added_k(tk)
        return Projected(QKV(q, k, v), QKV(tq, tk, tv))

    def finish(self, attn: Any, projected: Projected, image: torch.Tensor, text: torch.Tensor | None) -> Any:
        dtype = projected.image.v.dtype  # type: ignore[union-attr]
        img = attn.to_out[1](attn.to_out[0](merge_heads(image, dtype)))
        txt = merge_heads(text, dtype)  # type: ignore[arg-type]
        return img, txt if attn.context_pre_only else attn.to_add_out(txt)
