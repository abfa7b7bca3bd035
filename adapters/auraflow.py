"""AuraFlow (``AuraFlowPipeline``; MMDiT joint blocks, then single blocks, text first, register tokens).

Model facts owned here (diffusers 0.42.1, ``models/transformers/auraflow_transformer_2d.py``,
``models/attention_processor.py`` and ``pipelines/aura_flow/pipeline_aura_flow.py``):

* text enters as ``encoder_hidden_states`` ``(rows, L, joint_attention_dim)``: the UMT5 encoder's last hidden
  state of the prompt padded to ``max_sequence_length`` (256), multiplied by the padding mask, so padding
  tokens are zero vectors. The transformer takes no text mask: it ATTENDS to the padding tokens (each becomes
  the same learnt token: zero through the bias-free ``context_embedder``, then the blocks' modulation);
* inside ``forward`` the text goes through ``context_embedder`` (a bias-free Linear, per token) and 8 learnt
  ``register_tokens`` are prepended: the text stream is ``[R, T]``. ``joint_transformer_blocks`` run one
  attention over ``[R, T, I]`` (``attn.add_*_proj`` for the text stream, ``to_*`` for the image), then
  ``single_transformer_blocks`` over the concatenation ``[R, T, I]``; every attention is
  ``AuraFlowAttnProcessor2_0`` (``__call__(attn, hidden_states, encoder_hidden_states=None, *args,
  **kwargs)``: q/k/v, per-head fp32 LayerNorms on q and k (``norm_added_q/k`` on the text stream), SDPA with
  ``attn.scale``, ``to_out`` / ``to_add_out``). No positional encoding reaches the text (the image's positions
  are a learnt table added in ``pos_embed``); the modulation comes from the timestep only;
* the register tokens are no text: they sit with the image tokens (``I`` = ``[R, image]``), so a negative sees
  them as the negative's own prompt would, and they see the positive text as before.

Attention-level methods: each negative, encoded without padding (its real UMT5 tokens, ``</s>`` included), is
appended to ``encoder_hidden_states`` (the default ``join``): the text stream becomes ``[R, P, N_1, ...]``
with ``P`` the positive's padded tokens, all attended as the model attends them (no positive mask).

The pipeline's CFG (``guidance_scale > 1``) runs one batch ``[uncond, cond]`` whose negative is encoded like the
prompt (zero vectors on its padding): only ``cond`` is guided; negguide's CFG zero-pads its negatives the same
way, so it equals the pipeline's CFG. The fused processor (``fuse_qkv_projections``) is refused.

``negative_prompt_embeds``: a tensor ``(1 or prompts or rows, n, joint_attention_dim)`` (every token is used:
give the real ones), or a dict ``{"prompt_embeds": ..., "prompt_attention_mask": ...}`` as ``encode_prompt``
returns them (the mask ``(rows, n)``, or ``(rows, n * joint_attention_dim)`` as the pipeline reshapes it).
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
from negguide.adapter import embeds_and_mask
from negguide.adapter import heads
from negguide.adapter import merge_heads
from negguide.errors import NoAdapterError

#: the learnt register tokens the transformer prepends to the text stream (``register_tokens``, fixed at 8)
REGISTERS = 8


@hookimpl
def register_adapters(register) -> None:  # noqa: ANN001
    register(AuraFlowAdapter)


class AuraFlowAdapter(JointAttentionAdapter):
    """Adapter for ``AuraFlowTransformer2DModel`` (``AuraFlowPipeline``)."""

    family = "auraflow"
    pipeline_cfg = "batched"
    # the pipeline's own padding is zero vectors (embeds * mask) that the model attends: zero padding is exact
    pad_text_with_zeros = True

    @classmethod
    def matches(cls, denoiser: Any) -> bool:
        from diffusers import AuraFlowTransformer2DModel

        return isinstance(denoiser, AuraFlowTransformer2DModel)

    # ------------------------------------------------------------------ encoding

    def encode_negative(self, text: str, call: EncodeCall, padded: bool) -> Conditioning:
        # the negative as the pipeline encodes a prompt (its own negative takes the same path), at the prompt's length
        length = self.positive(call.output).shape[1]
        out = call.encode(prompt=[text], do_classifier_free_guidance=False, num_images_per_prompt=1,
                          device=call.device, max_sequence_length=length,
                          lora_scale=call.arguments.get("lora_scale"))  # fmt: skip
        embeds = out[0]
        if padded:
            return Conditioning(embeds)
        # UMT5's real tokens do not see the (masked) padding: they are the encoding without padding
        _, mask = embeds_and_mask("auraflow", {"prompt_embeds": embeds, "prompt_attention_mask": out[1]}, "", "")
        n = int(mask.sum())  # type: ignore[union-attr]
        return Conditioning(embeds[:, :n])

    def negative_from_embeds(self, embeds: Any, call: EncodeCall, padded: bool) -> Conditioning:
        hint = "Pass what `pipe.encode_prompt` returns."
        embeds, mask = embeds_and_mask("auraflow", embeds, "joint_attention_dim", hint)
        if mask is None:
            return Conditioning(embeds)
        if padded:  # the pipeline's padding: zero vectors, attended
            return Conditioning(embeds * mask[:, :, None].to(embeds.dtype))
        return Conditioning(embeds, mask)

    # ------------------------------------------------------------------ attention level

    def attention_modules(self, denoiser: torch.nn.Module) -> dict[str, int]:
        from diffusers.models.attention_processor import AuraFlowAttnProcessor2_0

        registers = denoiser.register_tokens.shape[1]
        if registers != REGISTERS:
            raise NoAdapterError(
                f"auraflow: expected {REGISTERS} register tokens (diffusers' AuraFlowTransformer2DModel), got "
                f"{registers}. Is this diffusers version supported?"
            )
        blocks = [*denoiser.joint_transformer_blocks, *denoiser.single_transformer_blocks]
        joint = len(denoiser.joint_transformer_blocks)
        modules = {}
        for i, block in enumerate(blocks):
            name = f"joint_transformer_blocks.{i}" if i < joint else f"single_transformer_blocks.{i - joint}"
            processor = block.attn.processor
            if not isinstance(processor, AuraFlowAttnProcessor2_0):
                hint = "call `transformer.unfuse_qkv_projections()`" if "Fused" in type(processor).__name__ else (
                    "restore it with `transformer.set_attn_processor(AuraFlowAttnProcessor2_0())`")  # fmt: skip
                raise NoAdapterError(
                    f"auraflow: expected AuraFlowAttnProcessor2_0 in {name}, got {type(processor).__name__}, which "
                    f"attention-level methods cannot guide: {hint}, or use 'cfg'."
                )
            modules[f"{name}.attn.processor"] = i
        return modules

    def project(
        self,
        attn: Any,
        text: TextLayout,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Projected:
        def qkv(x: torch.Tensor, to_q: Any, to_k: Any, to_v: Any, norm_q: Any, norm_k: Any) -> list[torch.Tensor]:
            q, k = heads(to_q(x), attn.heads), heads(to_k(x), attn.heads)
            # the fp32 LayerNorms act per head on (B, L, H, D) in the model: the same on (B, H, L, D)
            q, k = (q if norm_q is None else norm_q(q)), (k if norm_k is None else norm_k(k))
            return [q, k, heads(to_v(x), attn.heads)]

        image = qkv(hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
        if encoder_hidden_states is not None:  # a joint block: the text stream [R, P, N_1, ...] apart
            stream = qkv(encoder_hidden_states, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj,
                         attn.norm_added_q, attn.norm_added_k)  # fmt: skip
            r = encoder_hidden_states.shape[1] - text.num_text
            img = [torch.cat([s[:, :, :r], x], dim=2) for s, x in zip(stream, image)]  # I = [R, image]
            txt = [s[:, :, r:] for s in stream]
        else:  # a single block: [R, P, N_1, ..., image]
            r = REGISTERS
            t = r + text.num_text
            img = [torch.cat([x[:, :, :r], x[:, :, t:]], dim=2) for x in image]
            txt = [x[:, :, r:t] for x in image]
        return Projected(QKV(*img), QKV(*txt), scale=attn.scale, carry=(r, encoder_hidden_states is not None))

    def finish(self, attn: Any, projected: Projected, image: torch.Tensor, text: torch.Tensor | None) -> Any:
        r, joint = projected.carry
        dtype = projected.image.q.dtype  # type: ignore[union-attr]
        registers, image = image[:, :, :r], image[:, :, r:]
        if joint:
            out = attn.to_out[1](attn.to_out[0](merge_heads(image, dtype)))
            return out, attn.to_add_out(merge_heads(torch.cat([registers, text], dim=2), dtype))  # type: ignore[list-item]
        out = merge_heads(torch.cat([registers, text, image], dim=2), dtype)  # type: ignore[list-item]
        return attn.to_out[1](attn.to_out[0](out))
