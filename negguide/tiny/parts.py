"""The parts tiny pipelines are built from: in-memory tokenizers, tiny text-encoder configs, a tiny VAE.

The tokenizers are built in memory (a byte-level CLIP BPE and a character-level T5 Unigram), so any
string tokenizes offline; a family module of ``negguide.tiny.families`` (and a third-party plugin's
builder) combines them with its own denoiser config.
"""

from __future__ import annotations

import string
from typing import Any

import torch

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


def _clip_vocab() -> dict[str, int]:
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {CLIP_BOS: 0, CLIP_EOS: 1}
    for ch in sorted(ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    return vocab


def _t5_vocab() -> list[tuple[str, float]]:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces += [("\u2581" + c, -3.0) for c in chars]
    pieces += [(c, -4.0) for c in chars]
    return pieces


def clip_tokenizer(model_max_length: int = 77) -> Any:
    """An in-memory CLIP tokenizer: every byte is a token, so any text tokenizes offline."""
    from tokenizers import Regex
    from tokenizers import Tokenizer
    from tokenizers import decoders
    from tokenizers import normalizers
    from tokenizers import pre_tokenizers
    from tokenizers import processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    vocab = _clip_vocab()
    tok = Tokenizer(BPE(vocab=vocab, merges=[], end_of_word_suffix="</w>", unk_token=CLIP_EOS))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.Sequence([decoders.BPEDecoder(suffix="</w>"), decoders.ByteLevel()])
    tok.post_processor = processors.RobertaProcessing(
        (CLIP_EOS, vocab[CLIP_EOS]), (CLIP_BOS, vocab[CLIP_BOS]), trim_offsets=False
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        pad_token=CLIP_EOS,
        unk_token=CLIP_EOS,
        model_max_length=model_max_length,
    )


def t5_tokenizer(model_max_length: int = 512) -> Any:
    """An in-memory T5-style Unigram tokenizer over printable characters (pad 0, eos 1, unk 2)."""
    from tokenizers import Tokenizer
    from tokenizers import decoders
    from tokenizers import pre_tokenizers
    from tokenizers import processors
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(Unigram(_t5_vocab(), unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", model_max_length=model_max_length
    )


def clip_config(tokenizer: Any, projection_dim: int = 32) -> Any:
    """A tiny ``CLIPTextConfig`` (2 layers, width 32) for ``tokenizer``."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=max(1000, len(tokenizer)),
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
        hidden_act="gelu",
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def t5_config(cls: Any, tokenizer: Any, d_model: int = 32) -> Any:
    """A tiny config of the T5-like class ``cls`` (``T5Config``, ``UMT5Config``; 2 layers, width ``d_model``)."""
    return cls(
        vocab_size=max(256, len(tokenizer)),
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def vae(latent_channels: int) -> Any:
    """A tiny ``AutoencoderKL`` (one block, stride 1) with ``latent_channels`` channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def finish(pipe: Any) -> Any:
    """``pipe`` with every model in eval mode and no progress bar: a tiny pipeline ready to call."""
    # models built from a config start in train() mode (T5 dropout would make every call random)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe
