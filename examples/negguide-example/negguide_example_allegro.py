"""An example negguide adapter plugin: Allegro (``AllegroPipeline``, text-to-video DiT, text through cross-attention).

Model facts owned here (diffusers 0.42, ``transformer_allegro.py`` and ``pipeline_allegro.py``):

* text enters every block through the cross-attention ``transformer_blocks[i].attn2`` only
  (``attn1`` is called with ``encoder_hidden_states=None`` and rotary embeddings); the processor is
  ``AllegroAttnProcessor2_0``, called as ``(attn, hidden_states, encoder_hidden_states,
  attention_mask, temb, image_rotary_emb)``, with SDPA's default scale and no q/k norms;
* ``encoder_hidden_states`` is the raw T5 output, which the pipeline passes as
  ``(rows, 1, tokens, caption_channels)``; the transformer projects it per token
  (``caption_projection``) and uses it nowhere else (the timestep embedding sees no text), so the
  negatives' T5 tokens, encoded without padding, are appended to it: ``[P, N_1, ...]``;
* ``encoder_attention_mask`` ``(rows, tokens)`` marks the prompt's padding; the transformer turns it
  into an additive bias (``-10000`` on padding) for ``attn2``. The join extends it over the
  negatives; the guided call uses the core's boolean masks (the same information) instead;
* the pipeline's own CFG runs one batch ``[uncond, cond]``: only the ``cond`` half is guided.

``negative_prompt_embeds``: a tensor ``(1 or prompts or rows, n, caption_channels)`` of T5
embeddings as ``encode_prompt`` returns them, real tokens only (every token is attended: cut the
padding with the mask ``encode_prompt`` returns, ``embeds[:, :mask.sum()]``); CFG zero-pads a
shorter tensor to the prompt's length and masks the padding, as the pipeline does.
"""

from __future__ import annotations

from typing import Any

import torch

import negguide
from negguide.adapter import QKV
from negguide.adapter import Conditioning
from negguide.adapter import CrossAttentionAdapter
from negguide.adapter import EncodeCall
from negguide.adapter import Joined
from negguide.adapter import Projected
from negguide.adapter import TextLayout
from negguide.adapter import heads
from negguide.adapter import merge_heads
from negguide.errors import NegativePromptError
from negguide.errors import NegGuideError
from negguide.errors import NoAdapterError


@negguide.hookimpl
def register_adapters(register) -> None:  # noqa: ANN001
    register(AllegroAdapter)


class AllegroAdapter(CrossAttentionAdapter):
    """Adapter for ``AllegroTransformer3DModel`` (``AllegroPipeline``, Allegro T2V)."""

    family = "allegro"
    num_per_prompt_arg = "num_videos_per_prompt"
    text_mask_input = "encoder_attention_mask"
    pipeline_cfg = "batched"
    # CFG batches the negative branch beside the pipeline's own 4-D text input: give it in that form (an extra)
    conditioning_inputs = {"encoder_hidden_states": "text4d", "encoder_attention_mask": "mask"}

    @classmethod
    def matches(cls, denoiser: Any) -> bool:
        from diffusers import AllegroTransformer3DModel

        return isinstance(denoiser, AllegroTransformer3DModel)

    def encode_negative(self, text: str, call: EncodeCall, padded: bool) -> Conditioning:
        # the pipeline's own encoder (its lowercasing and caption cleaning), padded to a known length
        msl = int(call.arguments.get("max_sequence_length") or 512)
        length = self.positive(call.output).shape[1] if padded else msl
        embeds, mask, _, _ = call.encode(
            prompt=[text], do_classifier_free_guidance=False, num_videos_per_prompt=1, device=call.device,
            clean_caption=call.arguments.get("clean_caption", False), max_sequence_length=length,
        )  # fmt: skip
        if padded:  # as the pipeline encodes its own negative: at the positive's length, masked
            return _conditioning(embeds, mask.bool())
        n = int(mask.sum())  # T5 masks its padding, so the real tokens are the same without it
        return Conditioning(embeds[:, :n])

    def negative_from_embeds(self, embeds: Any, call: EncodeCall, padded: bool) -> Conditioning:
        width = self.find_denoisers()[0].config.caption_channels
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[-1] != width:
            got = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise NegativePromptError(
                f"allegro: expected `negative_prompt_embeds` as a (rows, tokens, {width}) tensor of T5 embeddings, "
                f"got {got}. Encode it with `pipe.encode_prompt(..., do_classifier_free_guidance=False)` and keep "
                "the real tokens: `embeds[:, :mask.sum()]`."
            )
        if not padded:
            return Conditioning(embeds)
        length, n = self.positive(call.output).shape[1], embeds.shape[1]
        if n > length:
            raise NegativePromptError(
                f"allegro: CFG runs the negative beside the prompt, so it expected at most {length} negative tokens "
                f"(the prompt's), got {n}. Encode the negative with the same `max_sequence_length` as the prompt."
            )
        mask = torch.arange(length, device=embeds.device) < n  # zero tokens, masked out: what padding is to the model
        return _conditioning(torch.nn.functional.pad(embeds, (0, 0, 0, length - n)), mask.expand(embeds.shape[0], -1))

    def join(self, kwargs: dict[str, Any], negative: torch.Tensor, mask: torch.Tensor | None) -> Joined:
        text = kwargs[self.text_input]
        if text.ndim == 4 and text.shape[1] == 1:  # the pipeline's (rows, 1, tokens, channels): join as 3-D
            joined = super().join({**kwargs, self.text_input: text[:, 0]}, negative, mask)
            joined.kwargs[self.text_input] = joined.kwargs[self.text_input][:, None]
            return joined
        return super().join(kwargs, negative, mask)

    def attention_modules(self, denoiser: torch.nn.Module) -> dict[str, int]:
        from diffusers.models.attention_processor import AllegroAttnProcessor2_0

        modules = {}
        for i, block in enumerate(denoiser.transformer_blocks):
            if not isinstance(block.attn2.processor, AllegroAttnProcessor2_0):
                raise NoAdapterError(
                    f"allegro: expected AllegroAttnProcessor2_0 in block {i}'s cross-attention, got "
                    f"{type(block.attn2.processor).__name__}. Restore it with "
                    "`block.attn2.set_processor(AllegroAttnProcessor2_0())` or use 'cfg'."
                )
            modules[f"transformer_blocks.{i}.attn2.processor"] = i
        return modules

    def project(
        self,
        attn: Any,
        text: TextLayout,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> Projected | None:
        if encoder_hidden_states is None:
            return None  # a self-attention call (attn1): not ours
        if attention_mask is not None and attention_mask.shape[-1] != text.num_text:
            raise NegGuideError(
                f"allegro: expected the cross-attention bias over the {text.num_text} text tokens (the transformer "
                f"makes it from `encoder_attention_mask`), got shape {tuple(attention_mask.shape)}. Pass a 2-D "
                "`encoder_attention_mask`, or remove the guidance (negguide.remove(pipe)) to use a custom one."
            )
        h = attn.heads
        q = heads(attn.to_q(hidden_states), h)
        k, v = heads(attn.to_k(encoder_hidden_states), h), heads(attn.to_v(encoder_hidden_states), h)
        return Projected(QKV(q, None, None), QKV(None, k, v))

    def finish(self, attn: Any, projected: Projected, image: torch.Tensor, text: torch.Tensor | None) -> Any:
        out = merge_heads(image, projected.image.q.dtype)  # type: ignore[union-attr]
        return attn.to_out[1](attn.to_out[0](out))


def _conditioning(embeds: torch.Tensor, mask: torch.Tensor) -> Conditioning:
    """A padded negative for CFG: ``embeds`` with their mask, and the transformer's 4-D form as ``text4d``."""
    return Conditioning(embeds, mask, extras={"text4d": embeds[:, None]})


def tiny_pipeline(seed: int = 0) -> Any:
    """A tiny random-weight ``AllegroPipeline`` built offline (2 blocks, 2 heads of 12): call it with
    ``height=width=16`` and ``output_type="latent"`` (Allegro's VAE only decodes in 24-frame tiles)."""
    from diffusers import AllegroPipeline
    from diffusers import AllegroTransformer3DModel
    from diffusers import AutoencoderKLAllegro
    from diffusers import DDIMScheduler
    from transformers import T5Config
    from transformers import T5EncoderModel

    from negguide import tiny

    torch.manual_seed(seed)
    tokenizer = tiny.t5_tokenizer()
    vae = AutoencoderKLAllegro(
        down_block_types=("AllegroDownBlock3D",), up_block_types=("AllegroUpBlock3D",), block_out_channels=(8,),
        temporal_downsample_blocks=(False,), temporal_upsample_blocks=(False,), layers_per_block=1,
        norm_num_groups=2, sample_size=16,
    )  # fmt: skip
    transformer = AllegroTransformer3DModel(
        num_attention_heads=2, attention_head_dim=12, num_layers=2, cross_attention_dim=24, caption_channels=32,
        sample_height=16, sample_width=16, sample_frames=2,
    )  # fmt: skip
    pipe = AllegroPipeline(
        tokenizer=tokenizer,
        text_encoder=T5EncoderModel(tiny.t5_config(T5Config, tokenizer)),
        vae=vae,
        transformer=transformer,
        scheduler=DDIMScheduler(),
    )
    return tiny.finish(pipe)
