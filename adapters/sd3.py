"""Stable Diffusion 3 / 3.5 (MMDiT, joint attention, image tokens first).

Model facts owned here:

* text enters as ``encoder_hidden_states`` = ``[CLIP (77, features padded to the T5 width) ; T5]``;
  the negative is appended after it, encoded without padding (CLIP and T5 parts each cut to
  their real tokens), so the text stream is ``[P, N]``; the pooled vector stays the positive one;
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

from collections.abc import Callable
from typing import Any

import torch

from negguide import hookimpl
from negguide.adapter import EncodeCall
from negguide.adapter import GuidedProcessor
from negguide.adapter import JointAttentionAdapter
from negguide.adapter import Negative
from negguide.adapter import rows_for_call
from negguide.adapter import stack_negatives
from negguide.method import Segments


@hookimpl
def register_adapters(register) -> None:  # noqa: ANN001
    register(SD3Adapter)


class SD3Adapter(JointAttentionAdapter):
    """Adapter for ``SD3Transformer2DModel`` (SD3, SD3.5 Medium/Large/Turbo, img2img, inpaint)."""

    family = "sd3"

    @classmethod
    def matches(cls, transformer: Any) -> bool:
        from diffusers import SD3Transformer2DModel

        return isinstance(transformer, SD3Transformer2DModel)

    # ------------------------------------------------------------------ encoding

    def encode_negative(self, prompts: list[str], call: EncodeCall, encode: Callable[..., Any]) -> Negative:
        args = call.arguments
        msl = int(args.get("max_sequence_length") or 256)
        if self.method.level == "prediction":
            embeds, _, pooled, _ = encode(
                prompt=prompts,
                prompt_2=None,
                prompt_3=None,
                device=call.device,
                num_images_per_prompt=call.num_per_prompt,
                do_classifier_free_guidance=False,
                clip_skip=args.get("clip_skip"),
                max_sequence_length=msl,
                lora_scale=args.get("lora_scale"),
            )
            return Negative(embeds.to(call.dtype), extras={"pooled": pooled})
        rows = [self._encode_unpadded(p, msl, call) for p in prompts]
        return stack_negatives(rows, call)

    def _encode_unpadded(self, prompt: str, msl: int, call: EncodeCall) -> torch.Tensor:
        pipe = self.pipe
        width = pipe.transformer.config.joint_attention_dim
        if not prompt.strip():
            return torch.zeros(1, 0, width, device=call.device, dtype=call.dtype)
        clip_skip = call.arguments.get("clip_skip")
        parts = []
        if pipe.text_encoder is not None:
            n_clip = len(pipe.tokenizer(prompt, truncation=True, max_length=pipe.tokenizer_max_length).input_ids)
            c1, _ = pipe._get_clip_prompt_embeds(
                prompt=[prompt], device=call.device, clip_skip=clip_skip, clip_model_index=0
            )
            c2, _ = pipe._get_clip_prompt_embeds(
                prompt=[prompt], device=call.device, clip_skip=clip_skip, clip_model_index=1
            )
            clip = torch.cat([c1, c2], dim=-1)[:, :n_clip]  # CLIP is causal: cutting the padding is exact
            parts.append(torch.nn.functional.pad(clip, (0, width - clip.shape[-1])))
        if pipe.text_encoder_3 is not None:
            n_t5 = len(pipe.tokenizer_3(prompt, truncation=True, max_length=msl).input_ids)
            # T5 attends to every token: encode at exactly the real length (no padding at all)
            parts.append(pipe._get_t5_prompt_embeds(prompt=[prompt], max_sequence_length=n_t5, device=call.device))
        return torch.cat([p.to(call.dtype) for p in parts], dim=1)

    def negative_from_embeds(self, embeds: Any, call: EncodeCall) -> Negative:
        embeds, pooled = self.split_negative_embeds(embeds)
        embeds = rows_for_call(embeds, call).to(device=call.device, dtype=call.dtype)
        extras = (
            {} if pooled is None else {"pooled": rows_for_call(pooled, call).to(device=call.device, dtype=call.dtype)}
        )
        return Negative(embeds, extras=extras)

    def _on_encode(self, arguments: dict[str, Any], output: Any, original: Callable[..., Any]) -> None:
        self._call_batch = output[0].shape[0]
        super()._on_encode(arguments, output, original)

    def uncond_rows(self, kwargs: dict[str, Any], context: str | None) -> slice | None:
        batch = kwargs["hidden_states"].shape[0]
        if getattr(self, "_call_batch", None) and batch == 2 * self._call_batch:
            return slice(0, self._call_batch)  # the pipeline's own CFG batch is [uncond, cond]
        return super().uncond_rows(kwargs, context)

    # ------------------------------------------------------------------ prediction level

    def negative_inputs(self, kwargs: dict[str, Any], rows: slice, neg: Negative) -> dict[str, Any]:
        n = rows.stop - rows.start
        return {
            "hidden_states": kwargs["hidden_states"][rows],
            "timestep": kwargs["timestep"][rows],
            "encoder_hidden_states": self.repeat_rows(neg.embeds, n),
            "pooled_projections": self.repeat_rows(neg.extras["pooled"], n),
        }

    # ------------------------------------------------------------------ attention level

    def attention_layers(self, transformer: torch.nn.Module) -> dict[str, int]:
        return {f"transformer_blocks.{i}.attn.processor": i for i in range(len(transformer.transformer_blocks))}

    def make_processor(self, original: Any, index: int, num_layers: int) -> Any:
        return SD3GuidedProcessor(self, original, index, num_layers)

    def extend_inputs(self, kwargs: dict[str, Any], neg: Negative) -> dict[str, Any]:
        text = kwargs["encoder_hidden_states"]
        batch = text.shape[0]
        full, mask = self.negative_rows(neg, batch, text.dtype, text.device)
        self.state.num_pos = text.shape[1]
        self.state.neg_mask = mask
        return {**kwargs, "encoder_hidden_states": torch.cat([text, full], dim=1)}


class SD3GuidedProcessor(GuidedProcessor):
    """Joint attention of one SD3 block with the negative tokens split out for the method."""

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        state = self.adapter.state
        if not state.active or encoder_hidden_states is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        batch = hidden_states.shape[0]
        heads = attn.heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        tq = split(attn.add_q_proj(encoder_hidden_states))
        tk = split(attn.add_k_proj(encoder_hidden_states))
        tv = split(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            tq = attn.norm_added_q(tq)
        if attn.norm_added_k is not None:
            tk = attn.norm_added_k(tk)
        p = state.num_pos
        seg = Segments(
            "joint",
            q, k, v,
            tq[:, :, :p], tk[:, :, :p], tv[:, :, :p],
            tq[:, :, p:], tk[:, :, p:], tv[:, :, p:],
            neg_mask=state.neg_mask,
        )  # fmt: skip
        out = self.adapter.run_method(seg, self.index, self.num_layers, self.layer_guided)

        def merge(x: torch.Tensor) -> torch.Tensor:
            return x.transpose(1, 2).reshape(batch, -1, heads * x.shape[-1]).to(q.dtype)

        img = attn.to_out[1](attn.to_out[0](merge(out.img)))
        text = merge(torch.cat([out.pos, out.neg], dim=2))
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return img, text
