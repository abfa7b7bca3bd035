"""Facts shared by HunyuanVideo (``adapters/hunyuanvideo.py``) and HunyuanVideo 1.5 (``adapters/hunyuanvideo15.py``).

Both denoisers (diffusers ``transformer_hunyuan_video.py``, ``transformer_hunyuan_video15.py``) share these
facts, stated once here:

* the text enters ``forward`` as ``encoder_hidden_states`` with ``encoder_attention_mask`` and is first run
  through ``context_embedder``, a token refiner (``HunyuanVideoTokenRefiner`` /
  ``HunyuanVideo15TokenRefiner``): the mask-weighted mean of the tokens conditions it (with the
  timestep) and its self-attention mixes the text tokens. Negatives appended to the text input would
  leak into the prompt there, so they stay out of it: ``join`` hands them to the patched ``forward``
  (``Joined.carry``), which refines the prompt exactly as the model does and each negative alone, as a
  prompt of its own, and appends them after the prompt's stream: ``[P, N_1, ...]``;
* attention is joint over ``[image, text]``, image first: the processors
  (``HunyuanVideoAttnProcessor2_0``, ``HunyuanVideo15AttnProcessor2_0``) are called with the keywords
  ``hidden_states``, ``encoder_hidden_states``, ``attention_mask``, ``image_rotary_emb``. A dual-stream
  call (``attn.add_q_proj`` set) projects the image with ``to_q/k/v`` and the text with
  ``add_q/k/v_proj``, RMS-norms q and k per head (``norm_q/k``, ``norm_added_q/k``) and returns
  ``(to_out(image), to_add_out(text))``; a single-stream call (HunyuanVideo only: ``add_q_proj`` is
  ``None``) projects both with ``to_q/k/v`` and returns both outputs unprojected. The rotary embedding
  (``image_rotary_emb``, a ``(cos, sin)`` pair) rotates the image tokens only: text tokens carry no
  position, so a negative token is encoded exactly like a prompt token wherever it sits;
* the attention mask the model builds masks the text padding (its keys; 1.5 also its queries): the guided
  call uses the core's masks for the same keys instead (``Joined.pos_mask`` and each negative's mask).

This module is private (its name starts with ``_``): it registers no adapter.
"""

from __future__ import annotations

import inspect
from abc import abstractmethod
from collections.abc import Callable
from typing import Any
from typing import ClassVar

import torch

from negguide.adapter import QKV
from negguide.adapter import Joined
from negguide.adapter import JointAttentionAdapter
from negguide.adapter import Projected
from negguide.adapter import TextLayout
from negguide.adapter import merge_heads
from negguide.errors import NoAdapterError


class HunyuanVideoFamilyAdapter(JointAttentionAdapter):
    """The shared facts above; a family states its encoders, its prompt stream and its guided ``forward``."""

    num_per_prompt_arg = "num_videos_per_prompt"
    text_mask_input = "encoder_attention_mask"
    patched_methods = ("forward",)
    #: the processor class of the guided attention modules (in ``diffusers.models.transformers``)
    processor: ClassVar[str]

    @abstractmethod
    def positive_stream(self, kwargs: dict[str, Any]) -> tuple[int, torch.Tensor | None]:
        """The length of the prompt's text stream as the blocks see it, and its key mask ``(rows, tokens)``."""

    @abstractmethod
    def guided_forward(self, model: torch.nn.Module, forward: Any, **inputs: Any) -> Any:
        """The denoiser's ``forward`` on ``inputs`` with the negatives of ``forward`` (``Forward.carry``) refined alone
        and appended to the prompt's text stream."""

    def join(self, kwargs: dict[str, Any], negative: torch.Tensor, mask: torch.Tensor | None) -> Joined:
        num_pos, pos_mask = self.positive_stream(kwargs)
        return Joined(dict(kwargs), num_pos, pos_mask, carry=negative)

    def patched(self, name: str, original: Callable[..., Any], forward: Any, *args: Any, **kwargs: Any) -> Any:
        from diffusers.utils import apply_lora_scale

        if args:  # the core names positional inputs; a direct call may still pass some
            kwargs = dict(inspect.signature(original).bind_partial(*args, **kwargs).arguments)
        # as the original forward: a LoRA scale in `attention_kwargs` applies to this call
        return apply_lora_scale("attention_kwargs")(self.guided_forward)(original.__self__, forward, **kwargs)  # type: ignore[attr-defined]

    def attention_modules(self, denoiser: torch.nn.Module) -> dict[str, int]:
        blocks = [*denoiser.transformer_blocks, *getattr(denoiser, "single_transformer_blocks", ())]
        double = len(denoiser.transformer_blocks)
        modules = {}
        for i, block in enumerate(blocks):
            processor = block.attn.processor
            processor = getattr(processor, "original", processor)  # a guided processor: the one it replaced
            if type(processor).__name__ != self.processor:
                raise NoAdapterError(
                    f"{self.family}: expected {self.processor} in block {i}, got {type(processor).__name__}. "
                    f"Restore the model's own processors (`pipe.transformer.set_attn_processor({self.processor}())`) "
                    "or use 'cfg'."
                )
            name = f"transformer_blocks.{i}" if i < double else f"single_transformer_blocks.{i - double}"
            modules[f"{name}.attn.processor"] = i
        return modules

    def project(
        self,
        attn: Any,
        text: TextLayout,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> Projected | None:
        if encoder_hidden_states is None:
            return None  # no text in this call
        from diffusers.models.embeddings import apply_rotary_emb

        double = attn.add_q_proj is not None

        def qkv(x: torch.Tensor, q: Any, k: Any, v: Any, norm_q: Any, norm_k: Any) -> list[torch.Tensor]:
            out = [f(x).unflatten(2, (attn.heads, -1)) for f in (q, k, v)]
            out[0] = out[0] if norm_q is None else norm_q(out[0])
            out[1] = out[1] if norm_k is None else norm_k(out[1])
            return out

        q, k, v = qkv(hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
        if image_rotary_emb is not None:  # the image tokens only
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        if double:
            tq, tk, tv = qkv(encoder_hidden_states, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj,
                             attn.norm_added_q, attn.norm_added_k)  # fmt: skip
        else:  # single-stream: the same projections and norms over [image, text], per token
            tq, tk, tv = qkv(encoder_hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)

        def bhld(*xs: torch.Tensor) -> QKV:
            return QKV(*(x.transpose(1, 2) for x in xs))

        return Projected(bhld(q, k, v), bhld(tq, tk, tv), carry=double)

    def finish(self, attn: Any, projected: Projected, image: torch.Tensor, text: torch.Tensor | None) -> Any:
        dtype = projected.image.q.dtype  # type: ignore[union-attr]
        img, txt = merge_heads(image, dtype), merge_heads(text, dtype)  # type: ignore[arg-type]
        if getattr(attn, "to_out", None) is not None:
            img = attn.to_out[1](attn.to_out[0](img))
        if getattr(attn, "to_add_out", None) is not None:
            txt = attn.to_add_out(txt)
        return img, txt


def refined_negatives(refiner: torch.nn.Module, forward: Any, timestep: torch.Tensor) -> list[torch.Tensor]:
    """Each negative of the guided ``forward`` (its raw tokens in ``Forward.carry``) through the model's token
    ``refiner`` alone, with its own padding mask: as the model refines a prompt of its own."""
    negative, p = forward.carry, forward.text.num_pos
    out = []
    for (a, b), mask in zip(forward.spans, forward.masks):
        if mask is not None:  # a row without this negative (an empty prompt): finite numbers, never attended to
            mask = mask | ~mask.any(1, keepdim=True)
        out.append(refiner(negative[:, a - p : b - p], timestep, mask))
    return out


def run_blocks(model: torch.nn.Module, blocks: Any, hidden: torch.Tensor, text: torch.Tensor, *args: Any) -> Any:
    """The model's blocks over ``(hidden, text)`` as its ``forward`` runs them (gradient checkpointing included)."""
    checkpoint = torch.is_grad_enabled() and model.gradient_checkpointing
    for block in blocks:
        if checkpoint:
            hidden, text = model._gradient_checkpointing_func(block, hidden, text, *args)
        else:
            hidden, text = block(hidden, text, *args)
    return hidden, text


def unpatchify(
    model: torch.nn.Module, hidden: torch.Tensor, temb: torch.Tensor, shape: tuple[int, ...]
) -> torch.Tensor:
    """The model's output head: ``norm_out``, ``proj_out`` and the patches back to ``(B, C, F, H, W)``."""
    batch, _, frames, height, width = shape
    p_t, p = model.config.patch_size_t, model.config.patch_size
    hidden = model.proj_out(model.norm_out(hidden, temb))
    hidden = hidden.reshape(batch, frames // p_t, height // p, width // p, -1, p_t, p, p)
    return hidden.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)
