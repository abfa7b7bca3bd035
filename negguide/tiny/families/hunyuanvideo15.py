"""Tiny HunyuanVideo 1.5 pipelines (text-to-video, image-to-video) built offline.

The text encoders are a random-weight 3-layer ``Qwen2_5_VLTextModel`` with an in-memory byte-level
``Qwen2TokenizerFast`` (Qwen's chat template; the Z-Image family's) and a 2-layer ByT5-style
``T5EncoderModel`` with ``ByT5Tokenizer`` (bytes need no vocabulary file). With this tokenizer the chat
template's system part is longer than Qwen's own 108 tokens, so ``prompt_template_encode_start_idx`` is set
to its token count: the pipeline drops exactly the template's system part, as it does with Qwen's
tokenizer. The pipelines' lengths are shrunk for speed (pipeline attributes): 48 Qwen tokens instead of
1000, 16 ByT5 tokens instead of 256, 4 image tokens instead of SigLIP's 729 (the image-to-video SigLIP
tower sees a 28x28 image in 14-pixel patches). The guider is the pipeline's ``ClassifierFreeGuidance``:
off (``guidance_scale=1``, the step-distilled checkpoints' use) unless ``guidance_scale`` is given.
The VAE compresses 16x in space; outputs are latents in ``CALL`` (decoding costs a few tenths of a second).
"""

from __future__ import annotations

from typing import Any

import torch

from negguide.tiny.families.zimage import qwen_tokenizer
from negguide.tiny.parts import finish
from negguide.tiny.parts import t5_config

#: keyword arguments of a quick text-to-video call: 64x64 pixels, 5 frames = 2 x 4 x 4 latent tokens
CALL: dict[str, Any] = {"height": 64, "width": 64, "num_frames": 5, "output_type": "latent"}
#: keyword arguments of a quick image-to-video call (pass a 64x64 ``image=``; the size follows the image)
I2V_CALL: dict[str, Any] = {"num_frames": 5, "output_type": "latent"}

_KINDS = ("text2video", "image2video")


def transformer(image_embed_dim: int = 16, use_meanflow: bool = False) -> Any:
    """A tiny ``HunyuanVideo15Transformer3DModel``: 2 dual-stream blocks, 2 heads of 8, 1 refiner layer
    (``use_meanflow``: the step-distilled checkpoints' ``timestep_r`` embedding)."""
    from diffusers import HunyuanVideo15Transformer3DModel

    return HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=32,
        image_embed_dim=image_embed_dim, rope_axes_dim=(2, 2, 4), target_size=64, use_meanflow=use_meanflow,
    )  # fmt: skip


def build(seed: int = 0, kind: str = "text2video", guidance_scale: float = 1.0, use_meanflow: bool = False) -> Any:
    """A tiny HunyuanVideo 1.5 pipeline; seeded, the same weights on every call.

    Args:
        seed: the seed of the random weights.
        kind: ``"text2video"`` (``HunyuanVideo15Pipeline``) or ``"image2video"``
            (``HunyuanVideo15ImageToVideoPipeline``).
        guidance_scale: the scale of its guider, ``ClassifierFreeGuidance``; 1 turns CFG off (one call per step).
        use_meanflow: the step-distilled image-to-video checkpoints' MeanFlow ``timestep_r`` embedding.

    Returns:
        The pipeline, on the CPU, in float32.
    """
    from diffusers import AutoencoderKLHunyuanVideo15
    from diffusers import ClassifierFreeGuidance
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers import HunyuanVideo15ImageToVideoPipeline
    from diffusers import HunyuanVideo15Pipeline
    from transformers import ByT5Tokenizer
    from transformers import Qwen2_5_VLTextConfig
    from transformers import Qwen2_5_VLTextModel
    from transformers import SiglipImageProcessorPil
    from transformers import SiglipVisionConfig
    from transformers import SiglipVisionModel
    from transformers import T5Config
    from transformers import T5EncoderModel

    if kind not in _KINDS:
        raise ValueError(f"tiny hunyuanvideo15: expected `kind` in {_KINDS}, got {kind!r}.")
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = qwen_tokenizer(), ByT5Tokenizer()
    text_encoder = Qwen2_5_VLTextModel(
        Qwen2_5_VLTextConfig(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
            rope_parameters={"mrope_section": [1, 1, 2], "rope_type": "default", "rope_theta": 1e6},
            bos_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )  # fmt: skip
    parts: dict[str, Any] = {
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": T5EncoderModel(t5_config(T5Config, tokenizer_2)),
        "tokenizer_2": tokenizer_2,
        "transformer": transformer(use_meanflow=use_meanflow),
        "vae": AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8,) * 5, layers_per_block=1),
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "guider": ClassifierFreeGuidance(guidance_scale=guidance_scale),
    }
    if kind == "text2video":
        pipe = HunyuanVideo15Pipeline(**parts)
    else:
        vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=28, patch_size=14)  # fmt: skip
        images = SiglipImageProcessorPil(size={"height": 28, "width": 28})
        pipe = HunyuanVideo15ImageToVideoPipeline(**parts, image_encoder=SiglipVisionModel(vision),
                                                  feature_extractor=images)  # fmt: skip
    pipe.tokenizer_max_length, pipe.tokenizer_2_max_length, pipe.vision_num_semantic_tokens = 48, 16, 4
    system = [{"role": "system", "content": pipe.system_message}, {"role": "user", "content": ""}]
    templated = tokenizer.apply_chat_template([system], tokenize=False, add_generation_prompt=True)[0]
    prefix = templated[: templated.index("<|im_start|>user\n") + len("<|im_start|>user\n")]
    pipe.prompt_template_encode_start_idx = len(tokenizer(prefix).input_ids)
    return finish(pipe)
