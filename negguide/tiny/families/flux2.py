"""A tiny Flux.2 pipeline built offline: ``Flux2Pipeline`` (dev: a Mistral-3 text encoder and an in-memory byte-level
tokenizer with a Mistral-style chat template) or a Klein pipeline (``Flux2KleinPipeline``, its inpaint and KV-cache
siblings: a Qwen3 text encoder and an in-memory Qwen2 tokenizer), with a 1+1-block ``Flux2Transformer2DModel``."""

from __future__ import annotations

from typing import Any

import torch

from negguide.tiny.families.zimage import qwen_tokenizer
from negguide.tiny.parts import finish

#: keyword arguments of a quick call: 32x32 pixels give 16 image tokens (the tiny VAE downsamples 4x, the 2x2
#: patches 2x more; edit images must be at least 64x64: 64 reference tokens); the tiny text encoders have 3 layers,
#: so the prompt embeddings stack hidden states 1, 2 and 3 (the real models: 10, 20, 30 and 9, 18, 27); every byte
#: is a token and the chat templates add 24 (dev) and 25 (Klein), so the prompts fit in 64; ``guidance_scale`` 1
#: keeps Klein's CFG off
CALL: dict[str, Any] = {
    "height": 32,
    "width": 32,
    "max_sequence_length": 64,
    "text_encoder_out_layers": (1, 2, 3),
    "guidance_scale": 1.0,
    "output_type": "np",
}

#: a short system message for the tiny dev pipeline (the real one is ~200 bytes, one token each here)
SYSTEM_MESSAGE = "Describe the image."

#: Mistral's chat template, reduced to what ``Flux2Pipeline`` uses (a system and a user message, text parts only)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}{% else %}"
    "{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% endif %}{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{{ text }}[/INST]{% else %}{{ text }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)
_MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]

KINDS = ("dev", "klein", "klein_inpaint", "klein_kv")


def mistral_tokenizer(model_max_length: int = 512) -> Any:
    """An in-memory byte-level BPE tokenizer (no merges: every byte is a token) with Mistral's specials and a reduced
    chat template, so any text tokenizes offline (``Flux2Pipeline`` calls ``tokenizer.apply_chat_template``)."""
    from tokenizers import Tokenizer
    from tokenizers import decoders
    from tokenizers import pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(_MISTRAL_SPECIALS)}
    for ch in sorted(ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=_MISTRAL_SPECIALS[4:], model_max_length=model_max_length,
    )  # fmt: skip
    fast.chat_template = MISTRAL_TEMPLATE
    return fast


def flux2_vae() -> Any:
    """A tiny ``AutoencoderKLFlux2`` (three 4-channel blocks: 4x downsampling; one latent channel, 4 after the 2x2
    patches)."""
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(4,) * 3, layers_per_block=1, latent_channels=1, norm_num_groups=1, sample_size=32,
    )  # fmt: skip


def build(seed: int = 0, kind: str = "dev", is_distilled: bool = False) -> Any:
    """A tiny Flux.2 pipeline: ``kind`` ``"dev"`` (``Flux2Pipeline``, guidance-distilled: a guidance embedding),
    ``"klein"`` (``Flux2KleinPipeline``), ``"klein_inpaint"`` (``Flux2KleinInpaintPipeline``) or ``"klein_kv"``
    (``Flux2KleinKVPipeline``, KV-cache processors); ``is_distilled`` is the Klein pipelines' flag (no CFG)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers import Flux2KleinInpaintPipeline
    from diffusers import Flux2KleinKVPipeline
    from diffusers import Flux2KleinPipeline
    from diffusers import Flux2Pipeline
    from diffusers import Flux2Transformer2DModel

    if kind not in KINDS:
        raise ValueError(f"tiny flux2: expected `kind` in {list(KINDS)}, got {kind!r}.")
    torch.manual_seed(seed)
    dev = kind == "dev"
    text_encoder, tokenizer = _mistral() if dev else _qwen3()
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=3 * 32, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=dev,
    )  # fmt: skip
    parts = {"scheduler": FlowMatchEulerDiscreteScheduler(), "vae": flux2_vae(), "text_encoder": text_encoder,
             "tokenizer": tokenizer, "transformer": transformer}  # fmt: skip
    if dev:
        pipe = Flux2Pipeline(**parts)
        pipe.system_message = SYSTEM_MESSAGE
    else:
        classes = {"klein": Flux2KleinPipeline, "klein_inpaint": Flux2KleinInpaintPipeline,
                   "klein_kv": Flux2KleinKVPipeline}  # fmt: skip
        pipe = classes[kind](**parts, is_distilled=is_distilled)
    return finish(pipe)


def _mistral() -> tuple[Any, Any]:
    from transformers import Mistral3Config
    from transformers import Mistral3ForConditionalGeneration

    tokenizer = mistral_tokenizer()
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 3,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 128,
            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "model_type": "mistral"}  # fmt: skip
    vision = {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
              "head_dim": 8, "image_size": 16, "patch_size": 8, "model_type": "pixtral"}  # fmt: skip
    config = Mistral3Config(text_config=text, vision_config=vision, image_token_index=0, spatial_merge_size=1)
    return Mistral3ForConditionalGeneration(config), tokenizer


def _qwen3() -> tuple[Any, Any]:
    from transformers import Qwen3Config
    from transformers import Qwen3ForCausalLM

    tokenizer = qwen_tokenizer()
    encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
    )  # fmt: skip
    return encoder, tokenizer
