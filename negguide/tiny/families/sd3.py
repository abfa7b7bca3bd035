"""A tiny ``StableDiffusion3Pipeline`` built offline."""

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


def build(
    num_layers: int = 2, seed: int = 0, dual_attention_layers: tuple[int, ...] = (), latent_channels: int = 4
) -> Any:
    """A tiny ``StableDiffusion3Pipeline`` (2 joint blocks, 4 heads of 8), 32x32 images.

    ``latent_channels=16`` gives the latent width the SD3 inpainting pipeline insists on.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers import SD3Transformer2DModel
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection
    from transformers import T5Config
    from transformers import T5EncoderModel

    torch.manual_seed(seed)
    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=latent_channels,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=latent_channels,
        qk_norm="rms_norm",
        dual_attention_layers=dual_attention_layers,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae(latent_channels),
        text_encoder=CLIPTextModelWithProjection(clip_config(tokenizer)),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(clip_config(tokenizer_2)),
        tokenizer_2=tokenizer_2,
        text_encoder_3=T5EncoderModel(t5_config(T5Config, tokenizer_3)),
        tokenizer_3=tokenizer_3,
    )
    return finish(pipe)
