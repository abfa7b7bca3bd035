"""Tiny Qwen-Image pipelines (text-to-image, img2img, inpaint, Edit, Edit-Plus) built offline.

The text encoder is a random-weight ``Qwen2_5_VLForConditionalGeneration`` (vision tower included),
the tokenizer an in-memory byte-level BPE ``Qwen2Tokenizer`` with Qwen's chat and vision special
tokens, and the Edit pipelines' processor an in-memory ``Qwen2VLProcessor`` that shrinks every
input image to 56x56 pixels (4 vision tokens). The Edit pipelines resize their input image to
about 1024x1024 pixels for the VAE whatever the output size, so the VAE compresses 16x (1024
latent tokens) and still takes about a second to encode it on a CPU.
"""

from __future__ import annotations

from typing import Any

import torch

from negguide.tiny.parts import finish

#: keyword arguments of a quick call (the pipeline's own CFG is off: ``true_cfg_scale`` 1)
CALL: dict[str, Any] = {
    "height": 64,
    "width": 64,
    "max_sequence_length": 64,
    "true_cfg_scale": 1.0,
    "output_type": "latent",
}

#: Qwen2.5's special tokens the pipelines' templates and the processor use
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

_KINDS = ("text2image", "img2img", "inpaint", "edit", "edit_plus")


def qwen_tokenizer() -> Any:
    """An in-memory byte-level BPE ``Qwen2Tokenizer``: every byte is a token, the special tokens are whole."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab: dict[str, int] = {}
    for token in [*sorted(ByteLevel.alphabet()), *SPECIAL_TOKENS]:
        vocab.setdefault(token, len(vocab))
    return Qwen2Tokenizer(vocab=vocab, merges=[], additional_special_tokens=list(SPECIAL_TOKENS[1:]))


def qwen_vl_processor(tokenizer: Any) -> Any:
    """An in-memory ``Qwen2VLProcessor`` for images only (56x56 pixels: 4 vision tokens per image)."""
    from transformers import Qwen2VLImageProcessorPil
    from transformers import Qwen2VLProcessor

    class ImageProcessor(Qwen2VLProcessor):
        # the pipelines never pass videos; no video processor, so torchvision is not needed
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            return None if argument is None else super().check_argument_for_proper_class(argument_name, argument)

    images = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56)
    return ImageProcessor(image_processor=images, tokenizer=tokenizer, video_processor=None)


def qwen_vl_config(tokenizer: Any) -> Any:
    """A tiny ``Qwen2_5_VLConfig`` (2 text layers of width 16, a 2-layer vision tower) for ``tokenizer``."""
    from transformers import Qwen2_5_VLConfig

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    return Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "vocab_size": len(tokenizer),
            "rope_parameters": {"mrope_section": [1, 1, 2], "rope_type": "default", "rope_theta": 1e6},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": 16,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def build(seed: int = 0, kind: str = "text2image") -> Any:
    """A tiny Qwen-Image pipeline (2 dual-stream blocks, 2 heads of 16): ``kind`` ``"text2image"``
    (``QwenImagePipeline``), ``"img2img"``, ``"inpaint"``, ``"edit"`` (``QwenImageEditPipeline``) or
    ``"edit_plus"`` (``QwenImageEditPlusPipeline``); the same weights for every kind and call.

    With this byte-level tokenizer the chat template's system part is longer than with Qwen's own, so
    ``prompt_template_encode_start_idx`` is set to its token count here: the pipeline drops exactly the
    template's system part, as it does with Qwen's tokenizer (34 or 64 tokens there).
    """
    from diffusers import AutoencoderKLQwenImage
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers import QwenImageEditPipeline
    from diffusers import QwenImageEditPlusPipeline
    from diffusers import QwenImageImg2ImgPipeline
    from diffusers import QwenImageInpaintPipeline
    from diffusers import QwenImagePipeline
    from diffusers import QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    if kind not in _KINDS:
        raise ValueError(f"expected `kind` in {_KINDS}, got {kind!r}")
    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer()
    text_encoder = Qwen2_5_VLForConditionalGeneration(qwen_vl_config(tokenizer))
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(8, 4, 4),
    )
    # 16x (four 2-D downsamplings, the width Qwen's VAE has at 8x): the Edit pipelines' ~1024x1024 input image
    # becomes 32x32 tokens, and the encoder's full-resolution work stays one convolution
    vae = AutoencoderKLQwenImage(
        base_dim=2,
        z_dim=4,
        dim_mult=[1, 1, 1, 1, 1],
        num_res_blocks=0,
        temperal_downsample=[False, False, False, False],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    parts = {
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "transformer": transformer,
    }
    classes = {
        "text2image": QwenImagePipeline,
        "img2img": QwenImageImg2ImgPipeline,
        "inpaint": QwenImageInpaintPipeline,
        "edit": QwenImageEditPipeline,
        "edit_plus": QwenImageEditPlusPipeline,
    }
    if kind.startswith("edit"):
        parts["processor"] = qwen_vl_processor(tokenizer)
    pipe = classes[kind](**parts)
    system = pipe.prompt_template_encode.index("<|im_start|>user\n") + len("<|im_start|>user\n")
    pipe.prompt_template_encode_start_idx = len(tokenizer(pipe.prompt_template_encode[:system]).input_ids)
    return finish(pipe)
