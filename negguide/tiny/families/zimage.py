"""A tiny ``ZImagePipeline`` (or its img2img / inpaint / ControlNet siblings) built offline: a 2-layer Qwen3 text
encoder with an in-memory byte-level ``Qwen2TokenizerFast`` (Qwen's chat template), a 2-layer Z-Image transformer."""

from __future__ import annotations

from typing import Any

import torch

from negguide.tiny.parts import finish
from negguide.tiny.parts import vae

#: keyword arguments of a quick call: 12x12 gives 36 image tokens (padded to 64 by the model, pad tokens included);
#: every byte is a token and the chat template adds 17, so the prompts fit in 64 (CFG off: Z-Image Turbo's use)
CALL: dict[str, Any] = {
    "height": 12,
    "width": 12,
    "max_sequence_length": 64,
    "guidance_scale": 0.0,
    "output_type": "np",
}

#: Qwen3's chat template, reduced to what ``ZImagePipeline._encode_prompt`` uses
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def qwen_tokenizer(model_max_length: int = 512) -> Any:
    """An in-memory byte-level BPE ``Qwen2TokenizerFast`` (no merges: every byte is a token) with Qwen's specials
    and chat template, so any text tokenizes offline."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2TokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Qwen2TokenizerFast(
        vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        model_max_length=model_max_length,
    )  # fmt: skip
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build(seed: int = 0, kind: str = "text2image") -> Any:
    """A tiny Z-Image pipeline: ``kind`` ``"text2image"`` (``ZImagePipeline``), ``"img2img"``, ``"inpaint"`` or
    ``"controlnet"`` (a one-block ``ZImageControlNetModel`` adding to layer 0)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers import ZImageControlNetModel
    from diffusers import ZImageControlNetPipeline
    from diffusers import ZImageImg2ImgPipeline
    from diffusers import ZImageInpaintPipeline
    from diffusers import ZImagePipeline
    from diffusers import ZImageTransformer2DModel
    from transformers import Qwen3Config
    from transformers import Qwen3Model

    classes = {"text2image": ZImagePipeline, "img2img": ZImageImg2ImgPipeline, "inpaint": ZImageInpaintPipeline,
               "controlnet": ZImageControlNetPipeline}  # fmt: skip
    if kind not in classes:
        raise ValueError(f"tiny zimage: expected `kind` in {sorted(classes)}, got {kind!r}.")
    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer()
    text_encoder = Qwen3Model(
        Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
    )  # fmt: skip
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[4, 6, 6], axes_lens=[256, 32, 32],
    )  # fmt: skip
    with torch.no_grad():  # learnt pad tokens (zeros at init): random, so the tests see where padding goes
        transformer.cap_pad_token.normal_()
        transformer.x_pad_token.normal_()
    parts: dict[str, Any] = {}
    if kind == "controlnet":
        parts["controlnet"] = ZImageControlNetModel(
            control_layers_places=[0], control_in_dim=4, dim=32, n_refiner_layers=1, n_heads=2, n_kv_heads=2
        )
    pipe = classes[kind](
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae(4),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        **parts,
    )
    return finish(pipe)
