"""Tiny SkyReels-V2 pipelines built offline: T2V, I2V and the diffusion-forcing T2V / I2V / V2V pipelines."""

from __future__ import annotations

from typing import Any

import torch

from negguide.tiny.families.wan import WAN_TRANSFORMER
from negguide.tiny.parts import finish
from negguide.tiny.parts import t5_config
from negguide.tiny.parts import t5_tokenizer

#: keyword arguments of a quick call (the diffusion-forcing pipelines also take ``base_num_frames``)
CALL: dict[str, Any] = {"height": 32, "width": 32, "num_frames": 5, "max_sequence_length": 32, "output_type": "np"}

#: the tiny transformer's config: Wan's (SkyReels-V2's transformer is Wan's under another name)
TRANSFORMER: dict[str, Any] = dict(WAN_TRANSFORMER)

#: ``build``'s pipelines: name -> diffusers class
PIPELINES: dict[str, str] = {
    "t2v": "SkyReelsV2Pipeline",
    "i2v": "SkyReelsV2ImageToVideoPipeline",
    "df": "SkyReelsV2DiffusionForcingPipeline",
    "df-i2v": "SkyReelsV2DiffusionForcingImageToVideoPipeline",
    "df-v2v": "SkyReelsV2DiffusionForcingVideoToVideoPipeline",
}


def build(
    seed: int = 0,
    pipeline: str = "t2v",
    num_layers: int = 2,
    inject_sample_info: bool = False,
    num_frame_per_block: int = 1,
) -> Any:
    """A tiny SkyReels-V2 pipeline (2 blocks), 32x32, 5 frames.

    Args:
        seed: seeds every weight (the same weights on every call).
        pipeline: one of ``PIPELINES`` (``"i2v"``: a CLIP image encoder, 17 image-context tokens ahead of the text).
        num_layers: transformer blocks.
        inject_sample_info: the fps embedding of SkyReels-V2-DF-1.3B.
        num_frame_per_block: latent frames per causal block of the diffusion-forcing self-attention mask.
    """
    import diffusers
    from diffusers import AutoencoderKLWan
    from diffusers import SkyReelsV2Transformer3DModel
    from diffusers import UniPCMultistepScheduler
    from transformers import UMT5Config
    from transformers import UMT5EncoderModel

    if pipeline not in PIPELINES:
        raise ValueError(f"expected `pipeline` in {sorted(PIPELINES)}, got {pipeline!r}.")
    _ftfy_fallback()
    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    parts: dict[str, Any] = {
        "tokenizer": tokenizer,
        "text_encoder": UMT5EncoderModel(t5_config(UMT5Config, tokenizer)),
        "vae": AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        ),
        # the pipelines' scheduler (the diffusion-forcing ones step a copy per frame with the step matrix's timesteps)
        "scheduler": UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0),
    }
    config = {**TRANSFORMER, "num_layers": num_layers, "inject_sample_info": inject_sample_info,
              "num_frame_per_block": num_frame_per_block}  # fmt: skip
    if pipeline == "i2v":
        from transformers import CLIPImageProcessorPil
        from transformers import CLIPVisionConfig
        from transformers import CLIPVisionModel

        vision = CLIPVisionConfig(hidden_size=16, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, patch_size=8)  # fmt: skip
        parts["image_encoder"] = CLIPVisionModel(vision)
        parts["image_processor"] = CLIPImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        )
        config.update(in_channels=36, image_dim=16, added_kv_proj_dim=24)
    parts["transformer"] = SkyReelsV2Transformer3DModel(**config)
    return finish(getattr(diffusers, PIPELINES[pipeline])(**parts))


def _ftfy_fallback() -> None:
    """diffusers' SkyReels-V2 pipelines call ``ftfy.fix_text`` unconditionally (Wan's pipelines skip it when ftfy
    is missing, and negguide does not depend on it): without ftfy installed, give their modules Wan's fallback,
    the text unchanged."""
    import importlib
    import importlib.util
    import types

    if importlib.util.find_spec("ftfy") is not None:
        return
    fallback = types.SimpleNamespace(fix_text=lambda text: text)
    for name in ("", "_i2v", "_diffusion_forcing", "_diffusion_forcing_i2v", "_diffusion_forcing_v2v"):
        module = importlib.import_module(f"diffusers.pipelines.skyreels_v2.pipeline_skyreels_v2{name}")
        if not hasattr(module, "ftfy"):
            module.ftfy = fallback
