"""The Lumina2 adapter on a tiny offline ``Lumina2Pipeline`` (1 context and 1 noise refiner layer, 2 main layers).

Numbers are checked against the unpatched pipeline (unguided runs, its own CFG), against an independent
float64 re-implementation of one guided attention call with the paper's mask table, and against the model's
own caption path run on each negative alone.
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
from negguide.adapters.lumina2 import Lumina2Adapter
from negguide.errors import NoAdapterError
from negguide.installation import Forward
from negguide.installation import Installation
from negguide.installation import guided_processor
from negguide.negatives import NegativeSpec
from negguide.registry import adapter_for
from negguide.registry import get_method
from tests.adapters.helpers import differs

CALL = {"num_inference_steps": 2, **tiny.CALL_KWARGS["lumina2"]}
NEG = "a dark and blurry photo of heavy rain"
PROMPT = "a red cat on a mat"


@pytest.fixture(scope="module")
def pipe():
    return tiny.lumina2()


def run(pipe, prompt=PROMPT, seed=0, **kwargs):
    gen = (
        [torch.Generator().manual_seed(s) for s in seed]
        if isinstance(seed, list)
        else torch.Generator().manual_seed(seed)
    )
    return pipe(prompt=prompt, generator=gen, **{**CALL, **kwargs}).images


def close(a, b, atol=2e-5):
    np.testing.assert_allclose(a, b, atol=atol, rtol=0)


def encode_call(pipe, prompt=PROMPT):
    output = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, system_prompt=CALL["system_prompt"],
                                max_sequence_length=64)  # fmt: skip
    args = {"prompt": prompt, "max_sequence_length": 64, "system_prompt": CALL["system_prompt"]}
    return EncodeCall(args, output, 1, 1, torch.device("cpu"), torch.float32, pipe.encode_prompt)


# ---------------------------------------------------------------------------- facts


def test_adapter_resolves(pipe):
    assert adapter_for(pipe) is Lumina2Adapter
    modules = Lumina2Adapter(pipe).attention_modules(pipe.transformer)
    assert modules == {"layers.0.attn.processor": 0, "layers.1.attn.processor": 1}  # never the refiners'


def test_other_processor_is_refused(pipe):
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = copy.deepcopy(pipe.transformer)
    model.layers[1].attn.set_processor(AttnProcessor2_0())
    with pytest.raises(NoAdapterError, match="Lumina2AttnProcessor2_0 in layer 1"):
        Lumina2Adapter(pipe).attention_modules(model)


def test_negative_is_encoded_without_padding_and_without_the_system_prompt(pipe):
    """Only the real Gemma tokens of the negative, encoded as the pipeline encodes its own negative prompt: without
    the system prompt (``encode_prompt`` prefixes the prompt only)."""
    adapter = Lumina2Adapter(pipe)
    call = encode_call(pipe)
    ids = pipe.tokenizer(NEG, return_tensors="pt").input_ids  # no padding at all, no system prompt
    with torch.no_grad():
        want = pipe.text_encoder(input_ids=ids, output_hidden_states=True).hidden_states[-2]
    cond = adapter.encode_negative(NEG, call, False)
    assert cond.embeds.shape == (1, ids.shape[1], 32) and cond.mask is None
    torch.testing.assert_close(cond.embeds, want, atol=1e-5, rtol=0)
    padded = adapter.encode_negative(NEG, call, True)  # CFG: exactly the pipeline's negative, padded and masked
    _, _, neg, neg_mask = pipe.encode_prompt(PROMPT, negative_prompt=NEG, system_prompt=CALL["system_prompt"],
                                             max_sequence_length=64)  # fmt: skip
    assert torch.equal(padded.embeds, neg) and torch.equal(padded.mask, neg_mask.bool())
    assert padded.embeds.shape[1] == 64 and int(padded.mask.sum()) == ids.shape[1]


def test_negative_prompt_embeds_formats(pipe):
    adapter = Lumina2Adapter(pipe)
    call = encode_call(pipe)
    a = torch.randn(2, 5, 32)
    assert torch.equal(adapter.negative_from_embeds(a, call, False).embeds, a)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    cond = adapter.negative_from_embeds({"prompt_embeds": a, "prompt_attention_mask": mask}, call, False)
    assert cond.mask.tolist() == mask.bool().tolist()
    with pytest.raises(negguide.NegativePromptError, match="prompt_attention_mask"):
        adapter.negative_from_embeds({"prompt_embeds": a, "prompt_attention_mask": mask[:, :3]}, call, False)
    with pytest.raises(negguide.NegativePromptError, match="cap_feat_dim"):
        adapter.negative_from_embeds(torch.randn(5, 32), call, False)


# ---------------------------------------------------------------------------- one attention call


def _rms(x, norm):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def _rope(x, freqs):
    """Rotate channel pairs by the complex ``freqs`` (B, L, D/2); the model rounds its input to float32."""
    x = x.float().double()
    re, im = x[..., 0::2], x[..., 1::2]
    cos, sin = freqs.real.double()[:, :, None], freqs.imag.double()[:, :, None]
    return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2)


def reference_vsf(attn, hidden, freqs, p, n_img, n, alpha, beta, pos_mask, neg_mask):
    """Float64 VSF over ``[P, I, N]`` with explicit keys ``[P, I, N(0), N(1)]`` and the paper's mask table;
    grouped-query attention: query head ``h`` reads key/value head ``h // (heads / kv_heads)``."""
    q = _rope(_rms((hidden @ attn.to_q.weight.T).unflatten(-1, (attn.heads, -1)), attn.norm_q), freqs)
    d = q.shape[-1]
    k = _rope(_rms((hidden @ attn.to_k.weight.T).unflatten(-1, (-1, d)), attn.norm_k), freqs)
    v = (hidden @ attn.to_v.weight.T).unflatten(-1, (-1, d))
    group = torch.arange(attn.heads) // (attn.heads // k.shape[2])
    k, v = k[:, :, group], v[:, :, group]
    length = p + n_img + n
    pos, img, neg, flip = slice(0, p), slice(p, p + n_img), slice(p + n_img, length), slice(length, length + n)
    keys = torch.cat([k, k[:, neg]], dim=1)  # N(1): the rotated negative keys again
    values = torch.cat([v, -alpha * v[:, neg]], dim=1)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, keys) / math.sqrt(d)
    bias = torch.zeros(length, length + n, dtype=torch.float64)
    bias[img, neg], bias[img, flip] = -math.inf, -beta  # I sees P, I and N(1) with -beta
    bias[pos, neg], bias[pos, flip] = -math.inf, -math.inf  # P sees P, I
    bias[neg, pos], bias[neg, flip] = -math.inf, -math.inf  # N sees I, N(0)
    padding = torch.zeros(hidden.shape[0], length + n, dtype=torch.bool)
    padding[:, pos] = ~pos_mask
    padding[:, neg], padding[:, flip] = ~neg_mask, ~neg_mask
    logits = (logits + bias).masked_fill(padding[:, None, None, :], -math.inf)
    out = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), values).flatten(2, 3)
    return out @ attn.to_out[0].weight.T


@pytest.mark.parametrize("path", ["dense", "split"])
def test_processor_matches_float64_reference(pipe, path):
    """One guided main-layer call equals the mask-table reference over [P, I, N]; N(1) carries N's rotation."""
    attn = copy.deepcopy(pipe.transformer.layers[0].attn).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in attn.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    batch, p, n_img, n, dim = 2, 5, 6, 4, 32
    length = p + n_img + n
    angles = torch.randn(batch, length, 4, generator=gen, dtype=torch.float64)
    freqs = torch.polar(torch.ones_like(angles), angles)  # complex128, as the model's rotary tables give
    hidden = torch.randn(batch, length, dim, generator=gen, dtype=torch.float64)
    pos_mask = torch.tensor([[True] * p, [True] * (p - 2) + [False] * 2])  # the second caption is shorter
    neg_mask = torch.tensor([[True] * n, [True] * (n - 1) + [False]])
    method_cls = get_method("vsf")
    method = method_cls(method_cls.make_config({"scale": 2.5, "bias": 0.25, "attention": path}))
    installation = Installation(pipe, Lumina2Adapter(pipe), method, [NegativeSpec("x")])
    installation.forward = Forward(
        slice(0, batch), TextLayout(p, p + n), ((p, p + n),), (neg_mask,), (1.0,), pos_mask, None
    )
    proc = guided_processor(installation, attn.processor, 0, 2)
    with torch.no_grad():
        got = proc(attn, hidden, hidden, None, freqs)
        want = reference_vsf(attn, hidden, freqs, p, n_img, n, 2.5, 0.25, pos_mask, neg_mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)  # the rotation rounds to float32, as the model does


def test_processor_outside_a_guided_forward_is_the_original(pipe):
    attn = pipe.transformer.layers[0].attn
    installation = Installation(pipe, Lumina2Adapter(pipe), get_method("vsf")(), [NegativeSpec("x")])
    proc = guided_processor(installation, attn.processor, 0, 2)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 9, 32, generator=gen)
    freqs = torch.polar(torch.ones(1, 9, 4), torch.randn(1, 9, 4, generator=gen))
    with torch.no_grad():
        want = attn.processor(attn, hidden, hidden, image_rotary_emb=freqs)
        assert torch.equal(proc(attn, hidden, hidden, image_rotary_emb=freqs), want)


# ---------------------------------------------------------------------------- the joint sequence


def caption_freqs(model, n):
    """The model's rotary table rows of caption tokens ``j < n``: position ``(j, 0, 0)`` on the three axes."""
    tables = model.rope_embedder.freqs_cis
    return torch.cat([tables[0][:n], tables[1][:1].expand(n, -1), tables[2][:1].expand(n, -1)], dim=-1)


def refined_alone(model, feats):
    """The model's caption path on one negative alone, without padding: embed, refine at ``(j, 0, 0)``."""
    freqs = caption_freqs(model, len(feats))[None]
    hidden = model.time_caption_embed.caption_embedder(feats[None])
    for layer in model.context_refiner:
        hidden = layer(hidden, None, freqs)
    return hidden[0], freqs[0]


def first_layer_inputs(pipe, **apply):
    """``(hidden, rotary)`` entering the first main layer in each forward of a 1-step call (guided if ``apply``)."""
    seen = []
    hook = pipe.transformer.layers[0].register_forward_pre_hook(lambda m, args: seen.append((args[0], args[2])))
    try:
        if apply:
            with negguide.apply(pipe, "vsf", **apply):
                run(pipe, [PROMPT, "a green tree"], seed=[0, 1], num_inference_steps=1)
        else:
            run(pipe, [PROMPT, "a green tree"], seed=[0, 1], num_inference_steps=1)
    finally:
        hook.remove()
    return seen[0]


def test_joint_sequence_keeps_the_positive_and_appends_each_negative_refined_alone(pipe):
    """``[P, I]`` exactly as the model builds its joint sequence (per row), then each negative as a caption of its
    own (its own context-refiner pass at caption positions ``(j, 0, 0)``), whatever the caption lengths."""
    model = pipe.transformer
    negatives = ["snow", NEG]
    hidden0, rotary0 = first_layer_inputs(pipe)
    hidden, rotary = first_layer_inputs(pipe, negatives={n: 1.0 for n in negatives})
    caption = pipe.encode_prompt([PROMPT, "a green tree"], do_classifier_free_guidance=False,
                                 system_prompt=CALL["system_prompt"], max_sequence_length=64)[1]  # fmt: skip
    lengths = caption.sum(1).tolist()
    num_pos, n_img = max(lengths), 16
    assert lengths[0] != lengths[1] and hidden.shape[1] == num_pos + n_img + sum(
        len(pipe.tokenizer(n).input_ids) for n in negatives
    )
    for row, c in enumerate(lengths):  # the model's row: [caption[:c], image, zero padding]
        torch.testing.assert_close(hidden[row, :c], hidden0[row, :c], atol=1e-6, rtol=0)
        torch.testing.assert_close(hidden[row, num_pos : num_pos + n_img], hidden0[row, c : c + n_img], atol=1e-6,
                                   rtol=0)  # fmt: skip
        assert torch.equal(rotary[row, :c], rotary0[row, :c])
        assert torch.equal(rotary[row, num_pos : num_pos + n_img], rotary0[row, c : c + n_img])
        assert not hidden[row, c:num_pos].any()  # the shorter caption's padding: zero, and masked by the core
    start = num_pos + n_img
    for text in negatives:
        ids = pipe.tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            feats = pipe.text_encoder(input_ids=ids, output_hidden_states=True).hidden_states[-2][0]
            want, freqs = refined_alone(model, feats)
        for row in range(2):
            torch.testing.assert_close(hidden[row, start : start + len(feats)], want, atol=1e-5, rtol=0)
            torch.testing.assert_close(rotary[row, start : start + len(feats)], freqs.to(rotary.dtype))
        start += len(feats)


# ---------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("method", ["vsf", "nag", "nasa"])
def test_methods_guide_and_removal_is_bit_exact(pipe, method):
    base = run(pipe)
    params = {"vsf": {"scale": 3.0}, "nag": {"scale": 5.0}, "nasa": {"scale": 0.5}}[method]
    with negguide.apply(pipe, method, negative_prompt=NEG, **params):
        assert differs(run(pipe), base)
    assert np.array_equal(run(pipe), base)


def test_pipeline_cfg_with_truncation_guides_the_conditional_calls_only(pipe):
    """The pipeline's CFG runs the negative as a second call per step until ``cfg_trunc_ratio``: only the first
    call of each step is guided, and VSF with bias=inf equals the pipeline's own (normalized) CFG."""
    own_cfg = {"guidance_scale": 4.0, "negative_prompt": "ugly", "cfg_trunc_ratio": 0.5, "num_inference_steps": 4}
    own = run(pipe, **own_cfg)
    with negguide.apply(pipe, "vsf", negative_prompt=NEG, bias=math.inf) as handle:
        guided = []
        spy = pipe.transformer.register_forward_hook(
            lambda m, a, o: guided.append(handle.installation.forward is not None), prepend=True
        )
        try:
            close(run(pipe, **own_cfg), own)
        finally:
            spy.remove()
    assert guided == [True, False, True, False, True, True], "two steps with CFG, then the truncated ones"


def test_cfg_method_equals_the_pipelines_own_cfg(pipe):
    """negguide's CFG (scale w) is the pipeline's own CFG with the same w, without its norm rescaling."""
    own = run(pipe, guidance_scale=3.0, negative_prompt=NEG, cfg_normalization=False)
    with negguide.apply(pipe, "cfg", negative_prompt=NEG, scale=3.0):
        close(run(pipe), own)


def test_images_per_prompt_with_per_prompt_negatives(pipe):
    """Each image gets its own prompt's negative. The prompts have one length: ``Lumina2Pipeline.encode_prompt``
    repeats the embeddings per prompt but tiles the masks (``mask.repeat(num_images_per_prompt, 1)``), which
    mismatches prompts of different lengths with several images each, guided or not (diffusers 0.42.1)."""
    prompts, negatives = [PROMPT, "a tan dog in a hat"], ["snow", NEG]
    with negguide.apply(pipe, "vsf", negative_prompt=negatives):
        both = run(pipe, prompts, seed=[0, 1, 2, 3], num_images_per_prompt=2)
    for i in range(2):
        with negguide.apply(pipe, "vsf", negative_prompt=negatives[i]):
            alone = run(pipe, prompts[i], seed=[2 * i, 2 * i + 1], num_images_per_prompt=2)
        close(both[2 * i : 2 * i + 2], alone)


def test_negative_prompt_embeds_equal_the_text(pipe):
    with torch.no_grad():
        _, _, embeds, mask = pipe.encode_prompt(PROMPT, negative_prompt=NEG, system_prompt=CALL["system_prompt"],
                                                max_sequence_length=64)  # fmt: skip
    with negguide.apply(pipe, "vsf", negative_prompt=NEG):
        text = run(pipe)
    with negguide.apply(pipe, "vsf", negative_prompt_embeds={"prompt_embeds": embeds, "prompt_attention_mask": mask}):
        close(run(pipe), text, atol=1e-6)


# ---------------------------------------------------------------------------- the conformance kit

CASE = testing.Case(
    build=tiny.lumina2,
    call=tiny.CALL_KWARGS["lumina2"],
    pipeline_cfg={"guidance_scale": 4.0, "negative_prompt": "ugly"},
)


@pytest.mark.parametrize("check", sorted(testing.CHECKS))
def test_conformance(check):
    """The adapter passes every check of negguide.testing on the tiny pipeline."""
    testing.CHECKS[check](CASE)
