"""A tiny ``ChromaPipeline``, ``ChromaImg2ImgPipeline`` or ``ChromaInpaintPipeline`` built offline."""

from __future__ import annotations

from typing import Any

import torch

from negguide.tiny.parts import finish
from negguide.tiny.parts import t5_config
from negguide.tiny.parts import t5_tokenizer
from negguide.tiny.parts import vae

#: keyword arguments of a quick call (Chroma's own CFG is on by default: ``guidance_scale`` 1 turns it off)
CALL: dict[str, Any] = {
    "height": 32,
    "width": 32,
    "max_sequence_length": 32,
    "guidance_scale": 1.0,
    "output_type": "np",
}

_KINDS = ("text2image", "img2img", "inpaint")


def build(seed: int = 0, kind: str = "text2image") -> Any:
    """A tiny Chroma pipeline (1 double- and 1 single-stream block): ``kind`` ``"text2image"`` (``ChromaPipeline``),
    ``"img2img"`` (``ChromaImg2ImgPipeline``) or ``"inpaint"`` (``ChromaInpaintPipeline``); the same weights for
    every kind and call."""
    from diffusers import ChromaImg2ImgPipeline
    from diffusers import ChromaInpaintPipeline
    from diffusers import ChromaPipeline
    from diffusers import ChromaTransformer2DModel
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import T5Config
    from transformers import T5EncoderModel

    if kind not in _KINDS:
        raise ValueError(f"expected `kind` in {_KINDS}, got {kind!r}")
    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 4, 8),
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=1,
    )
    if kind == "inpaint":  # diffusers 0.42.1's ChromaInpaintPipeline reads a config key Chroma's transformer lacks
        transformer.register_to_config(guidance_embeds=False)  # (pipeline_chroma_inpainting.py: `guidance_embeds`)
    cls = {"text2image": ChromaPipeline, "img2img": ChromaImg2ImgPipeline, "inpaint": ChromaInpaintPipeline}[kind]
    pipe = cls(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae(1),
        text_encoder=T5EncoderModel(t5_config(T5Config, tokenizer)),
        tokenizer=tokenizer,
    )
    return finish(pipe)
