"""PixArt-α and PixArt-Σ (``PixArtAlphaPipeline``, ``PixArtSigmaPipeline``; DiT, text through cross-attention).

Model facts owned here (diffusers 0.42.1: ``models/transformers/pixart_transformer_2d.py``,
``models/attention.py`` ``BasicTransformerBlock``, ``pipelines/pixart_alpha/pipeline_pixart_{alpha,sigma}.py``):

* the denoiser ``PixArtTransformer2DModel`` is called with the latents positionally (``hidden_states``);
  the text enters every block through the cross-attention ``transformer_blocks[i].attn2`` only
  (``attn1`` gets ``encoder_hidden_states=None``); its processor is diffusers' plain
  ``AttnProcessor2_0`` (``FusedAttnProcessor2_0`` after ``fuse_qkv_projections``), softmax scale
  ``attn.scale``;
* ``encoder_hidden_states`` is the raw T5 output ``(rows, tokens, 4096)``, 3-D (never 4-D), zero
  information outside attention: ``caption_projection`` (``PixArtAlphaTextProjection``, Linear-GELU-Linear)
  is per token and nothing else reads the text (``adaln_single`` sees the timestep and PixArt-α's
  ``resolution``/``aspect_ratio`` only), so appended negative tokens cannot leak;
* ``encoder_attention_mask`` ``(rows, tokens)`` marks the prompt's padding (T5, padded to
  ``max_sequence_length``: α 120, Σ 300); the transformer turns a 2-D mask into an additive bias
  ``(1 - mask) * -10000`` of shape ``(rows, 1, tokens)`` for ``attn2``. The join extends the mask over
  the negatives, so the bias the model builds has the new length; the guided call checks that and
  uses the core's boolean masks (the same information, padding excluded exactly);
* T5 is bidirectional but masked: the real tokens of a padded encoding equal an encoding of the
  real tokens alone, so a negative is the pipeline's own ``encode_prompt`` (its caption cleaning) cut
  to ``mask.sum()`` tokens: ``attn2`` sees ``[P (padded), N_1, ...]``;
* the pipelines' own CFG (``guidance_scale > 1``) runs one batch ``[uncond, cond]``: only ``cond`` is
  guided. PixArt-α checkpoints with ``sample_size == 128`` also pass ``added_cond_kwargs`` =
  ``{"resolution", "aspect_ratio"}`` batched likewise (Σ passes ``None``); CFG's negative branch gets
  its rows' entries;
* PixArt-α with ``num_inference_steps=1`` takes the scheduler's predicted sample (one-step students
  such as DMD/SNOOPI's, run with ``guidance_scale=1``): guidance acts on that single forward;
* the PAG sibling ``PixArtSigmaPAGPipeline`` batches ``[uncond, cond, perturbed]`` (or ``[cond,
  perturbed]``), rows negguide's core cannot tell apart: it is refused.

``negative_prompt_embeds``: a tensor ``(1 or prompts or rows, n, 4096)`` of T5 embeddings as
``encode_prompt`` returns them, every token attended (keep the real ones: ``embeds[:, :mask.sum()]``),
or a dict ``{"prompt_embeds": ..., "prompt_attention_mask": (rows, n)}`` (0 hides a token). CFG runs the
negative beside the prompt: a shorter one is zero-padded to the prompt's length and masked, as the
pipelines pad their own negative.
"""

from __future__ import annotations

from typing import Any

import torch

from negguide import hookimpl
from negguide.adapter import Conditioning
from negguide.adapter import CrossAttentionAdapter
from negguide.adapter import EncodeCall
from negguide.adapter import Joined
from negguide.adapter import Projected
from negguide.adapter import TextLayout
from negguide.adapter import embeds_and_mask
from negguide.adapters._attn_processor import finish_cross
from negguide.adapters._attn_processor import project_cross
from negguide.errors import NegativePromptError
from negguide.errors import NegGuideError
from negguide.errors import NoAdapterError

#: processors that compute plain softmax attention (the guided call replaces them exactly)
PLAIN = ("AttnProcessor", "AttnProcessor2_0", "FusedAttnProcessor2_0")


@hookimpl
def register_adapters(register) -> None:  # noqa: ANN001
    register(PixArtAdapter)


class MaskedTextAdapter(CrossAttentionAdapter):
    """Facts PixArt and Sana share: a padded text with a 2-D ``encoder_attention_mask`` that the transformer
    turns into a ``-10000`` bias for ``attn2``, the pipelines' batched ``[uncond, cond]`` CFG, PAG refused."""

    text_mask_input = "encoder_attention_mask"
    pipeline_cfg = "batched"
    conditioning_inputs = {"encoder_hidden_states": "embeds", "encoder_attention_mask": "mask"}

    def find_denoisers(self) -> list[torch.nn.Module]:
        from diffusers.pipelines.pag.pag_utils import PAGMixin

        if isinstance(self.pipe, PAGMixin):
            name = type(self.pipe).__name__
            raise NoAdapterError(
                f"{self.family}: {name} batches its own rows as [uncond, cond, perturbed] (or [cond, perturbed]), "
                "which negguide cannot tell apart (expected [uncond, cond]). Build the plain pipeline from the same "
                f"components, {name.replace('PAG', '')}(**pipe.components), to guide it."
            )
        return super().find_denoisers()

    def negative_from_embeds(self, embeds: Any, call: EncodeCall, padded: bool) -> Conditioning:
        width = self.find_denoisers()[0].config.caption_channels
        hint = "Encode it with the pipeline's `encode_prompt` and keep the real tokens: `embeds[:, :mask.sum()]`."
        embeds, mask = embeds_and_mask(self.family, embeds, width, hint)
        if not padded:
            return Conditioning(embeds, mask)
        length, n = self.positive(call.output).shape[1], embeds.shape[1]
        if n > length:
            raise NegativePromptError(
                f"{self.family}: CFG runs the negative beside the prompt, so it expected at most {length} negative "
                f"tokens (the prompt's), got {n}. Encode the negative with the same `max_sequence_length`."
            )
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        # zero tokens, masked out: what padding is to the model
        embeds = torch.nn.functional.pad(embeds, (0, 0, 0, length - n))
        return Conditioning(embeds, torch.nn.functional.pad(mask, (0, length - n), value=False))

    def join(self, kwargs: dict[str, Any], negative: torch.Tensor, mask: torch.Tensor | None) -> Joined:
        given = kwargs.get(self.text_mask_input)
        if given is not None and (not isinstance(given, torch.Tensor) or given.ndim != 2):
            got = tuple(given.shape) if isinstance(given, torch.Tensor) else type(given).__name__
            raise NegGuideError(
                f"{self.family}: expected `{self.text_mask_input}` as a (rows, tokens) mask, as the pipelines pass "
                f"it, got {got} (a bias the transformer cannot extend over the negative tokens). Pass the 2-D mask."
            )
        return super().join(kwargs, negative, mask)

    def check_bias(self, attention_mask: torch.Tensor | None, text: TextLayout) -> None:
        """The bias the transformer made from the joined mask must span the whole text stream ``[P, N...]``: the
        guided call then uses the core's masks (the same information) in its place."""
        if attention_mask is not None and attention_mask.shape[-1] != text.num_text:
            raise NegGuideError(
                f"{self.family}: expected the cross-attention bias over the {text.num_text} text tokens (the "
                f"transformer makes it from `{self.text_mask_input}`), got shape {tuple(attention_mask.shape)}. Pass "
                "a 2-D mask, or remove the guidance (negguide.remove(pipe)) to use a custom one."
            )


class PixArtAdapter(MaskedTextAdapter):
    """Adapter for ``PixArtTransformer2DModel`` (``PixArtAlphaPipeline``, ``PixArtSigmaPipeline``)."""

    family = "pixart"
    batched_inputs = ("hidden_states", "timestep", "added_cond_kwargs.resolution", "added_cond_kwargs.aspect_ratio")
    # no published per-family values for VSF, NAG or NASA on PixArt: the methods' own defaults (untuned)

    @classmethod
    def matches(cls, denoiser: Any) -> bool:
        from diffusers import PixArtTransformer2DModel

        return isinstance(denoiser, PixArtTransformer2DModel)

    def encode_negative(self, text: str, call: EncodeCall, padded: bool) -> Conditioning:
        args = call.arguments
        common = {"num_images_per_prompt": 1, "device": call.device, "clean_caption": args.get("clean_caption", False)}
        if padded:  # exactly the pipeline's own negative: at the prompt's length, masked
            pos, pos_mask = call.output[0][:1], call.output[1][:1]
            out = call.encode(prompt=None, do_classifier_free_guidance=True, negative_prompt=[text], prompt_embeds=pos,
                              prompt_attention_mask=pos_mask, **common)  # fmt: skip
            return Conditioning(out[2], out[3].bool())
        msl = int(args.get("max_sequence_length") or self.positive(call.output).shape[1])
        embeds, mask, _, _ = call.encode(prompt=[text], do_classifier_free_guidance=False, max_sequence_length=msl,
                                         **common)  # fmt: skip
        return Conditioning(embeds[:, : int(mask.sum())])  # T5 masks its padding: the real tokens are exact

    def attention_modules(self, denoiser: torch.nn.Module) -> dict[str, int]:
        modules = {}
        for i, block in enumerate(denoiser.transformer_blocks):
            proc = type(block.attn2.processor).__name__
            if proc not in PLAIN:
                raise NoAdapterError(
                    f"pixart: expected a plain attention processor ({', '.join(PLAIN)}) in block {i}'s "
                    f"cross-attention, got {proc}, which attention-level methods cannot guide. Restore it with "
                    "`pipe.transformer.set_attn_processor(AttnProcessor2_0())`, or use 'cfg'."
                )
            modules[f"transformer_blocks.{i}.attn2.processor"] = i
        return modules

    # AttnProcessor2_0 is called as (attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
    def project(
        self,
        attn: Any,
        text: TextLayout,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Projected | None:
        if encoder_hidden_states is None:
            return None  # a self-attention call: not ours
        self.check_bias(attention_mask, text)
        if hidden_states.ndim != 3:
            raise NegGuideError(
                f"pixart: expected (batch, tokens, channels) hidden states in the guided cross-attention, got "
                f"{hidden_states.ndim}-D. Remove the guidance (negguide.remove(pipe)) for this model."
            )
        return project_cross(attn, hidden_states, encoder_hidden_states, temb)

    def finish(self, attn: Any, projected: Projected, image: torch.Tensor, text: torch.Tensor | None) -> Any:
        return finish_cross(attn, projected, image)
