"""Tiny CogView4 pipelines (``CogView4Pipeline``, ``CogView4ControlPipeline``) built offline.

The text encoder is a random-weight ``GlmModel`` (2 layers of width 32) and the tokenizer an
in-memory byte-level BPE like GLM-4's: every byte is a token, ``add_special_tokens`` puts
``[gMASK] <sop>`` in front, ``<|endoftext|>`` pads, on the left (the pipeline itself left-pads every
prompt to a multiple of 16 tokens). The VAE does not downsample, so a 16x16 image is 8x8 = 64
image tokens (patch 2).
"""

from __future__ import annotations

from typing import Any

import torch

from negguide.tiny.parts import finish
from negguide.tiny.parts import vae

#: keyword arguments of a quick call (the pipeline's own CFG is off: ``guidance_scale`` 1)
CALL: dict[str, Any] = {
    "height": 16,
    "width": 16,
    "max_sequence_length": 64,
    "guidance_scale": 1.0,
    "output_type": "np",
}

#: GLM-4's special tokens the tiny tokenizer knows: the pad/end token and the two-token prefix
SPECIAL_TOKENS = ("<|endoftext|>", "[gMASK]", "<sop>")


def glm_tokenizer() -> Any:
    """An in-memory byte-level BPE tokenizer shaped like GLM-4's (``[gMASK] <sop>`` prefix, left padding)."""
    from tokenizers import Tokenizer
    from tokenizers import decoders
    from tokenizers import pre_tokenizers
    from tokenizers import processors
    from tokenizers.models import BPE
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in [*sorted(ByteLevel.alphabet()), *SPECIAL_TOKENS]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single="[gMASK] <sop> $A",
        pair="[gMASK] <sop> $A $B",
        special_tokens=[("[gMASK]", vocab["[gMASK]"]), ("<sop>", vocab["<sop>"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|endoftext|>", padding_side="left"
    )


def build(seed: int = 0, control: bool = False) -> Any:
    """A tiny CogView4 pipeline (2 joint blocks, 2 heads of 8): ``CogView4Pipeline``, or with ``control``
    ``CogView4ControlPipeline`` (its transformer takes the control image's latents as 4 more channels)."""
    from diffusers import CogView4ControlPipeline
    from diffusers import CogView4Pipeline
    from diffusers import CogView4Transformer2DModel
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import GlmConfig
    from transformers import GlmModel

    torch.manual_seed(seed)
    tokenizer = glm_tokenizer()
    text_encoder = GlmModel(
        GlmConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    transformer = CogView4Transformer2DModel(
        patch_size=2,
        in_channels=8 if control else 4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        text_embed_dim=32,
        time_embed_dim=16,
        condition_dim=8,
        sample_size=8,
        rope_axes_dim=(8, 8),
    )
    # CogView4's scheduler: the shift follows the image's token count, linearly
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_shift=0.25, max_shift=0.75, base_image_seq_len=256, use_dynamic_shifting=True, time_shift_type="linear"
    )
    autoencoder = vae(4)
    if control:
        # the Control pipeline samples the control image's posterior without a generator: make its spread the
        # smallest AutoencoderKL allows (log-variance -30, std 3e-7), so a control image encodes alike every call
        conv = autoencoder.encoder.conv_out
        with torch.no_grad():
            conv.weight[conv.out_channels // 2 :] = 0.0
            conv.bias[conv.out_channels // 2 :] = -30.0
    cls = CogView4ControlPipeline if control else CogView4Pipeline
    pipe = cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=autoencoder, transformer=transformer,
               scheduler=scheduler)  # fmt: skip
    return finish(pipe)
