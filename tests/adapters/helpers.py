"""Small helpers shared by the adapter tests."""

from __future__ import annotations

import numpy as np


def close(a, b, atol=1e-5):
    np.testing.assert_allclose(a, b, atol=atol, rtol=0)


def differs(a, b, by=1e-4):
    return float(np.abs(a - b).max()) > by


def real_tokens(pipe, text):
    return len(pipe.tokenizer(text).input_ids)  # the end token included, as T5 encodes it


class ContextSpy:
    """Records the text length and the bias shape every call of block 0's ``attn2`` receives."""

    def __init__(self, transformer):
        self.lengths, self.biases = [], []
        attn = transformer.transformer_blocks[0].attn2

        def hook(module, args, kwargs):
            self.lengths.append(kwargs["encoder_hidden_states"].shape[1])
            self.biases.append(tuple(kwargs["attention_mask"].shape))

        self.handle = attn.register_forward_pre_hook(hook, with_kwargs=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def guided_one_negative(pipe, adapter_cls, attn, p, n, pos_mask, neg_mask, rows=2, **params):
    """``attn``'s guided processor under VSF with ``params`` in a forward of ``rows`` rows, all guided: ``p`` prompt
    tokens (padding mask ``pos_mask``), then one negative of ``n`` tokens (``neg_mask``), built as the core does."""
    from negguide.adapter import TextLayout
    from negguide.installation import Forward
    from negguide.installation import Installation
    from negguide.installation import guided_processor
    from negguide.negatives import NegativeSpec
    from negguide.registry import get_method

    method_cls = get_method("vsf")
    installation = Installation(pipe, adapter_cls(pipe), method_cls(method_cls.make_config(params)),
                                [NegativeSpec("x")])  # fmt: skip
    installation.forward = Forward(slice(0, rows), TextLayout(p, p + n), ((p, p + n),), (neg_mask,), (1.0,), pos_mask,
                                   None)  # fmt: skip
    return guided_processor(installation, attn.processor, 0, 2)
