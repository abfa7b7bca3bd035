"""A tiny ``PixArtSigmaPipeline`` or ``PixArtAlphaPipeline`` built offline (T5 with the in-memory tokenizer, a
2-block PixArt transformer)."""

from __future__ import annotations

from typing import Any

import torch

from negguide.tiny.parts import finish
from negguide.tiny.parts import t5_config
from negguide.tiny.parts import t5_tokenizer
from negguide.tiny.parts import vae

#: keyword arguments of a quick call: 16x16 images (64 image tokens), no resolution binning (the tiny sample
#: size is in no aspect-ratio bin), no caption cleaning (it needs bs4 and ftfy), CFG off
CALL: dict[str, Any] = {
    "height": 16,
    "width": 16,
    "max_sequence_length": 32,
    "guidance_scale": 1.0,
    "use_resolution_binning": False,
    "clean_caption": False,
    "output_type": "np",
}


def build(seed: int = 0, alpha: bool = False) -> Any:
    """A tiny ``PixArtSigmaPipeline`` (2 blocks, 2 heads of 12, T5 width 32), or with ``alpha`` a
    ``PixArtAlphaPipeline`` whose transformer has PixArt-α 1024's ``sample_size=128``, so the pipeline passes the
    ``resolution``/``aspect_ratio`` micro-conditions; 16x16 images, a DDIM scheduler (its step also returns the
    predicted sample PixArt-α's one-step path takes)."""
    from diffusers import DDIMScheduler
    from diffusers import PixArtAlphaPipeline
    from diffusers import PixArtSigmaPipeline
    from diffusers import PixArtTransformer2DModel
    from transformers import T5Config
    from transformers import T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    text_encoder = T5EncoderModel(t5_config(T5Config, tokenizer))
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=24, caption_channels=32, sample_size=128 if alpha else 8, patch_size=2,
    )  # fmt: skip
    cls = PixArtAlphaPipeline if alpha else PixArtSigmaPipeline
    pipe = cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae(4), transformer=transformer,
               scheduler=DDIMScheduler())  # fmt: skip
    return finish(pipe)
