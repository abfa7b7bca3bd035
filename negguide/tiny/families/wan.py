"""A tiny ``WanPipeline`` built offline (and the tiny Wan transformer config its variants start from)."""

from __future__ import annotations

from typing import Any

import torch

from negguide.tiny.parts import finish
from negguide.tiny.parts import t5_config
from negguide.tiny.parts import t5_tokenizer

#: keyword arguments of a quick call
CALL: dict[str, Any] = {"height": 32, "width": 32, "num_frames": 5, "max_sequence_length": 32, "output_type": "np"}


#: the tiny Wan transformer's config (text_dim = the tiny UMT5's d_model); tests build variants from it
WAN_TRANSFORMER: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 32,
    "freq_dim": 256,
    "ffn_dim": 32,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 32,
}


def build(seed: int = 0, num_layers: int = 2) -> Any:
    """A tiny ``WanPipeline`` (text-to-video, 2 blocks), 32x32, 5 frames."""
    from diffusers import AutoencoderKLWan
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers import WanPipeline
    from diffusers import WanTransformer3DModel
    from transformers import UMT5Config
    from transformers import UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    transformer = WanTransformer3DModel(**{**WAN_TRANSFORMER, "num_layers": num_layers})
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=UMT5EncoderModel(t5_config(UMT5Config, tokenizer)),
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        transformer=transformer,
    )
    return finish(pipe)
