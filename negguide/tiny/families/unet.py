"""A tiny ``StableDiffusionPipeline`` (SD 1.x-like) or ``StableDiffusionXLPipeline`` built offline."""

from __future__ import annotations

from typing import Any

import torch

from negguide.tiny.parts import clip_config
from negguide.tiny.parts import clip_tokenizer
from negguide.tiny.parts import finish
from negguide.tiny.parts import vae

#: keyword arguments of a quick call
CALL: dict[str, Any] = {"height": 16, "width": 16, "output_type": "np"}

#: the tiny UNet's config shared by both variants (2 resolutions, cross-attention at the lower one)
UNET: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 4,
    "attention_head_dim": 2,  # diffusers' name for the number of heads of the UNet's attention
}


def build(seed: int = 0, xl: bool = False) -> Any:
    """A tiny SD 1.x-like ``StableDiffusionPipeline`` (4 cross-attention blocks, one CLIP), or with ``xl`` a
    ``StableDiffusionXLPipeline`` (8 cross-attention blocks, two CLIPs, pooled vector and time ids); 16x16 images.

    SDXL's second tokenizer pads with ``"!"`` as OpenCLIP's does (SD 2.x and SDXL), the first with its end token.
    """
    from diffusers import EulerDiscreteScheduler
    from diffusers import StableDiffusionPipeline
    from diffusers import StableDiffusionXLPipeline
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    tokenizer = clip_tokenizer()
    if not xl:
        unet = UNet2DConditionModel(**UNET, cross_attention_dim=32)
        pipe = StableDiffusionPipeline(
            vae=vae(4), text_encoder=CLIPTextModel(clip_config(tokenizer)), tokenizer=tokenizer, unet=unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
        return finish(pipe)
    tokenizer_2 = clip_tokenizer()
    tokenizer_2.pad_token = "!"
    unet = UNet2DConditionModel(
        **UNET,
        cross_attention_dim=64,  # the two CLIPs' hidden states, concatenated
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,  # pooled vector + 6 time ids
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae(4),
        text_encoder=CLIPTextModel(clip_config(tokenizer)),
        text_encoder_2=CLIPTextModelWithProjection(clip_config(tokenizer_2, projection_dim=32)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    return finish(pipe)
