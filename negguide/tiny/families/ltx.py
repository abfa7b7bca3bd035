"""A tiny LTX-Video 0.9.x pipeline built offline: T5 with the in-memory tokenizer, a 2-block
``LTXVideoTransformer3DModel`` and a tiny ``AutoencoderKLLTXVideo`` (``LTXPipeline``, ``LTXImageToVideoPipeline``
or ``LTXConditionPipeline``, all from the same parts)."""

from __future__ import annotations

from typing import Any

import torch

from negguide.tiny.parts import finish
from negguide.tiny.parts import t5_config
from negguide.tiny.parts import t5_tokenizer

#: keyword arguments of a quick call: 64x64, 9 frames (the tiny VAE compresses 16x in space and 4x in time: 3
#: latent frames of 4x4, 48 video tokens), CFG off, decoded by the tiny VAE
CALL: dict[str, Any] = {
    "height": 64,
    "width": 64,
    "num_frames": 9,
    "max_sequence_length": 32,
    "guidance_scale": 1.0,
    "output_type": "np",
}

#: the tiny LTX transformer's config (caption_channels = the tiny T5's width; cross_attention_dim = the inner dim)
LTX_TRANSFORMER: dict[str, Any] = {
    "in_channels": 8,
    "out_channels": 8,
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "cross_attention_dim": 24,
    "num_layers": 2,
    "caption_channels": 32,
}

KINDS = ("text2video", "image2video", "condition")


def build(seed: int = 0, kind: str = "text2video") -> Any:
    """A tiny LTX-Video pipeline: ``kind`` ``"text2video"`` (``LTXPipeline``), ``"image2video"``
    (``LTXImageToVideoPipeline``) or ``"condition"`` (``LTXConditionPipeline``, the one LTX-Video 0.9.5+ and the
    distilled 13B checkpoints use); flow-matching Euler, the same weights for every kind."""
    from diffusers import AutoencoderKLLTXVideo
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers import LTXConditionPipeline
    from diffusers import LTXImageToVideoPipeline
    from diffusers import LTXPipeline
    from diffusers import LTXVideoTransformer3DModel
    from transformers import T5Config
    from transformers import T5EncoderModel

    classes = {"text2video": LTXPipeline, "image2video": LTXImageToVideoPipeline, "condition": LTXConditionPipeline}
    if kind not in classes:
        raise ValueError(f"tiny ltx: expected `kind` in {sorted(classes)}, got {kind!r}.")
    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    text_encoder = T5EncoderModel(t5_config(T5Config, tokenizer))
    transformer = LTXVideoTransformer3DModel(**LTX_TRANSFORMER)
    vae = AutoencoderKLLTXVideo(
        latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        spatio_temporal_scaling=(True, True, False, False), decoder_spatio_temporal_scaling=(True, True, False, False),
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
        decoder_inject_noise=(False, False, False, False, False), encoder_causal=True, decoder_causal=False,
    )  # fmt: skip
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    pipe = classes[kind](scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                         tokenizer=tokenizer, transformer=transformer)  # fmt: skip
    return finish(pipe)
