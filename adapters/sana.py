"""Sana and Sana-Sprint (``SanaPipeline``, ``SanaSprintPipeline``, ``SanaSprintImg2ImgPipeline``; linear DiT).

Model facts owned here (diffusers 0.42.1: ``models/transformers/sana_transformer.py``,
``pipelines/sana/pipeline_sana{,_sprint,_sprint_img2img}.py``); Sana shares PixArt's padded text with a
2-D ``encoder_attention_mask`` turned into a ``-10000`` bias, stated in ``adapters/pixart.py``:

* the denoiser ``SanaTransformer2DModel`` is called with the latents positionally (``hidden_states``).
  Each ``SanaTransformerBlock`` has a LINEAR self-attention ``attn1`` (``SanaLinearAttnProcessor2_0``,
  image tokens only: never patched) and a softmax cross-attention ``attn2`` (``SanaAttnProcessor2_0``,
  defined in ``sana_transformer.py``: q/k RMS norms over all heads *before* the head split when
  ``qk_norm`` is set, as Sana-Sprint's ``"rms_norm_across_heads"``; SDPA's default scale), the only
  place the text is read;
* ``encoder_hidden_states`` is Gemma-2's last hidden state ``(rows, tokens, 2304)``, 3-D; inside the
  transformer ``caption_projection`` (Linear-GELU-Linear) and ``caption_norm`` (RMSNorm) act per token,
  and the modulation comes from the timestep (Sprint: plus ``guidance``, an embedding of
  ``guidance_scale``, not of the text), so appended negative tokens cannot leak;
* ``encode_prompt`` prepends the ``complex_human_instruction`` (CHI) to the prompt, pads to
  ``num_chi_tokens + max_sequence_length - 2`` and keeps token 0 (``<bos>``) and the last
  ``max_sequence_length - 1`` positions (``select_index``): the instruction's tokens but its last are
  dropped. Gemma is causal and the padding is on the right, so the real tokens of that padded
  encoding are exactly an encoding without padding: a negative is the pipeline's own encoding of the
  negative *as a prompt* (same CHI, same dropping, the call's ``max_sequence_length``) cut to its
  ``mask.sum()`` real tokens: ``attn2`` sees ``[P (padded), N_1, ...]``;
* ``SanaPipeline``'s CFG (``guidance_scale > 1``) runs one batch ``[uncond, cond]`` whose negative is
  encoded WITHOUT the CHI (``complex_human_instruction=False``): only ``cond`` is guided, and negguide's
  CFG encodes its negatives that way too. Sana-Sprint has no CFG and no ``negative_prompt``: its
  ``guidance_scale`` feeds the guidance embedding; negguide's CFG there runs the negative encoded as a
  prompt (with the CHI) beside it, ``guidance`` repeated;
* the PAG sibling ``SanaPAGPipeline`` batches ``[uncond, cond, perturbed]`` rows and is refused; in
  ``SanaControlNetPipeline`` the ControlNet reads the text through its own blocks' ``attn2``: refused
  (guide ``SanaPipeline``).

``negative_prompt_embeds``: a tensor ``(1 or prompts or rows, n, 2304)`` of Gemma embeddings as
``encode_prompt`` returns them, every token attended (keep the real ones: ``embeds[:, :mask.sum()]``),
or a dict ``{"prompt_embeds": ..., "prompt_attention_mask": (rows, n)}``. CFG zero-pads a shorter one to
the prompt's length and masks the padding.
"""

from __future__ import annotations

from typing import Any

import torch

from negguide import hookimpl
from negguide.adapter import QKV
from negguide.adapter import Conditioning
from negguide.adapter import EncodeCall
from negguide.adapter import Projected
from negguide.adapter import TextLayout
from negguide.adapter import heads
from negguide.adapter import merge_heads
from negguide.adapters.pixart import MaskedTextAdapter
from negguide.errors import NegGuideError
from negguide.errors import NoAdapterError


@hookimpl
def register_adapters(register) -> None:  # noqa: ANN001
    register(SanaAdapter)


class SanaAdapter(MaskedTextAdapter):
    """Adapter for ``SanaTransformer2DModel`` (``SanaPipeline``, ``SanaSprintPipeline``, Sana-Sprint img2img)."""

    family = "sana"
    batched_inputs = ("hidden_states", "timestep", "guidance")
    # NAG paper (arXiv 2505.21179) Table 5: SANA phi = 2 (nag_scale = 1 + phi = 3), tau 2.5, alpha 0.5
    # (/work/shared/METHODS.md section 2c); VSF and NASA have no published Sana values
    defaults = {"nag": {"scale": 3.0, "tau": 2.5, "alpha": 0.5}}

    @classmethod
    def matches(cls, denoiser: Any) -> bool:
        from diffusers import SanaTransformer2DModel

        return isinstance(denoiser, SanaTransformer2DModel)

    def find_denoisers(self) -> list[torch.nn.Module]:
        if getattr(self.pipe, "controlnet", None) is not None:
            raise NoAdapterError(
                f"sana: {type(self.pipe).__name__}'s ControlNet reads the text through its own cross-attention "
                "blocks and returns residuals negguide cannot combine; expected a pipeline whose text reaches only "
                "the transformer. Guide SanaPipeline, or use the pipeline's own `negative_prompt`."
            )
        return super().find_denoisers()

    def encode_negative(self, text: str, call: EncodeCall, padded: bool) -> Conditioning:
        args = call.arguments
        msl = int(args.get("max_sequence_length") or self.positive(call.output).shape[1])
        common = {"num_images_per_prompt": 1, "device": call.device, "clean_caption": args.get("clean_caption", False),
                  "max_sequence_length": msl, "lora_scale": args.get("lora_scale")}  # fmt: skip
        with_cfg = "negative_prompt" in args  # SanaPipeline; Sana-Sprint's encode_prompt has no negative
        if padded and with_cfg:  # exactly SanaPipeline's own negative: no CHI, at max_sequence_length, masked
            pos, pos_mask = call.output[0][:1], call.output[1][:1]
            out = call.encode(prompt=None, do_classifier_free_guidance=True, negative_prompt=[text], prompt_embeds=pos,
                              prompt_attention_mask=pos_mask, **common)  # fmt: skip
            return Conditioning(out[2], out[3].bool())
        # the negative as a prompt: the call's CHI and the pipeline's own token dropping
        extra = {"do_classifier_free_guidance": False} if with_cfg else {}
        out = call.encode(prompt=[text], complex_human_instruction=args.get("complex_human_instruction"), **common,
                          **extra)  # fmt: skip
        embeds, mask = out[0], out[1].bool()
        if padded:
            return Conditioning(embeds, mask)
        n = int(mask.sum())
        if not bool(mask[:, :n].all()):
            raise NegGuideError(
                f"sana: expected the real tokens of the encoded negative {text!r} first (right padding), got the mask "
                f"{mask.int().tolist()}. Pass `negative_prompt_embeds` with `prompt_attention_mask` instead."
            )
        return Conditioning(embeds[:, :n])  # Gemma is causal: the real tokens do not see the padding

    def attention_modules(self, denoiser: torch.nn.Module) -> dict[str, int]:
        from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0

        modules = {}
        for i, block in enumerate(denoiser.transformer_blocks):
            attn = getattr(block, "attn2", None)
            if attn is None:
                continue
            if not isinstance(attn.processor, SanaAttnProcessor2_0):
                raise NoAdapterError(
                    f"sana: expected SanaAttnProcessor2_0 in block {i}'s cross-attention, got "
                    f"{type(attn.processor).__name__}, which attention-level methods cannot guide. Restore it with "
                    "`block.attn2.set_processor(SanaAttnProcessor2_0())`, or use 'cfg'."
                )
            modules[f"transformer_blocks.{i}.attn2.processor"] = i
        if not modules:
            raise NoAdapterError(
                "sana: expected cross-attention blocks (`attn2`) in the transformer, got none "
                "(`cross_attention_dim` is None): the text never enters it. Use 'cfg'."
            )
        return modules

    def num_layers(self, denoiser: torch.nn.Module) -> int:
        return len(denoiser.transformer_blocks)

    # SanaAttnProcessor2_0 is called as (attn, hidden_states, encoder_hidden_states, attention_mask)
    def project(
        self,
        attn: Any,
        text: TextLayout,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> Projected | None:
        if encoder_hidden_states is None:
            return None  # a self-attention call: not ours
        self.check_bias(attention_mask, text)
        query, key, value = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        if attn.norm_q is not None:  # over all heads, before the split (rms_norm_across_heads)
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        q, k, v = heads(query, attn.heads), heads(key, attn.heads), heads(value, attn.heads)
        return Projected(QKV(q, None, None), QKV(None, k, v))  # SDPA's default scale, as the processor

    def finish(self, attn: Any, projected: Projected, image: torch.Tensor, text: torch.Tensor | None) -> Any:
        out = attn.to_out[1](attn.to_out[0](merge_heads(image, projected.image.q.dtype)))  # type: ignore[union-attr]
        return out / attn.rescale_output_factor
