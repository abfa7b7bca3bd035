"""A tiny ``FluxPipeline`` or ``FluxKontextPipeline`` built offline."""

from __future__ import annotations

from typing import Any

import torch

from negguide.tiny.parts import clip_config
from negguide.tiny.parts import clip_tokenizer
from negguide.tiny.parts import finish
from negguide.tiny.parts import t5_config
from negguide.tiny.parts import t5_tokenizer
from negguide.tiny.parts import vae

#: keyword arguments of a quick call
CALL: dict[str, Any] = {"height": 32, "width": 32, "max_sequence_length": 32, "output_type": "np"}


def build(seed: int = 0, guidance_embeds: bool = False, kontext: bool = False) -> Any:
    """A tiny ``FluxPipeline`` (1 double- and 1 single-stream block), or ``FluxKontextPipeline``."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers import FluxKontextPipeline
    from diffusers import FluxPipeline
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel
    from transformers import T5Config
    from transformers import T5EncoderModel

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds,
    )
    cls = FluxKontextPipeline if kontext else FluxPipeline
    pipe = cls(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae(1),
        text_encoder=CLIPTextModel(clip_config(tokenizer)),
        tokenizer=tokenizer,
        text_encoder_2=T5EncoderModel(t5_config(T5Config, tokenizer_2)),
        tokenizer_2=tokenizer_2,
    )
    return finish(pipe)
