"""Tiny HunyuanImage 2.1 pipelines (``HunyuanImagePipeline``: base and distilled; ``HunyuanImageRefinerPipeline``)
built offline.

The MLLM text encoder is a random-weight ``Qwen2_5_VLForConditionalGeneration`` with the in-memory
byte-level ``Qwen2Tokenizer`` of the Qwen-Image builder; the glyph encoder a random-weight
``T5EncoderModel`` with diffusers' own ``ByT5Tokenizer`` (byte-level, needs no files). The pipelines'
token budgets are cut (``tokenizer_max_length`` 32, ``tokenizer_2_max_length`` 16; HunyuanImage uses
1000 and 128) and ``prompt_template_encode_start_idx`` is set to the byte-level tokenizer's count of
the template's system part (HunyuanImage drops 34 Qwen tokens, the refiner 36). The base model runs
its own CFG only when built with a ``guider`` (HunyuanImage 2.1 ships an APG-mix guider; the
distilled model a guidance embedding and MeanFlow's second timestep instead).
"""

from __future__ import annotations

from typing import Any

import torch

from negguide.tiny.families.qwenimage import qwen_tokenizer
from negguide.tiny.families.qwenimage import qwen_vl_config
from negguide.tiny.parts import finish

#: keyword arguments of a quick call
CALL: dict[str, Any] = {"height": 16, "width": 16, "output_type": "np"}

_KINDS = ("base", "distilled", "refiner")


def glyph_encoder(seed_tokenizer: Any) -> Any:
    """A tiny ``T5EncoderModel`` (2 layers, width 32) for ``ByT5Tokenizer``'s 384 ids."""
    from transformers import T5Config
    from transformers import T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(seed_tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=seed_tokenizer.pad_token_id,
            eos_token_id=seed_tokenizer.eos_token_id,
            decoder_start_token_id=seed_tokenizer.pad_token_id,
        )
    )


def build(seed: int = 0, kind: str = "base", guider: Any = None) -> Any:
    """A tiny HunyuanImage pipeline (1 double- and 1 single-stream block, 2 heads of 8, a 1-block text refiner).

    ``kind``: ``"base"`` (``HunyuanImagePipeline``, ByT5 glyph stream, no guidance embedding), ``"distilled"``
    (the same with ``guidance_embeds`` and ``use_meanflow``, as HunyuanImage 2.1 Distilled) or ``"refiner"``
    (``HunyuanImageRefinerPipeline``: no glyph stream, 5-D latents with the input image's latents as channels).
    ``guider``: the pipeline's ``guider`` component (``None``: no CFG, one transformer call per step), e.g.
    ``diffusers.guiders.AdaptiveProjectedMixGuidance(guidance_scale=3.5)``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers import HunyuanImagePipeline
    from diffusers import HunyuanImageRefinerPipeline
    from diffusers import HunyuanImageTransformer2DModel
    from transformers import ByT5Tokenizer
    from transformers import Qwen2_5_VLForConditionalGeneration

    if kind not in _KINDS:
        raise ValueError(f"expected `kind` in {_KINDS}, got {kind!r}")
    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer()
    text_encoder = Qwen2_5_VLForConditionalGeneration(qwen_vl_config(tokenizer))
    refiner = kind == "refiner"
    tokenizer_2 = ByT5Tokenizer()
    text_encoder_2 = None if refiner else glyph_encoder(tokenizer_2)
    transformer = HunyuanImageTransformer2DModel(
        # the refiner folds two latent frames into the channels, then appends the input image's: 4 x the VAE's 4
        in_channels=16 if refiner else 4,
        out_channels=8 if refiner else 4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=(1, 1, 1) if refiner else (1, 1),
        text_embed_dim=16,
        text_embed_2_dim=None if refiner else 32,
        rope_axes_dim=(2, 2, 4) if refiner else (4, 4),
        guidance_embeds=kind != "base",
        use_meanflow=kind == "distilled",
    )
    parts: dict[str, Any] = {
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "transformer": transformer,
        "guider": guider,
    }
    if refiner:
        from diffusers import AutoencoderKLHunyuanImageRefiner

        parts["vae"] = AutoencoderKLHunyuanImageRefiner(
            latent_channels=4,
            block_out_channels=(32, 32),
            layers_per_block=1,
            spatial_compression_ratio=2,
            temporal_compression_ratio=1,
            scaling_factor=1.0,
        )
        pipe = HunyuanImageRefinerPipeline(**parts)
        user = "user<|end_header_id|>\n\n"
    else:
        from diffusers import AutoencoderKLHunyuanImage

        parts["vae"] = AutoencoderKLHunyuanImage(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(32, 32),
            layers_per_block=1,
            spatial_compression_ratio=2,
            sample_size=16,
            scaling_factor=1.0,
        )
        pipe = HunyuanImagePipeline(**parts, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        pipe.tokenizer_2_max_length = 16
        user = "<|im_start|>user\n"
    pipe.tokenizer_max_length = 32
    system = pipe.prompt_template_encode.index(user) + len(user)
    pipe.prompt_template_encode_start_idx = len(tokenizer(pipe.prompt_template_encode[:system]).input_ids)
    return finish(pipe)
