"""A tiny Mochi 1 pipeline built offline: T5 with the in-memory tokenizer, a 2-block ``MochiTransformer3DModel``
(random rotary frequencies, so the video tokens carry positions) and a tiny ``AutoencoderKLMochi``."""

from __future__ import annotations

from typing import Any

import torch

from negguide.tiny.parts import finish
from negguide.tiny.parts import t5_config
from negguide.tiny.parts import t5_tokenizer

#: keyword arguments of a quick call: 32x32, 7 frames (the VAE compresses 8x in space and 6x in time: 2 latent
#: frames of 4x4, patch 2: 8 video tokens), CFG off, decoded by the tiny VAE
CALL: dict[str, Any] = {
    "height": 32,
    "width": 32,
    "num_frames": 7,
    "max_sequence_length": 32,
    "guidance_scale": 1.0,
    "output_type": "np",
}

#: the tiny transformer's config: the video stream is 32 wide (2 heads x 16), the text stream narrower (24, Mochi's
#: ``pooled_projection_dim``), T5's width 32 (``text_embed_dim``, divisible by the caption pooler's 8 heads)
TRANSFORMER: dict[str, Any] = {
    "patch_size": 2,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "num_layers": 2,
    "pooled_projection_dim": 24,
    "in_channels": 12,
    "text_embed_dim": 32,
    "time_embed_dim": 8,
    "max_sequence_length": 32,
}


def build(seed: int = 0, num_layers: int = 2, force_zeros_for_empty_prompt: bool = False) -> Any:
    """A tiny ``MochiPipeline`` (flow-matching Euler), the same weights on every call.

    Args:
        seed: seeds every weight.
        num_layers: transformer blocks (the last one is ``context_pre_only``: no text output projection).
        force_zeros_for_empty_prompt: the pipeline's option that encodes an empty prompt as all-masked zeros.
    """
    from diffusers import AutoencoderKLMochi
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers import MochiPipeline
    from diffusers import MochiTransformer3DModel
    from transformers import T5Config
    from transformers import T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    text_encoder = T5EncoderModel(t5_config(T5Config, tokenizer))
    transformer = MochiTransformer3DModel(**{**TRANSFORMER, "num_layers": num_layers})
    with torch.no_grad():  # the model initialises its rotary frequencies to zero (no rotation): give them values
        transformer.pos_frequencies.normal_(0.0, 0.5)
    vae = AutoencoderKLMochi(
        latent_channels=12, out_channels=3, encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32), layers_per_block=(1, 1, 1, 1, 1),
    )  # fmt: skip
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    pipe = MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                         tokenizer=tokenizer, transformer=transformer,
                         force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)  # fmt: skip
    return finish(pipe)
