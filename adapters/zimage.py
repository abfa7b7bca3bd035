"""Z-Image and Z-Image Turbo (single-stream DiT with a context refiner, image first).

Model facts owned here (diffusers 0.42.1, ``models/transformers/transformer_z_image.py`` and
``pipelines/z_image/pipeline_z_image*.py``):

* the pipelines call ``ZImageTransformer2DModel(x, t, cap_feats, ...)`` positionally with one
  tensor per sample: ``x`` the latents ``(C, 1, H, W)``, ``cap_feats`` the prompt's Qwen3 hidden
  states ``(tokens, cap_feat_dim)`` (``hidden_states[-2]`` of the chat-templated prompt with its
  padding already removed by ``_encode_prompt``; each prompt has its own length);
* inside ``forward`` every caption is padded to a multiple of 32 with the learnt ``cap_pad_token``
  (those pad tokens are attended: only batch padding is masked), embedded (``cap_embedder``) and
  refined alone by ``context_refiner`` (text-only self-attention); the latents are refined alone by
  ``noise_refiner``. ``_build_unified_sequence`` then builds ``[x_i, cap_i]`` per sample (image
  first), zero-pads the batch to one length and masks the padding; the main ``layers`` attend over
  that sequence with ``ZSingleStreamAttnProcessor`` (``__call__(attn, hidden_states,
  encoder_hidden_states=None, attention_mask=None, freqs_cis=None)``: q/k/v, per-head RMS norms,
  complex RoPE ``freqs_cis`` in float32, SDPA, ``to_out``);
* positions (3-axis RoPE): caption token ``j`` sits at ``(1 + j, 0, 0)``; the image starts after
  the padded caption, ``(C_i + 1 + f, h, w)``; image pad tokens sit at ``(0, 0, 0)``.

Attention-level methods: the negatives must not enter the caption (the refiner would mix them into
the positive text, and their length would move the caption padding and the image positions). So
``_build_unified_sequence`` is patched: it builds the positive sequence exactly as before and
appends the negative block after it, ``[x, P (batch-padded), N_1, ...]``. Each negative is a
caption of its own: ``cap_embedder``, then ``context_refiner`` on its own tokens only (the
negatives kept apart by a block mask, no caption padding), at caption positions ``(1 + j, 0, 0)``.
The guided main layers then see ``P`` = the padded caption region (its batch padding is the
positive mask) and the negatives after it; ControlNet residuals get zero rows for the negatives.
The refiners and the positive path run exactly as unpatched.

The pipelines' own CFG (``guidance_scale > 0``; Turbo runs with 0) batches ``[cond, uncond]``
(conditional rows first) in one forward, and ``cfg_truncation`` drops the unconditional half in
late steps; the unconditional rows are those whose ``cap_feats`` are the very tensors of the
call's ``negative_prompt_embeds``. ``encode_prompt`` encodes one row per prompt; the pipeline
repeats rows per image afterwards.

``negative_prompt_embeds``: a list of ``(tokens, cap_feat_dim)`` tensors (one per prompt, or one
shared), as ``encode_prompt`` returns them, or a ``(rows, tokens, cap_feat_dim)`` tensor of real
tokens only. ``ZImageOmniPipeline`` (several images and captions per sample) is refused.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
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
from negguide.errors import NegativePromptError
from negguide.errors import NoAdapterError

#: the model pads every caption (and the image tokens) to a multiple of this (``SEQ_MULTI_OF``)
SEQ_MULTI_OF = 32


@hookimpl
def register_adapters(register) -> None:  # noqa: ANN001
    register(ZImageAdapter)


class ZImageAdapter(JointAttentionAdapter):
    """Adapter for ``ZImageTransformer2DModel`` (Z-Image, Z-Image Turbo; img2img, inpaint, ControlNet)."""

    family = "zimage"
    sample_input = "x"
    text_input = "cap_feats"
    pipeline_cfg = "batched"
    batched_inputs = ("x", "t")
    conditioning_inputs = {"cap_feats": "embeds"}
    patched_methods = ("_build_unified_sequence",)

    @classmethod
    def matches(cls, denoiser: Any) -> bool:
        from diffusers import ZImageTransformer2DModel

        return isinstance(denoiser, ZImageTransformer2DModel)

    def find_denoisers(self) -> list[torch.nn.Module]:
        from diffusers import ZImageOmniPipeline

        if isinstance(self.pipe, ZImageOmniPipeline):
            raise NoAdapterError(
                "zimage: expected a Z-Image pipeline with one image and one caption per sample, got "
                "ZImageOmniPipeline (several captions and images per sample are not supported). Use ZImagePipeline, "
                "ZImageImg2ImgPipeline or ZImageInpaintPipeline."
            )
        return super().find_denoisers()

    # ------------------------------------------------------------------ encoding

    def positive(self, output: Any) -> torch.Tensor:
        # encode_prompt returns (prompt_embeds, negative_prompt_embeds), lists of per-prompt (tokens, dim) tensors
        return _rows(output[0])

    def encode_negative(self, text: str, call: EncodeCall, padded: bool) -> Conditioning:
        if getattr(self.pipe, "text_encoder", None) is None or getattr(self.pipe, "tokenizer", None) is None:
            raise NegativePromptError(
                "zimage: expected the pipeline's text encoder and tokenizer to encode the negative prompt, got None. "
                "Pass negative_prompt_embeds instead."
            )
        # _encode_prompt keeps only the real tokens of the chat-templated prompt: the same for both levels
        msl = int(call.arguments.get("max_sequence_length") or 512)
        embeds = call.encode(prompt=[text], device=call.device, do_classifier_free_guidance=False,
                             max_sequence_length=msl)[0]  # fmt: skip
        return Conditioning(embeds[0][None])

    def negative_from_embeds(self, embeds: Any, call: EncodeCall, padded: bool) -> Conditioning:
        if isinstance(embeds, torch.Tensor) and embeds.ndim == 2:
            embeds = [embeds]
        if isinstance(embeds, (list, tuple)) and embeds and all(isinstance(e, torch.Tensor) and e.ndim == 2
                                                                 for e in embeds):  # fmt: skip
            if len({e.shape[0] for e in embeds}) == 1:
                return Conditioning(torch.stack(list(embeds)))
            return Conditioning(_rows(embeds), _lengths_mask([e.shape[0] for e in embeds]))
        if isinstance(embeds, torch.Tensor) and embeds.ndim == 3:
            return Conditioning(embeds)
        got = f"a tensor of shape {tuple(embeds.shape)}" if isinstance(embeds, torch.Tensor) else type(embeds).__name__
        raise NegativePromptError(
            "zimage: expected `negative_prompt_embeds` as a list of (tokens, cap_feat_dim) tensors (one per prompt, "
            f"as encode_prompt returns them) or a (rows, tokens, cap_feat_dim) tensor of real tokens, got {got}."
        )

    # ------------------------------------------------------------------ the pipeline's own CFG

    def uncond_rows(self, kwargs: dict[str, Any], call: EncodeCall | None, batch: int) -> slice | None:
        # [cond, uncond]: the second half holds the call's negative_prompt_embeds (repeated per image), by identity
        output = None if call is None else call.output
        negatives = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
        texts = kwargs.get(self.text_input)
        if not negatives or not isinstance(texts, (list, tuple)) or batch % 2 or (batch // 2) % len(negatives):
            return None
        half = batch // 2
        per = half // len(negatives)
        if all(t is negatives[i // per] for i, t in enumerate(texts[half:])):
            return slice(half, None)
        return None

    # ------------------------------------------------------------------ joining the negatives

    def join(self, kwargs: dict[str, Any], negative: torch.Tensor, mask: torch.Tensor | None) -> Joined:
        # the negatives stay out of cap_feats: the patched _build_unified_sequence appends them after the caption
        caps = kwargs[self.text_input]
        lengths = [len(c) + (-len(c)) % SEQ_MULTI_OF for c in caps]  # each caption padded by the model
        num_pos = max(lengths)
        pos_mask = None
        if len(set(lengths)) > 1:  # the batch padding after shorter captions
            pos_mask = _lengths_mask(lengths).to(negative.device)
        out = dict(kwargs)
        control = kwargs.get("controlnet_block_samples")
        if control is not None:  # residuals of [x, caption]: none for the negative tokens
            n = negative.shape[1]
            out["controlnet_block_samples"] = {i: torch.nn.functional.pad(r, (0, 0, 0, n)) for i, r in control.items()}
        return Joined(out, num_pos, pos_mask, carry=negative)

    def patched(self, name: str, original: Callable[..., Any], forward: Any, *args: Any, **kwargs: Any) -> Any:
        unified, freqs, mask, noise = original(*args, **kwargs)
        bound = inspect.signature(original).bind(*args, **kwargs)
        if bound.arguments.get("omni_mode"):
            raise NoAdapterError("zimage: expected one image and one caption per sample, got Z-Image's omni mode.")
        model = original.__self__  # type: ignore[attr-defined]
        negative, text = forward.carry, forward.text
        spans = [(a - text.num_pos, b - text.num_pos) for a, b in forward.spans]
        batch, n = negative.shape[:2]
        device = unified.device
        # each negative a caption of its own: caption positions (1 + j, 0, 0), refined on its own tokens
        pos = torch.cat([torch.arange(1, 1 + b - a, dtype=torch.int32, device=device) for a, b in spans])
        ids = torch.stack([pos, torch.zeros_like(pos), torch.zeros_like(pos)], dim=-1)
        neg_freqs = model.rope_embedder(ids)[None].expand(batch, -1, -1)
        keys = None
        if any(m is not None for m in forward.masks):
            keys = torch.cat([torch.ones(batch, b - a, dtype=torch.bool, device=device) if m is None else m.to(device)
                              for (a, b), m in zip(spans, forward.masks)], dim=1)  # fmt: skip
        refine_mask = None
        if len(spans) > 1 or keys is not None:
            block = torch.cat([torch.full((b - a,), i, device=device) for i, (a, b) in enumerate(spans)])
            allowed = (block[:, None] == block[None, :])[None]
            if keys is not None:  # padding is no key; every token still sees itself (no empty softmax)
                allowed = allowed & keys[:, None, :] | torch.eye(n, dtype=torch.bool, device=device)
            refine_mask = allowed[:, None]
        hidden = model.cap_embedder(negative)
        for layer in model.context_refiner:
            hidden = layer(hidden, refine_mask, neg_freqs)
        if mask is not None or keys is not None:  # the model's batch-padding mask, then the negatives' padding
            seen = torch.ones(batch, unified.shape[1], dtype=torch.bool, device=device) if mask is None else mask
            mask = torch.cat([seen, torch.ones(batch, n, dtype=torch.bool, device=device) if keys is None else keys], 1)
        unified = torch.cat([unified, hidden.to(unified.dtype)], dim=1)
        return unified, torch.cat([freqs, neg_freqs.to(freqs.dtype)], dim=1), mask, noise

    # ------------------------------------------------------------------ attention level

    def attention_modules(self, denoiser: torch.nn.Module) -> dict[str, int]:
        from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

        # only the main layers see image and text together; noise_refiner / context_refiner see one of them
        modules = {}
        for i, layer in enumerate(denoiser.layers):
            if not isinstance(layer.attention.processor, ZSingleStreamAttnProcessor):
                raise NoAdapterError(
                    f"zimage: expected ZSingleStreamAttnProcessor in layer {i}, got "
                    f"{type(layer.attention.processor).__name__}. Restore it with "
                    "`layer.attention.set_processor(ZSingleStreamAttnProcessor())` or use 'cfg'."
                )
            modules[f"layers.{i}.attention.processor"] = i
        return modules

    # ZImageTransformerBlock calls attention(hidden_states, attention_mask=..., freqs_cis=...)
    def project(
        self,
        attn: Any,
        text: TextLayout,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        freqs_cis: torch.Tensor | None = None,
    ) -> Projected:
        # attention_mask only masks batch padding of the caption region: the core's pos_mask and negative masks
        # say the same for the guided call
        q = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        k = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if freqs_cis is not None:
            q, k = _rotary(q, freqs_cis), _rotary(k, freqs_cis)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, D)
        i = q.shape[2] - text.num_text  # image first: [x, P, N_1, ...]
        return Projected(QKV(q[:, :, :i], k[:, :, :i], v[:, :, :i]), QKV(q[:, :, i:], k[:, :, i:], v[:, :, i:]))

    def finish(self, attn: Any, projected: Projected, image: torch.Tensor, text: torch.Tensor | None) -> Any:
        out = attn.to_out[0](merge_heads(torch.cat([image, text], dim=2), projected.image.q.dtype))  # type: ignore[list-item, union-attr]
        return attn.to_out[1](out) if len(attn.to_out) > 1 else out


def _rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``ZSingleStreamAttnProcessor``'s rotary embedding: complex pairs times ``freqs`` ``(B, L, D/2)``, in float32."""
    with torch.amp.autocast("cuda", enabled=False):
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * freqs.unsqueeze(2)).flatten(3).type_as(x)


def _rows(tensors: Any) -> torch.Tensor:
    """Per-sample ``(tokens, dim)`` tensors as one zero-padded ``(rows, tokens, dim)`` tensor."""
    return torch.nn.utils.rnn.pad_sequence(list(tensors), batch_first=True)


def _lengths_mask(lengths: list[int]) -> torch.Tensor:
    """``(rows, max(lengths))`` boolean, ``True`` on each row's first ``lengths[i]`` tokens."""
    return torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
