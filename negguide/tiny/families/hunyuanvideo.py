"""Tiny HunyuanVideo pipelines (text-to-video, image-to-video, SkyReels image-to-video) built offline.

The text encoders are a random-weight 3-layer Llama (LLaVA-Llama for image-to-video, with a 2-layer
CLIP vision tower) and a 2-layer CLIP; the Llama tokenizer is an in-memory byte-level BPE with
Llama-3's header tokens, so every byte of the pipelines' prompt templates is one token. The
pipelines drop the template's first ``crop_start`` tokens (95 for text-to-video with Llama-3's own
tokenizer, 103 for image-to-video): with this tokenizer those counts differ, so ``CALL`` passes the
pipelines' own templates with the tiny tokenizer's counts (``prompt_template``), and the image-to-video
template places its 4 image tokens (a 28x28 image, 14-pixel patches) where this tokenizer puts ``<image>``.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from negguide.tiny.parts import clip_config
from negguide.tiny.parts import clip_tokenizer
from negguide.tiny.parts import finish

#: Llama-3's special tokens the templates use; ``<image>`` marks where LLaVA puts the image tokens, and
#: ``assistant`` is one token as in Llama-3 (the image-to-video pipeline drops the 4 tokens of
#: ``<|eot_id|><|start_header_id|>assistant<|end_header_id|>`` from the prompt's tokens)
SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<image>",
    "assistant",
)
#: image tokens of the tiny LLaVA (a 28x28 image in 14-pixel patches, the class token dropped)
IMAGE_TOKENS = 4

_SPECIAL = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


def _num_tokens(text: str) -> int:
    """Tokens of ``text`` with ``llama_tokenizer`` (the begin-of-text token included): one per byte, one per special."""
    return 1 + sum(len(part.encode()) for part in _SPECIAL.split(text)) + len(_SPECIAL.findall(text))


def _templates() -> tuple[dict[str, Any], dict[str, Any]]:
    """The pipelines' own prompt templates with this tokenizer's token counts."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE as T2V
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_image2video import DEFAULT_PROMPT_TEMPLATE as I2V

    def before_prompt(template: str) -> str:
        return template[: template.index("{}")]

    t2v = {"template": T2V["template"], "crop_start": _num_tokens(before_prompt(T2V["template"]))}
    image_start = _num_tokens(I2V["template"][: I2V["template"].index("<image>")])
    i2v = {
        "template": I2V["template"],
        "crop_start": _num_tokens(before_prompt(I2V["template"])),
        "image_emb_start": image_start,
        "image_emb_end": image_start + IMAGE_TOKENS,
        "image_emb_len": IMAGE_TOKENS,
    }
    return t2v, i2v


T2V_TEMPLATE, I2V_TEMPLATE = _templates()

#: keyword arguments of a quick text-to-video call (32x32, 5 frames: 2x4x4 = 32 video tokens; the guidance
#: embedding at 6.0, the pipeline's own CFG off: ``true_cfg_scale`` 1)
CALL: dict[str, Any] = {
    "height": 32,
    "width": 32,
    "num_frames": 5,
    "max_sequence_length": 32,
    "prompt_template": T2V_TEMPLATE,
    "true_cfg_scale": 1.0,
    "output_type": "np",
}
#: keyword arguments of a quick image-to-video call (pass ``image=`` too)
I2V_CALL: dict[str, Any] = {**CALL, "prompt_template": I2V_TEMPLATE}

_KINDS = ("text2video", "image2video", "image2video_token_replace", "skyreels")


def llama_tokenizer() -> Any:
    """An in-memory byte-level BPE tokenizer with Llama-3's header tokens (no merges: every byte is a token); it
    adds ``<|begin_of_text|>`` in front and pads on the right with ``<|end_of_text|>``."""
    from tokenizers import Tokenizer
    from tokenizers import decoders
    from tokenizers import pre_tokenizers
    from tokenizers import processors
    from tokenizers.models import BPE
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in [*SPECIAL_TOKENS, *sorted(ByteLevel.alphabet())]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    bos = SPECIAL_TOKENS[0]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token="<|end_of_text|>", pad_token="<|end_of_text|>",
        model_max_length=4096,
    )  # fmt: skip


def llama_config(tokenizer: Any) -> Any:
    """A tiny ``LlamaConfig`` (3 layers of width 16: the pipelines read the third-last hidden state)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip


def llava(tokenizer: Any) -> Any:
    """A tiny ``LlavaForConditionalGeneration``: the tiny Llama and a 2-layer CLIP vision tower (28x28 images)."""
    from transformers import CLIPVisionConfig
    from transformers import LlavaConfig
    from transformers import LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=16)  # fmt: skip
    config = LlavaConfig(
        vision_config=vision, text_config=llama_config(tokenizer), image_token_index=tokenizer.convert_tokens_to_ids(
            "<image>"), vision_feature_layer=-2, vision_feature_select_strategy="default",
    )  # fmt: skip
    config.pad_token_id = tokenizer.pad_token_id  # the pipeline reads it from the top-level config
    return LlavaForConditionalGeneration(config)


def transformer(in_channels: int = 4, image_condition_type: str | None = None) -> Any:
    """A tiny ``HunyuanVideoTransformer3DModel``: 1 double- and 1 single-stream block, 2 heads of 8, 1 refiner layer."""
    from diffusers import HunyuanVideoTransformer3DModel

    return HunyuanVideoTransformer3DModel(
        in_channels=in_channels, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=32, rope_axes_dim=(2, 2, 4), guidance_embeds=image_condition_type is None,
        image_condition_type=image_condition_type,
    )  # fmt: skip


def build(seed: int = 0, kind: str = "text2video") -> Any:
    """A tiny HunyuanVideo pipeline; seeded, the same weights on every call.

    Args:
        seed: the seed of the random weights.
        kind: ``"text2video"`` (``HunyuanVideoPipeline``), ``"image2video"`` (``HunyuanVideoImageToVideoPipeline``,
            the image latents concatenated to the channels), ``"image2video_token_replace"`` (the same pipeline with
            the first-frame token-replace transformer) or ``"skyreels"`` (``HunyuanSkyreelsImageToVideoPipeline``).

    Returns:
        The pipeline, on the CPU, in float32.
    """
    from diffusers import AutoencoderKLHunyuanVideo
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers import HunyuanSkyreelsImageToVideoPipeline
    from diffusers import HunyuanVideoImageToVideoPipeline
    from diffusers import HunyuanVideoPipeline
    from transformers import CLIPImageProcessorPil
    from transformers import CLIPTextModel
    from transformers import LlamaModel

    if kind not in _KINDS:
        raise ValueError(f"tiny hunyuanvideo: expected `kind` in {_KINDS}, got {kind!r}.")
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = llama_tokenizer(), clip_tokenizer()
    vae = AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(4, 4, 4, 4), layers_per_block=1,
                                    norm_num_groups=2, mid_block_add_attention=False)  # fmt: skip
    parts: dict[str, Any] = {
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "text_encoder_2": CLIPTextModel(clip_config(tokenizer_2)),
        "vae": vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(),
    }
    if kind == "text2video":
        pipe = HunyuanVideoPipeline(text_encoder=LlamaModel(llama_config(tokenizer)), transformer=transformer(),
                                    **parts)  # fmt: skip
    elif kind == "skyreels":  # the latents and the image latents, concatenated on the channels
        pipe = HunyuanSkyreelsImageToVideoPipeline(text_encoder=LlamaModel(llama_config(tokenizer)),
                                                   transformer=transformer(in_channels=8), **parts)  # fmt: skip
    else:
        condition = "latent_concat" if kind == "image2video" else "token_replace"
        images = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        pipe = HunyuanVideoImageToVideoPipeline(
            text_encoder=llava(tokenizer), image_processor=images, **parts,
            transformer=transformer(in_channels=9 if condition == "latent_concat" else 4,
                                    image_condition_type=condition),
        )  # fmt: skip
    return finish(pipe)
