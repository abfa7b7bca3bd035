"""A tiny ``HiDreamImagePipeline`` built offline: two tiny CLIPs (pooled vectors), a tiny T5, a 3-layer Llama with
an in-memory byte-level Llama-3-style tokenizer, and a HiDream transformer with 2 double- and 2 single-stream blocks.

The T5 (32 channels) and the Llama (24 channels) have different widths on purpose, so nothing can confuse the two
text streams; each block reads its own Llama layer (``llama_layers``).
"""

from __future__ import annotations

from typing import Any

import torch

from negguide.tiny.parts import clip_config
from negguide.tiny.parts import clip_tokenizer
from negguide.tiny.parts import finish
from negguide.tiny.parts import t5_config
from negguide.tiny.parts import t5_tokenizer
from negguide.tiny.parts import vae

#: keyword arguments of a quick call: 8x8 pixels are 16 image tokens (the tiny pipeline's whole area, so the
#: pipeline keeps the size); CFG off, as HiDream-I1 Dev and Fast run (Full: ``guidance_scale=5.0``)
CALL: dict[str, Any] = {
    "height": 8,
    "width": 8,
    "max_sequence_length": 32,
    "guidance_scale": 0.0,
    "output_type": "np",
}

LLAMA_BOS, LLAMA_EOS = "<|begin_of_text|>", "<|end_of_text|>"


def llama_tokenizer(model_max_length: int = 131072) -> Any:
    """An in-memory byte-level BPE tokenizer in Llama 3's manner (no merges: every byte is a token; the
    beginning-of-text token first, no end token), so any text tokenizes offline."""
    from tokenizers import Tokenizer
    from tokenizers import decoders
    from tokenizers import pre_tokenizers
    from tokenizers import processors
    from tokenizers.models import BPE
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    vocab[LLAMA_BOS] = len(vocab)
    vocab[LLAMA_EOS] = len(vocab)
    tok = Tokenizer(BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{LLAMA_BOS} $A", pair=f"{LLAMA_BOS} $A {LLAMA_BOS} $B", special_tokens=[(LLAMA_BOS, vocab[LLAMA_BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=LLAMA_BOS, eos_token=LLAMA_EOS, model_max_length=model_max_length
    )


def build(seed: int = 0, moe: bool = False) -> Any:
    """A tiny ``HiDreamImagePipeline``; ``moe`` gives every block's image feed-forward HiDream's mixture of
    experts (2 routed experts, 1 active; its routing leaves the graph, so ``torch.compile`` cannot take it whole)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers import HiDreamImagePipeline
    from diffusers import HiDreamImageTransformer2DModel
    from transformers import CLIPTextModelWithProjection
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM
    from transformers import T5Config
    from transformers import T5EncoderModel

    torch.manual_seed(seed)
    tokenizer, tokenizer_2, tokenizer_3, tokenizer_4 = (
        clip_tokenizer(),
        clip_tokenizer(),
        t5_tokenizer(),
        llama_tokenizer(),
    )
    text_encoder_4 = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer_4), hidden_size=24, intermediate_size=37, num_hidden_layers=3,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
            bos_token_id=tokenizer_4.bos_token_id, eos_token_id=tokenizer_4.eos_token_id,
        )
    )  # fmt: skip
    transformer = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        caption_channels=[32, 24], text_emb_dim=64, num_routed_experts=2 if moe else 0, num_activated_experts=1,
        axes_dims_rope=(8, 4, 4), max_resolution=(8, 8), llama_layers=[2, 0, 1, 2],
    )  # fmt: skip
    pipe = HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae(4),
        text_encoder=CLIPTextModelWithProjection(clip_config(tokenizer)),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(clip_config(tokenizer_2)),
        tokenizer_2=tokenizer_2,
        text_encoder_3=T5EncoderModel(t5_config(T5Config, tokenizer_3)),
        tokenizer_3=tokenizer_3,
        text_encoder_4=text_encoder_4,
        tokenizer_4=tokenizer_4,
        transformer=transformer,
    )
    # the pipeline rescales every call to the area of default_sample_size (128 latents a side): 8 keeps it tiny
    pipe.default_sample_size = 8
    return finish(pipe)
