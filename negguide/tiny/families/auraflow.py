"""A tiny ``AuraFlowPipeline`` built offline: a 2-layer UMT5 encoder with the in-memory T5 tokenizer, an AuraFlow
transformer with one joint (MMDiT) and two single blocks and its 8 register tokens, and a tiny VAE."""

from __future__ import annotations

from typing import Any

import torch

from negguide.tiny.parts import finish
from negguide.tiny.parts import t5_config
from negguide.tiny.parts import t5_tokenizer
from negguide.tiny.parts import vae

#: keyword arguments of a quick call: 8x8 images (the tiny VAE does not downsample: 8x8 latents, 16 image tokens
#: after 2x2 patches), a short ``max_sequence_length``, the pipeline's CFG off (``guidance_scale`` 1)
CALL: dict[str, Any] = {
    "height": 8,
    "width": 8,
    "max_sequence_length": 32,
    "guidance_scale": 1.0,
    "output_type": "np",
}


def build(seed: int = 0) -> Any:
    """A tiny ``AuraFlowPipeline``: UMT5 of width 32, an AuraFlow transformer of width 16 (2 heads of 8; 1 joint
    block, 2 single blocks; learnt positions for an 8x8 patch grid), flow-matching Euler."""
    from diffusers import AuraFlowPipeline
    from diffusers import AuraFlowTransformer2DModel
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import UMT5Config
    from transformers import UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    text_encoder = UMT5EncoderModel(t5_config(UMT5Config, tokenizer))
    transformer = AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
        out_channels=4, pos_embed_max_size=64,
    )  # fmt: skip
    with torch.no_grad():  # the default init gives gates of ~0.04: the text would barely reach the image
        for name, module in transformer.named_modules():
            if name.endswith(("norm1", "norm1_context")):
                module.linear.weight.mul_(10.0)
    pipe = AuraFlowPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae(4), transformer=transformer,
                            scheduler=FlowMatchEulerDiscreteScheduler())  # fmt: skip
    return finish(pipe)
