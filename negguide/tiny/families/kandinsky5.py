"""Tiny Kandinsky 5 pipelines (text-to-video, image-to-video, text-to-image) built offline.

The Qwen2.5-VL text encoder (2 text layers of width 16) and its in-memory byte-level tokenizer are
Qwen-Image's tiny ones (``negguide.tiny.families.qwenimage``); the pooled vector comes from a tiny
CLIP. The transformer is a ``Kandinsky5Transformer3DModel`` with 2 text blocks and 2 visual blocks
(2 heads of 16). Its modulation layers start at zero in diffusers (every gate closed: neither the
text nor the blocks would reach the output), so they get random weights here.
"""

from __future__ import annotations

from typing import Any

import torch

from negguide.tiny.families.qwenimage import qwen_tokenizer
from negguide.tiny.families.qwenimage import qwen_vl_config
from negguide.tiny.families.qwenimage import qwen_vl_processor
from negguide.tiny.parts import clip_config
from negguide.tiny.parts import clip_tokenizer
from negguide.tiny.parts import finish

#: keyword arguments of a quick text-to-video call (the pipeline's own CFG off: it is on by default)
CALL: dict[str, Any] = {
    "height": 32,
    "width": 32,
    "num_frames": 5,
    "guidance_scale": 1.0,
    "max_sequence_length": 64,
    "output_type": "latent",
}

#: the tiny transformer's config (``in_text_dim``: the tiny Qwen's width, ``in_text_dim2``: the tiny CLIP's)
TRANSFORMER: dict[str, Any] = {
    "in_visual_dim": 4,
    "out_visual_dim": 4,
    "in_text_dim": 16,
    "in_text_dim2": 32,
    "time_dim": 16,
    "patch_size": (1, 2, 2),
    "model_dim": 32,
    "ff_dim": 32,
    "num_text_blocks": 2,
    "num_visual_blocks": 2,
    "axes_dims": (4, 6, 6),
}

_KINDS = ("text2video", "image2video", "text2image", "image2image")


def build(seed: int = 0, kind: str = "text2video") -> Any:
    """A tiny Kandinsky 5 pipeline; seeded, the same weights for every kind and call.

    Args:
        seed: the seed of the random weights.
        kind: ``"text2video"`` (``Kandinsky5T2VPipeline``), ``"image2video"`` (``Kandinsky5I2VPipeline``, the
            transformer with ``visual_cond``), ``"text2image"`` (``Kandinsky5T2IPipeline``, 8x ``AutoencoderKL``) or
            ``"image2image"`` (``Kandinsky5I2IPipeline``: the input image enters the Qwen prompt as 4 vision tokens
            and the latents through ``visual_cond``).

    Returns:
        The pipeline, on the CPU, in float32. ``prompt_template_encode_start_idx`` is set to the token count
        of the chat template's system part with this tokenizer, so the pipeline drops exactly that part, as
        it does with Qwen's tokenizer; the image pipelines also accept 32x32 (``resolutions``).
    """
    from diffusers import AutoencoderKL
    from diffusers import AutoencoderKLHunyuanVideo
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers import Kandinsky5I2IPipeline
    from diffusers import Kandinsky5I2VPipeline
    from diffusers import Kandinsky5T2IPipeline
    from diffusers import Kandinsky5T2VPipeline
    from diffusers import Kandinsky5Transformer3DModel
    from transformers import CLIPTextModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    if kind not in _KINDS:
        raise ValueError(f"tiny kandinsky5: expected `kind` in {_KINDS}, got {kind!r}.")
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = qwen_tokenizer(), clip_tokenizer()
    text_encoder = Qwen2_5_VLForConditionalGeneration(qwen_vl_config(tokenizer))
    text_encoder_2 = CLIPTextModel(clip_config(tokenizer_2))
    transformer = Kandinsky5Transformer3DModel(**TRANSFORMER, visual_cond=kind in ("image2video", "image2image"))
    for name, module in transformer.named_modules():
        if name.endswith("modulation"):  # zero in diffusers: random here, so every gate is open
            torch.nn.init.normal_(module.out_layer.weight, std=0.2)
            torch.nn.init.normal_(module.out_layer.bias, std=0.2)
    if kind in ("text2image", "image2image"):
        vae: Any = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(4, 4, 4, 4), layers_per_block=1,
            norm_num_groups=2, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )  # fmt: skip
    else:
        vae = AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(4, 4, 4, 4), layers_per_block=1,
                                        norm_num_groups=2, mid_block_add_attention=False)  # fmt: skip
    classes = {"text2video": Kandinsky5T2VPipeline, "image2video": Kandinsky5I2VPipeline,
               "text2image": Kandinsky5T2IPipeline, "image2image": Kandinsky5I2IPipeline}  # fmt: skip
    pipe = classes[kind](
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=qwen_vl_processor(tokenizer),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
    )
    if kind in (
        "text2image",
        "image2image",
    ):  # the pipelines snap other sizes to its list (1024x1024 and up): a tiny one first
        pipe.resolutions = [(32, 32), *pipe.resolutions]
    system = pipe.prompt_template.split("{}")[0]
    pipe.prompt_template_encode_start_idx = len(tokenizer(system).input_ids)
    return finish(pipe)
