"""LTX-2 (``LTX2Pipeline``, ``LTX2ImageToVideoPipeline``, ``LTX2ConditionPipeline`` and the siblings that share
``LTX2VideoTransformer3DModel``; an audio-video DiT, text through cross-attention in both streams).

Model facts owned here (diffusers 0.42.1: ``models/transformers/transformer_ltx2.py``, ``pipelines/ltx2/
{pipeline_ltx2,pipeline_ltx2_image2video,pipeline_ltx2_condition,connectors}.py``):

* the text is Gemma-3's hidden states of every layer, stacked (``encode_prompt``: left padding to
  ``max_sequence_length``, 1024 by default, with Gemma's mask), then turned by the pipeline's ``connectors``
  (``LTX2TextConnectors``: a per-sample masked normalisation, a projection, then one small transformer per
  stream whose learnable registers replace the padding) into the video text ``encoder_hidden_states`` and the
  audio text ``audio_encoder_hidden_states``, ``(rows, tokens, width)`` each, and the mask
  ``encoder_attention_mask`` (= ``audio_encoder_attention_mask``; all ones: registers and, without registers,
  the padding positions are attended). The connectors mix tokens, so a negative runs through them alone: it
  is the pipeline's own encoding of the negative (Gemma at ``max_sequence_length``, the connectors), cut to its
  real tokens (the first ``mask.sum()`` where registers moved them to the front, else the tokenizer's
  positions). ``encode_prompt``'s output is Gemma's, not the denoiser's text, so ``positive`` states the
  denoiser's text width with no token;
* every ``LTX2VideoTransformerBlock`` reads the video text only in ``attn2`` (queries: video tokens) and the
  audio text only in ``audio_attn2`` (queries: audio tokens); ``attn1``/``audio_attn1`` (self) and the
  audio-video cross-attentions ``audio_to_video_attn``/``video_to_audio_attn`` never see text. Inside the
  transformer the text is only projected per token (``caption_projection``, LTX-2.0) and, with
  ``cross_attn_mod`` (LTX-2.3), scaled and shifted per token by a timestep embedding: appended negative tokens
  cannot leak. Processors ``LTX2AudioVideoAttnProcessor`` (or ``LTX2PerturbedAttnProcessor`` with
  ``perturbed_attn``, which computes plain attention when no ``perturbation_mask`` is passed, as in ``attn2``),
  called positionally as ``(attn, hidden_states, encoder_hidden_states, attention_mask, query_rotary_emb,
  key_rotary_emb)``: q/k RMS norms across all heads before the split, no rotary embedding in the text
  cross-attention, SDPA's default scale, and with gated attention (LTX-2.3) per-head gates
  ``2 sigmoid(to_gate_logits(hidden_states))`` on the output;
* ``LTX2Adapter`` guides the VIDEO stream's ``attn2``: ``[P, N_1, ...]`` there; the audio text, mask and
  cross-attention are left as they are (the audio still follows the guided video through the audio-video
  cross-attentions). ``LTX2AudioVideoAdapter`` guides ``audio_attn2`` too, with the negatives' audio tokens at
  the same positions (see ``docs/adapters/ltx2.md`` for how to select it);
* the 2-D mask becomes ``(1 - mask) * -10000`` ``(rows, 1, tokens)`` inside the transformer; the join extends it
  over the negatives and the guided call uses the core's boolean masks;
* the pipelines' own CFG (``guidance_scale`` or ``audio_guidance_scale`` > 1) runs one batch ``[uncond, cond]``
  in ``cache_context("cond_uncond")``: only ``cond`` is guided. Their spatio-temporal guidance (STG) and modality
  isolation run further forwards with the positive text only (``"uncond_stg"``, ``"uncond_modality"``): those
  are guided like ``cond``, so their deltas measure their perturbation, not the negative. Per-token video
  timesteps, ``sigma``/``audio_sigma``, coordinates and IC-LoRA's self-attention mask are batched per row;
* the denoiser returns ``(video, audio)`` predictions: prediction-level methods (CFG) combine both, each with its
  own negative branch rows (the LTX-2 pipelines' own CFG works beside every attention-level method).

``negative_prompt_embeds``: the connectors' output (what the transformer receives): a tensor
``(1 or prompts or rows, n, video_width)`` of video text, or a dict ``{"prompt_embeds": video, "audio_prompt_embeds":
audio (rows, n, audio_width), "prompt_attention_mask": (rows, n)}`` (0 hides a token); every token is attended
(keep the real ones). ``LTX2AudioVideoAdapter`` needs the audio text too.
"""

from __future__ import annotations

from typing import Any
from typing import ClassVar

import torch

from negguide import hookimpl
from negguide.adapter import QKV
from negguide.adapter import Conditioning
from negguide.adapter import EncodeCall
from negguide.adapter import Joined
from negguide.adapter import Projected
from negguide.adapter import TextLayout
from negguide.adapter import heads
from negguide.adapter import merge_heads
from negguide.adapters.pixart import MaskedTextAdapter
from negguide.errors import NegativePromptError
from negguide.errors import NegGuideError
from negguide.errors import NoAdapterError

AUDIO_TEXT, AUDIO_MASK = "audio_encoder_hidden_states", "audio_encoder_attention_mask"


@hookimpl
def register_adapters(register) -> None:  # noqa: ANN001
    register(LTX2Adapter)


class LTX2Adapter(MaskedTextAdapter):
    """Adapter for ``LTX2VideoTransformer3DModel`` (LTX-2 / 2.3 text-, image- and condition-to-video with audio):
    the video stream's text cross-attention."""

    family = "ltx2"
    num_per_prompt_arg = "num_videos_per_prompt"
    batched_inputs = (
        "hidden_states", "audio_hidden_states", "timestep", "audio_timestep", "sigma", "audio_sigma",
        "video_coords", "audio_coords", "video_self_attention_mask", "video_keyframes_mask", "perturbation_mask",
    )  # fmt: skip
    conditioning_inputs = {"encoder_hidden_states": "video", "encoder_attention_mask": "mask",
                           AUDIO_TEXT: "audio", AUDIO_MASK: "mask"}  # fmt: skip
    #: the streams whose text cross-attention the negatives enter: ``attn2`` (video), ``audio_attn2`` (audio)
    streams: ClassVar[tuple[str, ...]] = ("video",)
    # no published per-family values for VSF, NAG or NASA on LTX-2: the methods' own defaults (untuned)

    @classmethod
    def matches(cls, denoiser: Any) -> bool:
        from diffusers import LTX2VideoTransformer3DModel

        return isinstance(denoiser, LTX2VideoTransformer3DModel)

    # ------------------------------------------------------------------ the text the transformer sees

    def _widths(self) -> tuple[int, int]:
        connectors = self.pipe.connectors
        return connectors.video_connector.inner_dim, connectors.audio_connector.inner_dim

    def _text(self, video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """The negative as the core carries it: the video text, beside it the audio text when that is guided."""
        return torch.cat([video, audio], dim=-1) if "audio" in self.streams else video

    def positive(self, output: Any) -> torch.Tensor:
        # encode_prompt returns Gemma's stacked hidden states; the connectors make the transformer's text later in
        # the pipeline: the rows, device and dtype are the prompt's, the width the transformer's text (no token)
        gemma = super().positive(output)
        video, audio = self._widths()
        return gemma.new_zeros(gemma.shape[0], 0, video + audio if "audio" in self.streams else video)

    def encode_negative(self, text: str, call: EncodeCall, padded: bool) -> Conditioning:
        pipe = self.pipe
        msl = int(call.arguments.get("max_sequence_length") or super().positive(call.output).shape[1])
        gemma, mask, _, _ = call.encode(
            prompt=[text], do_classifier_free_guidance=False, num_videos_per_prompt=1, max_sequence_length=msl,
            device=call.device, dtype=call.dtype,
        )  # fmt: skip
        side = getattr(pipe.tokenizer, "padding_side", "left")  # as the pipelines read it after encoding
        video, audio, text_mask = pipe.connectors(gemma, mask, padding_side=side)
        if padded:  # exactly the pipelines' own negative: every token, the connectors' mask
            return Conditioning(self._text(video, audio), text_mask.bool(), {"video": video, "audio": audio})
        n = int(mask.sum())
        video = video[:, _real_tokens(pipe.connectors.video_connector, mask, n)]
        audio = audio[:, _real_tokens(pipe.connectors.audio_connector, mask, n)]
        return Conditioning(self._text(video, audio))

    def negative_from_embeds(self, embeds: Any, call: EncodeCall, padded: bool) -> Conditioning:
        video_width, audio_width = self._widths()
        audio = mask = None
        if isinstance(embeds, dict):
            embeds, audio, mask = embeds.get("prompt_embeds"), embeds.get("audio_prompt_embeds"), \
                embeds.get("prompt_attention_mask")  # fmt: skip
        if not _is_text(embeds, video_width) or (audio is not None and not _is_text(audio, audio_width, embeds)):
            got = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in (embeds, audio)]
            raise NegativePromptError(
                f"ltx2: expected `negative_prompt_embeds` as the connectors' video text, a (rows, tokens, "
                f"{video_width}) tensor, or a dict with `prompt_embeds`, `audio_prompt_embeds` (rows, tokens, "
                f"{audio_width}) and `prompt_attention_mask`; got {got[0]} (audio: {got[1]}). Run "
                "`pipe.connectors(*pipe.encode_prompt(...)[:2])` and keep the real tokens."
            )
        if audio is None and "audio" in self.streams:
            raise NegativePromptError(
                "ltx2: the audio stream is guided too, so it expected the negative's audio text beside its video "
                "text: pass negative_prompt_embeds={'prompt_embeds': ..., 'audio_prompt_embeds': ...}."
            )
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(embeds.shape[:2]):
                got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise NegativePromptError(
                    f"ltx2: expected `prompt_attention_mask` of shape {tuple(embeds.shape[:2])} (rows, tokens) beside "
                    f"the negative's text, got {got}."
                )
            mask = mask.bool()
        if not padded:
            return Conditioning(embeds if audio is None else self._text(embeds, audio), mask)
        if audio is None:
            raise NegativePromptError(
                "ltx2: CFG runs the negative through both streams, so it expected its audio text too: pass "
                "negative_prompt_embeds={'prompt_embeds': ..., 'audio_prompt_embeds': ...}."
            )
        length, n = super().positive(call.output).shape[1], embeds.shape[1]
        if n > length:
            raise NegativePromptError(
                f"ltx2: CFG runs the negative beside the prompt, so it expected at most {length} negative tokens (the "
                f"prompt's), got {n}. Encode the negative with the same `max_sequence_length`."
            )
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        # zero tokens, masked out: what padding is to the model
        video, audio = (torch.nn.functional.pad(t, (0, 0, 0, length - n)) for t in (embeds, audio))
        mask = torch.nn.functional.pad(mask, (0, length - n), value=False)
        return Conditioning(self._text(video, audio), mask, {"video": video, "audio": audio})

    # ------------------------------------------------------------------ joining

    def join(self, kwargs: dict[str, Any], negative: torch.Tensor, mask: torch.Tensor | None) -> Joined:
        if "audio" not in self.streams:
            return super().join(kwargs, negative, mask)
        video_width = self._widths()[0]
        joined = super().join(kwargs, negative[..., :video_width], mask)
        audio_text, audio_mask = kwargs[AUDIO_TEXT], kwargs.get(AUDIO_MASK)
        video_mask = kwargs.get(self.text_mask_input)
        if (audio_mask is None) != (video_mask is None) or (
            audio_mask is not None and not torch.equal(audio_mask.bool(), video_mask.bool())  # type: ignore[union-attr]
        ):
            raise NegGuideError(
                "ltx2: guiding both streams expected one text mask for both (the pipelines pass the connectors' "
                f"mask as `{self.text_mask_input}` and `{AUDIO_MASK}`), got two different ones. Guide the video "
                "stream only (LTX2Adapter)."
            )
        out = joined.kwargs
        neg_audio = negative[..., video_width:].to(device=audio_text.device, dtype=audio_text.dtype)
        out[AUDIO_TEXT] = torch.cat([audio_text, neg_audio], dim=1)
        if audio_mask is not None:
            out[AUDIO_MASK] = out[self.text_mask_input]
        return joined

    # ------------------------------------------------------------------ attention

    def attention_modules(self, denoiser: torch.nn.Module) -> dict[str, int]:
        from diffusers.models.transformers.transformer_ltx2 import LTX2AudioVideoAttnProcessor
        from diffusers.models.transformers.transformer_ltx2 import LTX2PerturbedAttnProcessor

        names = ("attn2", "audio_attn2") if "audio" in self.streams else ("attn2",)
        modules = {}
        for i, block in enumerate(denoiser.transformer_blocks):
            for name in names:
                proc = getattr(block, name).processor
                if not isinstance(proc, (LTX2AudioVideoAttnProcessor, LTX2PerturbedAttnProcessor)):
                    raise NoAdapterError(
                        f"ltx2: expected LTX2AudioVideoAttnProcessor in block {i}'s text cross-attention `{name}`, got "
                        f"{type(proc).__name__}, which attention-level methods cannot guide. Restore it with "
                        f"`block.{name}.set_processor(LTX2AudioVideoAttnProcessor())`."
                    )
                modules[f"transformer_blocks.{i}.{name}.processor"] = i
        return modules

    def num_layers(self, denoiser: torch.nn.Module) -> int:
        return len(denoiser.transformer_blocks)

    def project(
        self,
        attn: Any,
        text: TextLayout,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        query_rotary_emb: Any = None,
        key_rotary_emb: Any = None,
        perturbation_mask: torch.Tensor | None = None,
        all_perturbed: bool | None = None,
    ) -> Projected | None:
        if encoder_hidden_states is None:
            return None  # a self-attention call: not ours
        if query_rotary_emb is not None or key_rotary_emb is not None or perturbation_mask is not None:
            raise NegGuideError(
                "ltx2: expected the text cross-attention without rotary embeddings or an STG perturbation (LTX-2 "
                "blocks pass neither there), got some. Remove the guidance (negguide.remove(pipe)) for this model."
            )
        self.check_bias(attention_mask, text)
        gates = None if attn.to_gate_logits is None else attn.to_gate_logits(hidden_states)  # from the queries' input
        query = attn.norm_q(attn.to_q(hidden_states))  # across all heads, before the split
        key = attn.norm_k(attn.to_k(encoder_hidden_states))
        q, k, v = heads(query, attn.heads), heads(key, attn.heads), heads(attn.to_v(encoder_hidden_states), attn.heads)
        return Projected(QKV(q, None, None), QKV(None, k, v), carry=gates)  # SDPA's default scale

    def finish(self, attn: Any, projected: Projected, image: torch.Tensor, text: torch.Tensor | None) -> Any:
        out = merge_heads(image, projected.image.q.dtype)  # type: ignore[union-attr]
        if projected.carry is not None:  # gated attention: 2 sigmoid(logits) per head
            out = (out.unflatten(2, (attn.heads, -1)) * (2.0 * torch.sigmoid(projected.carry))[..., None]).flatten(2)
        return attn.to_out[1](attn.to_out[0](out))


class LTX2AudioVideoAdapter(LTX2Adapter):
    """``LTX2Adapter`` that also guides the audio stream's text cross-attention (``audio_attn2``) with the negatives'
    audio tokens: not registered; a plugin registers it in place of ``LTX2Adapter`` (docs/adapters/ltx2.md)."""

    streams = ("video", "audio")


def _real_tokens(connector: Any, mask: torch.Tensor, n: int) -> torch.Tensor:
    """Where a one-row text's ``n`` real tokens sit in a connector's output: first when its learnable registers
    replaced the padding (the real tokens are moved to the front, in order), else where the tokenizer put them."""
    if connector.learnable_registers is not None:
        return torch.arange(mask.shape[1], device=mask.device) < n
    return mask[0].bool()


def _is_text(x: Any, width: int, like: torch.Tensor | None = None) -> bool:
    if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[-1] != width:
        return False
    return like is None or tuple(x.shape[:2]) == tuple(like.shape[:2])
