"""Tiny CogVideoX pipelines built offline: T2V (2b-like or rotary 5b-like), I2V (5b-I2V-like), V2V, Fun control."""

from __future__ import annotations

from typing import Any

import torch

from negguide.tiny.parts import finish
from negguide.tiny.parts import t5_config
from negguide.tiny.parts import t5_tokenizer

#: keyword arguments of a quick call: 16x16, 9 frames (3 latent frames of 2x2 latents: 12 video tokens)
CALL: dict[str, Any] = {"height": 16, "width": 16, "num_frames": 9, "max_sequence_length": 16, "output_type": "np"}

#: the tiny transformer's config (the text length is fixed at ``max_text_seq_length`` = ``CALL``'s
#: ``max_sequence_length``; text_embed_dim = the tiny T5's d_model)
TRANSFORMER: dict[str, Any] = {
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "in_channels": 4,
    "out_channels": 4,
    "time_embed_dim": 8,
    "text_embed_dim": 32,
    "num_layers": 2,
    "sample_width": 2,
    "sample_height": 2,
    "sample_frames": 9,
    "patch_size": 2,
    "temporal_compression_ratio": 4,
    "max_text_seq_length": 16,
}

#: ``build``'s pipelines: name -> (diffusers class, transformer changes)
PIPELINES: dict[str, tuple[str, dict[str, Any]]] = {
    # CogVideoX-2b: sinusoidal positions added over [text (zeros), video]
    "t2v": ("CogVideoXPipeline", {}),
    # CogVideoX-5b: rotary positions on the video tokens, nothing added
    "t2v-rope": ("CogVideoXPipeline", {"use_rotary_positional_embeddings": True}),
    # CogVideoX-5b-I2V: image latents on the channels, rotary and learned positions (text part learned too)
    "i2v": (
        "CogVideoXImageToVideoPipeline",
        {"in_channels": 8, "use_rotary_positional_embeddings": True, "use_learned_positional_embeddings": True},
    ),
    "v2v": ("CogVideoXVideoToVideoPipeline", {}),
    "fun-control": ("CogVideoXFunControlPipeline", {"in_channels": 8}),
}


def build(seed: int = 0, pipeline: str = "t2v", num_layers: int = 2) -> Any:
    """A tiny CogVideoX pipeline (2 blocks, DDIM), 16x16, 9 frames.

    Args:
        seed: seeds every weight (the same weights on every call).
        pipeline: one of ``PIPELINES``.
        num_layers: transformer blocks.
    """
    import diffusers
    from diffusers import AutoencoderKLCogVideoX
    from diffusers import CogVideoXDDIMScheduler
    from diffusers import CogVideoXTransformer3DModel
    from transformers import T5Config
    from transformers import T5EncoderModel

    if pipeline not in PIPELINES:
        raise ValueError(f"expected `pipeline` in {sorted(PIPELINES)}, got {pipeline!r}.")
    name, changes = PIPELINES[pipeline]
    torch.manual_seed(seed)
    tokenizer = t5_tokenizer(model_max_length=226)
    vae = AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    transformer = CogVideoXTransformer3DModel(**{**TRANSFORMER, "num_layers": num_layers, **changes})
    if changes.get("use_learned_positional_embeddings"):  # a trained table: not zero on the text rows either
        with torch.no_grad():
            transformer.patch_embed.pos_embedding.normal_(0.0, 0.5)
    pipe = getattr(diffusers, name)(
        tokenizer=tokenizer,
        text_encoder=T5EncoderModel(t5_config(T5Config, tokenizer)),
        vae=vae,
        transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(timestep_spacing="trailing", prediction_type="v_prediction"),
    )
    return finish(pipe)
