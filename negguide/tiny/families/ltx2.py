"""A tiny LTX-2 audio-video pipeline built offline: a 2-layer Gemma-3 text encoder with an in-memory Gemma-style
tokenizer, the text connectors (learnable registers in place of the padding, as LTX-2 ships them), a 2-block
``LTX2VideoTransformer3DModel``, tiny video and audio VAEs and a tiny vocoder (``LTX2Pipeline``,
``LTX2ImageToVideoPipeline`` or ``LTX2ConditionPipeline``, all from the same parts)."""

from __future__ import annotations

from typing import Any

import torch

from negguide.tiny.families.sana import gemma_tokenizer
from negguide.tiny.parts import finish

#: keyword arguments of a quick call: 32x32 (LTX-2 wants multiples of 32), 5 frames (the tiny VAE halves space and
#: time: 3 latent frames of 16x16, 768 video tokens; 5 audio tokens), every one of LTX-2's guidances off (CFG, STG,
#: modality isolation and their rescaling), video latents out (``frames``; ``audio`` holds the audio latents)
CALL: dict[str, Any] = {
    "height": 32,
    "width": 32,
    "num_frames": 5,
    "frame_rate": 25.0,
    "max_sequence_length": 32,
    "guidance_scale": 1.0,
    "audio_guidance_scale": 1.0,
    "stg_scale": 0.0,
    "audio_stg_scale": 0.0,
    "modality_scale": 1.0,
    "audio_modality_scale": 1.0,
    "guidance_rescale": 0.0,
    "audio_guidance_rescale": 0.0,
    "output_type": "latent",
}

#: keyword arguments that turn LTX-2's own guidances back on (CFG, STG on block 1, modality isolation)
ALL_GUIDANCES: dict[str, Any] = {
    "guidance_scale": 3.0,
    "audio_guidance_scale": 7.0,
    "stg_scale": 1.0,
    "audio_stg_scale": 1.0,
    "modality_scale": 3.0,
    "audio_modality_scale": 3.0,
    "guidance_rescale": 0.7,
    "audio_guidance_rescale": 0.7,
    "spatio_temporal_guidance_blocks": [1],
}

KINDS = ("text2video", "image2video", "condition")


def build(
    seed: int = 0, kind: str = "text2video", version: str = "2.0", registers: bool = True, num_layers: int = 2
) -> Any:
    """A tiny LTX-2 pipeline: ``kind`` ``"text2video"`` (``LTX2Pipeline``), ``"image2video"``
    (``LTX2ImageToVideoPipeline``) or ``"condition"`` (``LTX2ConditionPipeline``). ``version`` ``"2.0"`` (one text
    projection shared by both streams, projected again inside the transformer) or ``"2.3"`` (per-modality text
    projections of different widths, gated attention, cross-attention modulation of the text by the timestep,
    ``LTX2PerturbedAttnProcessor`` so that STG acts);
    ``registers`` False keeps Gemma's padding positions instead of the connectors' learnable registers;
    ``num_layers`` transformer blocks."""
    from diffusers import AutoencoderKLLTX2Audio
    from diffusers import AutoencoderKLLTX2Video
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers import LTX2ConditionPipeline
    from diffusers import LTX2ImageToVideoPipeline
    from diffusers import LTX2Pipeline
    from diffusers import LTX2VideoTransformer3DModel
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
    from transformers import Gemma3TextConfig
    from transformers import Gemma3TextModel

    classes = {"text2video": LTX2Pipeline, "image2video": LTX2ImageToVideoPipeline, "condition": LTX2ConditionPipeline}
    if kind not in classes:
        raise ValueError(f"tiny ltx2: expected `kind` in {sorted(classes)}, got {kind!r}.")
    if version not in ("2.0", "2.3"):
        raise ValueError(f"tiny ltx2: expected `version` '2.0' or '2.3', got {version!r}.")
    v23 = version == "2.3"
    torch.manual_seed(seed)
    tokenizer = gemma_tokenizer()
    text_encoder = Gemma3TextModel(
        Gemma3TextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=2048,
            sliding_window=16, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
    )  # fmt: skip
    # LTX-2.0: Gemma -> one projection to the caption width, shared; LTX-2.3: one projection per stream, each of
    # the transformer's text width (video 16, audio 8), no projection inside the transformer
    video_head_dim, audio_head_dim = (8, 4) if v23 else (16, 16)
    connectors = LTX2TextConnectors(
        caption_channels=32, text_proj_in_factor=3, video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=video_head_dim, video_connector_num_layers=1,
        video_connector_num_learnable_registers=8 if registers else None,
        audio_connector_num_attention_heads=2, audio_connector_attention_head_dim=audio_head_dim,
        audio_connector_num_layers=1, audio_connector_num_learnable_registers=8 if registers else None,
        connector_rope_base_seq_len=32, rope_double_precision=False, rope_type="split", video_gated_attn=v23,
        audio_gated_attn=v23, per_modality_projections=v23, video_hidden_dim=16, audio_hidden_dim=8,
    )  # fmt: skip
    transformer = LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=4,
        audio_cross_attention_dim=8, num_layers=num_layers, caption_channels=32, rope_double_precision=False,
        rope_type="split", gated_attn=v23, cross_attn_mod=v23, audio_gated_attn=v23, audio_cross_attn_mod=v23,
        use_prompt_embeddings=not v23, perturbed_attn=v23,
    )  # fmt: skip
    vae = AutoencoderKLLTX2Video(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), decoder_block_out_channels=(8,),
        layers_per_block=(1,), decoder_layers_per_block=(1, 1), spatio_temporal_scaling=(True,),
        decoder_spatio_temporal_scaling=(True,), decoder_inject_noise=(False, False), downsample_type=("spatial",),
        upsample_residual=(False,), upsample_factor=(1,), timestep_conditioning=False, patch_size=1, patch_size_t=1,
        encoder_causal=True, decoder_causal=False,
    )  # fmt: skip
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1, attn_resolutions=None, in_channels=2,
        resolution=32, latent_channels=2, norm_type="pixel", causality_axis="height", dropout=0.0,
        mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160, is_causal=True, mel_bins=8,
    )  # fmt: skip
    vocoder = LTX2Vocoder(
        in_channels=16, hidden_channels=32, out_channels=2, upsample_kernel_sizes=[4, 4], upsample_factors=[2, 2],
        resnet_kernel_sizes=[3], resnet_dilations=[[1, 3, 5]], leaky_relu_negative_slope=0.1,
        output_sampling_rate=16000,
    )  # fmt: skip
    pipe = classes[kind](
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, audio_vae=audio_vae, text_encoder=text_encoder,
        tokenizer=tokenizer, connectors=connectors, transformer=transformer, vocoder=vocoder,
    )  # fmt: skip
    return finish(pipe)
