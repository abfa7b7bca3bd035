"""Chroma (``ChromaPipeline``, ``ChromaImg2ImgPipeline``, ``ChromaInpaintPipeline``; a pruned Flux.1-schnell).

Model facts owned here (diffusers 0.42.1 ``transformer_chroma.py``, ``pipelines/chroma/``); the facts
Chroma shares with Flux (T5 text with zero ``txt_ids``, double- then single-stream blocks with
``FluxAttnProcessor``, RoPE over ``[text, image]``) are stated once, in ``adapters/_flux_family.py``:

* text enters only as ``encoder_hidden_states``: T5 tokens (the pipelines have no CLIP encoder and
  the denoiser no pooled vector); the modulation vectors come from the timestep alone
  (``distilled_guidance_layer`` over ``time_text_embed(timestep)``), so nothing outside the
  attention modules mixes text tokens, and the negatives are appended to the text stream,
  ``[P, N_1, ...]``, each encoded without padding (T5 at exactly its real token count);
* ``attention_mask`` ``(rows, L + I)`` covers the text then the image tokens: ``_get_t5_prompt_embeds``
  keeps the prompt's real tokens and the first padding token (1) and drops the rest (0), and
  ``_prepare_attention_mask`` appends ones for the image. Every block passes the outer product
  ``mask[:, None, None, :] * mask[:, None, :, None]`` to its attention. The pipelines make this mask
  float (the text encoder's dtype), so SDPA *adds* it to the logits (+1 where query and key are
  both kept; diffusers issues #12116, #13619): padding is down-weighted, not hidden. ``join``
  inserts the negatives' entries between the text and the image; the guided call carries the float
  mask as one more q/k channel (``rows[i] * cols[j]`` added to each logit, exactly the model's
  term, for the new length), or, for a boolean mask (``ChromaPipeline`` given a boolean
  ``prompt_attention_mask``), uses the core's masks (``pos_mask``, the negatives' masks);
* the pipelines' own CFG (``guidance_scale > 1``, default 5, with ``negative_prompt``, default
  ``""``) runs the unconditional branch as a second transformer call per step with other text and
  no ``cache_context``: only the first (conditional) call is guided.

``negative_prompt_embeds``: a tensor ``(1 or prompts or rows, n, joint_attention_dim)`` as
``encode_prompt`` returns its first output (attention-level methods use every given token, so pass
only real tokens), or a dict ``{"prompt_embeds": ..., "prompt_attention_mask": (rows, n)}`` with the
mask ``encode_prompt`` returns (0 hides a token). Prediction-level methods (CFG) run the negative
branch batched beside the positive one, so its ``n`` must equal the positive token count (the
call's ``max_sequence_length``); without a mask every token is kept.
"""

from __future__ import annotations

from typing import Any

import torch

from negguide import hookimpl
from negguide.adapter import Conditioning
from negguide.adapter import EncodeCall
from negguide.adapter import Joined
from negguide.adapter import embeds_and_mask
from negguide.adapters._flux_family import FluxFamilyAdapter
from negguide.adapters._flux_family import t5_length
from negguide.errors import NegativePromptError


@hookimpl
def register_adapters(register) -> None:  # noqa: ANN001
    register(ChromaAdapter)


class ChromaAdapter(FluxFamilyAdapter):
    """Adapter for ``ChromaTransformer2DModel`` (Chroma text-to-image, img2img, inpaint)."""

    family = "chroma"
    # CFG with an IP-Adapter: the negative branch keeps the positive rows' image embeddings (as adapters/flux.py)
    batched_inputs = ("hidden_states", "timestep", "joint_attention_kwargs.ip_adapter_image_embeds.*")
    conditioning_inputs = {"encoder_hidden_states": "embeds", "attention_mask": "mask"}
    # CFG: the negative's text mask gets ones for the image tokens, as the pipelines' _prepare_attention_mask does
    pad_mask_with_ones = True
    # defaults: ComfyUI-NAG's Chroma workflow (ChenDarYen/ComfyUI-NAG, workflows/NAG-Chroma-ComfyUI-Workflow.json,
    # read in its mirror xmarre/ComfyUI-NAG@527543f): NAGCFGGuider cfg 4, nag_scale 5, nag_tau 2.5, nag_alpha 0.25
    defaults = {"nag": {"scale": 5.0, "tau": 2.5, "alpha": 0.25}}

    @classmethod
    def matches(cls, denoiser: Any) -> bool:
        from diffusers import ChromaTransformer2DModel

        return isinstance(denoiser, ChromaTransformer2DModel)

    def encode_negative(self, text: str, call: EncodeCall, padded: bool) -> Conditioning:
        pipe = self.pipe
        if padded:  # as the pipeline encodes its own negative, at the positive's length (batched beside it)
            embeds, _, mask, *_ = call.encode(
                prompt=[text], device=call.device, num_images_per_prompt=1, do_classifier_free_guidance=False,
                max_sequence_length=self.positive(call.output).shape[1], lora_scale=call.arguments.get("lora_scale"),
            )  # fmt: skip
            return Conditioning(embeds, mask.bool())
        if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
            raise NegativePromptError(
                "chroma: expected the pipeline's T5 encoder (`text_encoder`) to encode the negative prompt, got None. "
                "Pass negative_prompt_embeds instead."
            )
        n_t5 = t5_length(pipe, pipe.tokenizer, text, int(call.arguments.get("max_sequence_length") or 512))
        # T5 attends to every token: encoding at exactly the real length means no padding at all
        embeds, _ = pipe._get_t5_prompt_embeds(prompt=[text], num_images_per_prompt=1, max_sequence_length=n_t5,
                                               device=call.device)  # fmt: skip
        return Conditioning(embeds)

    def negative_from_embeds(self, embeds: Any, call: EncodeCall, padded: bool) -> Conditioning:
        hint = "Pass what `pipe.encode_prompt` returns."
        return Conditioning(*embeds_and_mask("chroma", embeds, "joint_attention_dim", hint))

    def join(self, kwargs: dict[str, Any], negative: torch.Tensor, mask: torch.Tensor | None) -> Joined:
        joined = super().join(kwargs, negative, mask)
        full = kwargs.get("attention_mask")
        if full is None:
            return joined
        t, rows = joined.num_pos, negative.shape[0]
        full = full.expand(rows, -1) if full.shape[0] == 1 else full
        neg = torch.ones(negative.shape[:2], dtype=torch.bool, device=full.device) if mask is None else mask
        # [text, image] -> [text, negatives, image]: the negatives are kept like the prompt's real tokens
        joined.kwargs["attention_mask"] = torch.cat([full[:, :t], neg.to(full), full[:, t:]], dim=1)
        pos_mask = full[:, :t] if full.dtype == torch.bool else None  # a float mask rides in the logits instead
        return Joined(joined.kwargs, t, pos_mask)

    def logit_mask(self, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        if attention_mask is None or attention_mask.dtype == torch.bool:
            return None  # no mask, or a boolean one: the core's masks hide the same keys
        # the block's (rows, 1, L, L) outer product m_i * m_j; the last token is an image token, kept (m = 1)
        return attention_mask[:, 0, :, -1], attention_mask[:, 0, -1, :]
