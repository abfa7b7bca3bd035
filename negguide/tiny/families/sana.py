"""A tiny ``SanaPipeline``, ``SanaSprintPipeline`` or ``SanaSprintImg2ImgPipeline`` built offline: a 2-layer Gemma-2
text encoder with an in-memory Gemma-style tokenizer (``<bos>`` first, right padding), a 2-block Sana transformer
and a tiny DC-AE."""

from __future__ import annotations

import string
from typing import Any

import torch

from negguide.tiny.parts import finish

#: a short complex human instruction: the pipelines' own (their default, ~1000 tokens here) costs 10x the call
SHORT_INSTRUCTION: list[str] = ["Given a user prompt, describe it in vivid detail:", "User Prompt: "]

#: keyword arguments of a quick call: 32x32 images (the pipelines want multiples of 32; 64 image tokens), no
#: resolution binning, no caption cleaning, a short instruction prefix, ``SanaPipeline``'s CFG off (Sana-Sprint
#: reads ``guidance_scale`` into its guidance embedding instead)
CALL: dict[str, Any] = {
    "height": 32,
    "width": 32,
    "max_sequence_length": 32,
    "complex_human_instruction": SHORT_INSTRUCTION,
    "guidance_scale": 1.0,
    "use_resolution_binning": False,
    "clean_caption": False,
    "output_type": "np",
}

#: the tiny Sana transformer's config (caption_channels = the tiny Gemma's width); Sprint adds its own keys
SANA_TRANSFORMER: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "num_layers": 2,
    "num_cross_attention_heads": 2,
    "cross_attention_head_dim": 8,
    "cross_attention_dim": 16,
    "caption_channels": 32,
    "sample_size": 16,
    "patch_size": 2,
}


def gemma_tokenizer(model_max_length: int = 4096) -> Any:
    """An in-memory Gemma-style Unigram tokenizer over printable characters (``<pad>`` 0, ``<eos>`` 1, ``<bos>``
    2 prepended to every text, ``<unk>`` 3), so any text tokenizes offline."""
    from tokenizers import Tokenizer
    from tokenizers import decoders
    from tokenizers import pre_tokenizers
    from tokenizers import processors
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("<eos>", 0.0), ("<bos>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    tok = Tokenizer(Unigram(pieces, unk_id=3))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>",
        model_max_length=model_max_length,
    )  # fmt: skip


def build(seed: int = 0, kind: str = "sana") -> Any:
    """A tiny Sana pipeline: ``kind`` ``"sana"`` (``SanaPipeline``, flow-matching Euler), ``"sprint"``
    (``SanaSprintPipeline``: guidance embedding, q/k RMS norms across heads, ``SCMScheduler``) or
    ``"sprint_img2img"`` (``SanaSprintImg2ImgPipeline``, the same parts)."""
    from diffusers import AutoencoderDC
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers import SanaPipeline
    from diffusers import SanaSprintImg2ImgPipeline
    from diffusers import SanaSprintPipeline
    from diffusers import SanaTransformer2DModel
    from diffusers import SCMScheduler
    from transformers import Gemma2Config
    from transformers import Gemma2Model

    classes = {"sana": SanaPipeline, "sprint": SanaSprintPipeline, "sprint_img2img": SanaSprintImg2ImgPipeline}
    if kind not in classes:
        raise ValueError(f"tiny sana: expected `kind` in {sorted(classes)}, got {kind!r}.")
    torch.manual_seed(seed)
    tokenizer = gemma_tokenizer()
    text_encoder = Gemma2Model(
        Gemma2Config(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=2048,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
    )  # fmt: skip
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types="ResBlock",
        decoder_block_types="ResBlock", encoder_block_out_channels=(4, 8), decoder_block_out_channels=(4, 8),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), ()),
        decoder_qkv_multiscales=((), ()), scaling_factor=0.41,
    )  # fmt: skip
    sprint = kind != "sana"
    extra = {"guidance_embeds": True, "qk_norm": "rms_norm_across_heads"} if sprint else {}
    transformer = SanaTransformer2DModel(**SANA_TRANSFORMER, **extra)
    scheduler = SCMScheduler() if sprint else FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = classes[kind](tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                         scheduler=scheduler)  # fmt: skip
    return finish(pipe)
