"""The HiDream-I1 adapter on a tiny offline ``HiDreamImagePipeline``.

Numbers are checked against the unpatched pipeline (unguided runs, its own CFG), against an
independent float64 re-implementation of one guided attention call with the paper's mask table
(explicit keys, the model's rotary positions), and against the unpatched transformer run with the
negative as its only text (every block sees the negative's tokens as it sees a prompt's).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import negguide
from negguide import testing
from negguide import tiny
from negguide.adapter import EncodeCall
from negguide.adapter import TextLayout
from negguide.adapters.hidream import HiDreamAdapter
from negguide.adapters.hidream import _pieces
from negguide.errors import NegativePromptError
from negguide.errors import NoAdapterError
from negguide.installation import Forward
from negguide.installation import Installation
from negguide.installation import guided_processor
from negguide.negatives import NegativeSpec
from negguide.registry import adapter_for
from negguide.registry import get_method
from tests.adapters.helpers import differs

CALL = {"num_inference_steps": 2, **tiny.CALL_KWARGS["hidream"]}
NEG = "dark blurry rain"


@pytest.fixture(scope="module")
def pipe():
    return tiny.hidream()


def run(pipe, prompt="a red cat on a mat", seed=0, **kwargs):
    gen = (
        [torch.Generator().manual_seed(s) for s in seed]
        if isinstance(seed, list)
        else torch.Generator().manual_seed(seed)
    )
    return pipe(prompt=prompt, generator=gen, **{**CALL, **kwargs}).images


def close(a, b, atol=2e-5):
    np.testing.assert_allclose(a, b, atol=atol, rtol=0)


def encode_call(pipe, msl=32):
    return EncodeCall({"max_sequence_length": msl, "dtype": None}, None, 1, 1, torch.device("cpu"), torch.float32,
                      pipe.encode_prompt)  # fmt: skip


def real_tokens(tokenizer, text):
    return len(tokenizer(text).input_ids)


# ---------------------------------------------------------------------------- facts and encoding


def test_adapter_resolves(pipe):
    assert adapter_for(pipe) is HiDreamAdapter
    modules = HiDreamAdapter(pipe).attention_modules(pipe.transformer)
    assert modules == {
        "double_stream_blocks.0.block.attn1.processor": 0,
        "double_stream_blocks.1.block.attn1.processor": 1,
        "single_stream_blocks.0.block.attn1.processor": 2,
        "single_stream_blocks.1.block.attn1.processor": 3,
    }


def test_negative_is_encoded_without_padding_in_both_streams(pipe):
    """T5 and Llama at exactly their real token counts, equal to the real tokens of the pipeline's padded encoding."""
    with torch.no_grad():
        cond = HiDreamAdapter(pipe).encode_negative(NEG, encode_call(pipe), padded=False)
    n_t5, n_llama = real_tokens(pipe.tokenizer_3, NEG), real_tokens(pipe.tokenizer_4, NEG)
    layers = pipe.text_encoder_4.config.num_hidden_layers
    assert cond.embeds.shape == (1, n_t5, 32) and cond.mask is None
    assert cond.extras["llama3"].shape == (1, layers, n_llama, 24)
    assert cond.extras["llama3_mask"].all() and cond.extras["llama3_mask"].shape == (1, n_llama)
    with torch.no_grad():
        t5 = pipe._get_t5_prompt_embeds(prompt=[NEG], max_sequence_length=32)
        llama = pipe._get_llama3_prompt_embeds(prompt=[NEG], max_sequence_length=32)
    assert n_t5 < 32 and n_llama < 32  # the padded encodings do have padding
    torch.testing.assert_close(cond.embeds, t5[:, :n_t5], atol=1e-5, rtol=0)  # T5 masks its padding
    torch.testing.assert_close(cond.extras["llama3"], llama[:, :, :n_llama].movedim(1, 0), atol=1e-5, rtol=0)


def test_padded_negative_is_the_pipelines_own(pipe):
    with torch.no_grad():
        cond = HiDreamAdapter(pipe).encode_negative(NEG, encode_call(pipe), padded=True)
        t5, _, llama, _, pooled, _ = pipe.encode_prompt(NEG, do_classifier_free_guidance=False, max_sequence_length=32)
    assert torch.equal(cond.embeds, t5) and torch.equal(cond.extras["pooled"], pooled)
    assert torch.equal(cond.extras["llama3"], llama.movedim(1, 0))


def test_negative_prompt_embeds_format(pipe):
    adapter, call = HiDreamAdapter(pipe), encode_call(pipe)
    t5, llama, pooled = torch.randn(2, 5, 32), torch.randn(3, 2, 4, 24), torch.randn(2, 64)
    cond = adapter.negative_from_embeds({"prompt_embeds_t5": t5, "prompt_embeds_llama3": llama}, call, False)
    assert cond.embeds is t5 and torch.equal(cond.extras["llama3"], llama.movedim(1, 0))
    full = {"prompt_embeds_t5": t5, "prompt_embeds_llama3": llama, "pooled_prompt_embeds": pooled}
    assert adapter.negative_from_embeds(full, call, True).extras["pooled"] is pooled
    with pytest.raises(NegativePromptError, match="pooled_prompt_embeds"):  # CFG needs the pooled vector
        adapter.negative_from_embeds({"prompt_embeds_t5": t5, "prompt_embeds_llama3": llama}, call, True)
    with pytest.raises(NegativePromptError, match="prompt_embeds_llama3"):  # one stream alone is no prompt
        adapter.negative_from_embeds(t5, call, False)


def test_join_refuses_a_single_tensor(pipe):
    with pytest.raises(NoAdapterError, match="join_negatives"):
        HiDreamAdapter(pipe).join({}, torch.zeros(1, 2, 32), None)


def test_pieces_lay_out_the_text_stream():
    """Model order [T5 P N1 N2 | Llama-last P N1 N2 | Llama-of-block P N1 N2] -> core order [P | N1 | N2]."""
    pieces = _pieces(3, 2, [(2, 1), (1, 2)])
    model = torch.arange(16)
    core = torch.cat([model[m : m + n] for m, _, n in pieces])
    assert core.tolist() == [0, 1, 2, 6, 7, 11, 12, 3, 4, 8, 13, 5, 9, 10, 14, 15]
    back = torch.cat([core[c : c + n] for _, c, n in sorted(pieces)])
    assert torch.equal(back, model)


# ---------------------------------------------------------------------------- one guided call, float64


def _rms(x, norm):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def _rotate(x, ids, axes, theta=10000):
    """The rotary embedding from first principles: pairs of channels turned by ``position * theta^(-2i/d)`` per
    axis (axes in order over the first ``sum(axes)`` channels of each head)."""
    angles = torch.cat(
        [ids[:, a, None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d) for a, d in enumerate(axes)],
        dim=-1,
    )  # (L, pairs)
    cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]
    rot, rest = x[..., : 2 * angles.shape[-1]], x[..., 2 * angles.shape[-1] :]
    x0, x1 = rot[..., 0::2], rot[..., 1::2]
    turned = torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1).flatten(-2)
    return torch.cat([turned, rest], dim=-1)


def reference(attn, img, text, img_mask, ids, axes, groups, neg_masks, alpha, beta):
    """Float64 VSF over ``[I, text in the model's order]`` with explicit keys ``[I, text, N_1(1), N_2(1)]`` and the
    paper's mask table (``groups``: the model positions of P, N_1, N_2 within the text)."""

    def lin(layer, x):
        return x @ layer.weight.T + layer.bias

    def heads(x):
        return x.unflatten(-1, (attn.heads, -1))

    q, k, v = (
        _rms(lin(attn.to_q, img), attn.q_rms_norm),
        _rms(lin(attn.to_k, img), attn.k_rms_norm),
        lin(attn.to_v, img),
    )
    if img_mask is not None:  # HiDream zeroes the keys of padded image tokens (single blocks: ones on the text)
        k = k * img_mask[:, :, None]
    if text is not None:
        q = torch.cat([q, _rms(lin(attn.to_q_t, text), attn.q_rms_norm_t)], dim=1)
        k = torch.cat([k, _rms(lin(attn.to_k_t, text), attn.k_rms_norm_t)], dim=1)
        v = torch.cat([v, lin(attn.to_v_t, text)], dim=1)
    q, k, v = heads(q), heads(k), heads(v)
    q, k = _rotate(q, ids, axes), _rotate(k, ids, axes)
    n_img = q.shape[1] - sum(map(len, groups))
    pos, negs = [n_img + i for i in groups[0]], [[n_img + i for i in g] for g in groups[1:]]
    length = q.shape[1]
    flips = [list(range(length + sum(map(len, negs[:i])), length + sum(map(len, negs[: i + 1])))) for i in range(2)]
    keys = torch.cat([k, *(k[:, g] for g in negs)], dim=1)
    values = torch.cat([v, *(-alpha * v[:, g] for g in negs)], dim=1)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, keys) / math.sqrt(q.shape[-1])
    bias = torch.zeros(length, keys.shape[1], dtype=torch.float64)
    image = list(range(n_img))
    for g, f in zip(negs, flips):
        bias[np.ix_(image, g)], bias[np.ix_(image, f)] = -math.inf, -beta  # I sees I, P and N(1) with -beta
        bias[np.ix_(pos, g)], bias[np.ix_(pos, f)] = -math.inf, -math.inf  # P sees I, P
        bias[np.ix_(g, pos)] = -math.inf  # N sees I and itself
        for other in negs:
            if other is not g:
                bias[np.ix_(g, other)] = -math.inf
        for f2 in flips:
            bias[np.ix_(g, f2)] = -math.inf
    logits = logits + bias
    pad = torch.zeros(q.shape[0], keys.shape[1], dtype=torch.bool)
    for g, f, m in zip(negs, flips, neg_masks):
        if m is not None:
            pad[:, g], pad[:, f] = ~m, ~m
    logits = logits.masked_fill(pad[:, None, None, :], -math.inf)
    out = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), values).flatten(2, 3)
    if text is None:
        return attn.to_out(out)
    return attn.to_out(out[:, :n_img]), attn.to_out_t(out[:, n_img:])


@pytest.mark.parametrize("kind", ["double", "single"])
@pytest.mark.parametrize("path", ["dense", "split"])
@pytest.mark.parametrize("variant", ["plain", "padded", "half-rope"])
def test_processor_matches_float64_reference(pipe, kind, path, variant):
    """One guided call with two negatives (T5 and Llama parts interleaved with the prompt's in the model's order)
    equals the mask-table reference; image positions rotated, text tokens at position zero (as the model's)."""
    from diffusers.models.transformers.transformer_hidream_image import HiDreamImageEmbedND

    blocks = pipe.transformer.double_stream_blocks if kind == "double" else pipe.transformer.single_stream_blocks
    attn = copy.deepcopy(blocks[0].block.attn1).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in attn.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    batch, n_img, dim = 2, 6, attn.query_dim
    n_t5, n_llama, sizes = 3, 2, [(2, 1), (1, 2)]  # T5 / Llama tokens of the prompt and of each negative
    # the model's order: T5 [P 0-2, N1 3-4, N2 5], Llama-last [P 6-7, N1 8, N2 9-10], Llama-of-block [P 11-12,
    # N1 13, N2 14-15]
    groups = [[0, 1, 2, 6, 7, 11, 12], [3, 4, 8, 13], [5, 9, 10, 14, 15]]
    n_text = 16
    axes = (8, 4, 4) if variant != "half-rope" else (4, 2, 2)
    ids = torch.zeros(n_img + n_text, 3, dtype=torch.float64)
    ids[:n_img, 1:] = torch.randint(0, 4, (n_img, 2), generator=gen).double()
    rotary = HiDreamImageEmbedND(theta=10000, axes_dim=list(axes))(ids[None].expand(batch, -1, -1))
    img = torch.randn(batch, n_img, dim, generator=gen, dtype=torch.float64)
    text = torch.randn(batch, n_text, dim, generator=gen, dtype=torch.float64)
    img_mask, neg_masks = None, (None, None)
    if variant == "padded":  # padded image tokens (non-square sizes) and a padded second negative in row 1
        img_mask = torch.tensor([[1.0] * n_img, [1.0] * (n_img - 2) + [0.0] * 2], dtype=torch.float64)
        neg_masks = (None, torch.tensor([[True] * 5, [True, True, False, True, False]]))
    method_cls = get_method("vsf")
    method = method_cls(method_cls.make_config({"scale": 2.5, "bias": 0.25, "attention": path}))
    installation = Installation(pipe, HiDreamAdapter(pipe), method, [NegativeSpec("x"), NegativeSpec("y")])
    spans = ((7, 11), (11, 16))
    layout = TextLayout(7, n_text, spans, _pieces(n_t5, n_llama, sizes))
    installation.forward = Forward(slice(0, batch), layout, spans, neg_masks, (1.0, 1.0), None, None)
    proc = guided_processor(installation, attn.processor, 0, 4)
    tol = {"atol": 2e-5, "rtol": 0}  # HiDream's rotary embedding runs in float32
    with torch.no_grad():
        if kind == "double":
            got = proc(attn, img, img_mask, text, rotary)
            want = reference(attn, img, text, img_mask, ids, axes, groups, neg_masks, 2.5, 0.25)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, **tol)
        else:
            seq = torch.cat([img, text], dim=1)
            full_mask = None if img_mask is None else torch.cat([img_mask, torch.ones(batch, n_text).double()], 1)
            got = proc(attn, seq, full_mask, None, rotary)
            want = reference(attn, seq, None, full_mask, ids, axes, groups, neg_masks, 2.5, 0.25)
            torch.testing.assert_close(got, want, **tol)


# ---------------------------------------------------------------------------- the text streams of every block


def _attention_inputs(transformer, n_img):
    """Hooks recording the text each block's attention sees (model order): double blocks' ``encoder_hidden_states``,
    single blocks' sequence after the image."""
    seen, hooks = {}, []

    def record(index, text):
        seen.setdefault(index, text.clone())  # a pre-hook returning a value would replace the inputs

    for i, block in enumerate(transformer.double_stream_blocks):
        hooks.append(block.block.attn1.register_forward_pre_hook(lambda m, a, i=i: record(i, a[2])))
    for j, block in enumerate(transformer.single_stream_blocks, start=len(transformer.double_stream_blocks)):
        hooks.append(block.block.attn1.register_forward_pre_hook(lambda m, a, j=j: record(j, a[0][:, n_img:])))
    return seen, hooks


def test_negative_enters_every_block_like_a_prompt(pipe):
    """In a guided forward every block sees the negative's T5 tokens, its last-layer Llama tokens and the Llama
    layer of that block exactly as the unpatched transformer sees them with the negative as its only text."""
    transformer = pipe.transformer
    gen = torch.Generator().manual_seed(3)
    latents, t = torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([700.0])
    n_t5, n_llama = real_tokens(pipe.tokenizer_3, NEG), real_tokens(pipe.tokenizer_4, NEG)
    with torch.no_grad():
        neg_t5 = pipe._get_t5_prompt_embeds(prompt=[NEG], max_sequence_length=n_t5)
        neg_llama = pipe._get_llama3_prompt_embeds(prompt=[NEG], max_sequence_length=n_llama)
    with negguide.apply(pipe, "vsf", negative_prompt=NEG), torch.no_grad():
        pipe.scheduler.set_timesteps(2)
        t5, _, llama, _, pooled, _ = pipe.encode_prompt("a red cat", do_classifier_free_guidance=False,
                                                        max_sequence_length=32)  # fmt: skip
        seen, hooks = _attention_inputs(transformer, 16)
        try:
            transformer(latents, t, t5, llama, pooled, return_dict=False)
        finally:
            for h in hooks:
                h.remove()
    alone, hooks = _attention_inputs(transformer, 16)
    try:
        with torch.no_grad():
            transformer(latents, t, neg_t5, neg_llama, pooled, return_dict=False)  # the prompt's pooled vector
    finally:
        for h in hooks:
            h.remove()
    T, L, a, b = t5.shape[1], llama.shape[2], n_t5, n_llama
    assert seen[0].shape[1] == T + a + 2 * (L + b)
    first = torch.cat([seen[0][:, T : T + a], seen[0][:, T + a + L : T + a + L + b], seen[0][:, -b:]], dim=1)
    torch.testing.assert_close(first, alone[0], atol=1e-6, rtol=0)  # block 0: all three parts
    for i in range(1, 4):  # later blocks: the fresh Llama layer of the block (the rest has seen other tokens)
        torch.testing.assert_close(seen[i][:, -b:], alone[i][:, -b:], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- end to end


def test_cfg_equals_the_pipelines_own_cfg(pipe):
    own = run(pipe, guidance_scale=4.0, negative_prompt=NEG)
    with negguide.apply(pipe, "cfg", negative_prompt=NEG, scale=4.0):
        ours = run(pipe)
    close(ours, own)


def test_non_square_image_tokens_padded_by_the_model(pipe):
    """4x8 pixels are 10 image tokens padded to 16 (``hidden_states_masks``): isolated at bias=inf, guided else."""
    base = run(pipe, height=4, width=8)
    assert base.shape[1:3] == (4, 10)
    with negguide.apply(pipe, "vsf", negative_prompt=NEG, bias=math.inf):
        close(run(pipe, height=4, width=8), base)
    outs = {}
    for path in ("dense", "split"):
        with negguide.apply(pipe, "vsf", negative_prompt=NEG, attention=path):
            outs[path] = run(pipe, height=4, width=8)
    assert differs(outs["dense"], base)
    close(outs["split"], outs["dense"])


def test_mixture_of_experts_keeps_the_negatives_isolated():
    """HiDream's image feed-forward routes each token alone: with experts, bias=inf is still the unguided output."""
    moe = tiny.hidream(moe=True)
    base = run(moe)
    with negguide.apply(moe, "vsf", negative_prompt=NEG, bias=math.inf):
        close(run(moe), base)
    with negguide.apply(moe, "nag", negative_prompt=NEG):
        assert differs(run(moe), base)


def test_layers_counts_double_then_single_blocks(pipe):
    base = run(pipe)
    with negguide.apply(pipe, "vsf", negative_prompt=NEG, layers=[3]):  # the last single-stream block only
        last = run(pipe)
    with negguide.apply(pipe, "vsf", negative_prompt=NEG):
        every = run(pipe)
    assert differs(last, base) and differs(every, last)


# ---------------------------------------------------------------------------- the conformance kit

CASE = testing.Case(
    build=tiny.hidream,
    call=tiny.CALL_KWARGS["hidream"],
    pipeline_cfg={"guidance_scale": 4.0, "negative_prompt": "ugly"},
)


@pytest.mark.parametrize("check", sorted(testing.CHECKS))
def test_conformance(check):
    """The adapter passes every check of negguide.testing on the tiny pipeline."""
    testing.CHECKS[check](CASE)
