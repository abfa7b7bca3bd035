"""A tiny ``Lumina2Pipeline`` built offline: a 2-layer Gemma-2 text encoder with the in-memory Gemma-style
tokenizer of the Sana builder (``<bos>`` first, right padding), a 2-layer Lumina2 transformer (one context
refiner and one noise refiner layer, grouped-query attention) and a tiny VAE."""

from __future__ import annotations

from typing import Any

import torch

from negguide.tiny.families.sana import gemma_tokenizer
from negguide.tiny.parts import finish
from negguide.tiny.parts import vae

#: a short system prompt: the pipeline's own (~150 characters, a token each here) would dominate the tiny call
SHORT_SYSTEM_PROMPT = "Draw it well."

#: keyword arguments of a quick call: 64x64 images give 8x8 latents (the pipeline's ``vae_scale_factor`` is 8),
#: 16 image tokens after 2x2 patches; a short system prompt; the pipeline's CFG off (``guidance_scale`` 1)
CALL: dict[str, Any] = {
    "height": 64,
    "width": 64,
    "max_sequence_length": 64,
    "system_prompt": SHORT_SYSTEM_PROMPT,
    "guidance_scale": 1.0,
    "output_type": "np",
}


def build(seed: int = 0) -> Any:
    """A tiny ``Lumina2Pipeline``: Gemma-2 of width 32, a Lumina2 transformer of width 32 (4 query heads, 2
    key/value heads of 8 channels, 3-axis RoPE 2+2+4), flow-matching Euler."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers import Lumina2Pipeline
    from diffusers import Lumina2Transformer2DModel
    from transformers import Gemma2Config
    from transformers import Gemma2Model

    torch.manual_seed(seed)
    tokenizer = gemma_tokenizer()
    text_encoder = Gemma2Model(
        Gemma2Config(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
    )  # fmt: skip
    transformer = Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_refiner_layers=1,
        num_attention_heads=4, num_kv_heads=2, multiple_of=16, axes_dim_rope=(2, 2, 4), axes_lens=(128, 32, 32),
        cap_feat_dim=32,
    )  # fmt: skip
    pipe = Lumina2Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae(4),
                           text_encoder=text_encoder, tokenizer=tokenizer)  # fmt: skip
    return finish(pipe)
