"""The Z-Image adapter on tiny offline Z-Image pipelines (text-to-image, img2img, inpaint, ControlNet).

Numbers are checked against the unpatched pipeline (unguided runs, its own CFG), against an
independent float64 re-implementation of one guided attention call with the paper's mask table,
and against the model's own caption path run on each negative alone.
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
from negguide.adapters.zimage import ZImageAdapter
from negguide.errors import NoAdapterError
from negguide.installation import Forward
from negguide.installation import Installation
from negguide.installation import guided_processor
from negguide.negatives import NegativeSpec
from negguide.registry import adapter_for
from negguide.registry import get_method
from tests.adapters.helpers import differs

CALL = {"num_inference_steps": 2, **tiny.CALL_KWARGS["zimage"]}
NEG = "a dark and blurry photo of heavy rain"


@pytest.fixture(scope="module")
def pipe():
    return tiny.zimage()


def run(pipe, prompt="a red cat on a mat", seed=0, **kwargs):
    gen = (
        [torch.Generator().manual_seed(s) for s in seed]
        if isinstance(seed, list)
        else torch.Generator().manual_seed(seed)
    )
    prompt = list(prompt) if isinstance(prompt, list) else prompt  # the pipeline templates a list in place
    return pipe(prompt=prompt, generator=gen, **{**CALL, **kwargs}).images


def close(a, b, atol=2e-5):
    np.testing.assert_allclose(a, b, atol=atol, rtol=0)


def real_tokens(pipe, text):
    """Tokens of ``text`` after the pipeline's chat template, counted by the tokenizer without padding."""
    templated = pipe.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    return len(pipe.tokenizer(templated).input_ids)


def encode_call(pipe, prompt="a red cat on a mat"):
    output = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=64)
    args = {"prompt": [prompt], "max_sequence_length": 64}
    return EncodeCall(args, output, 1, 1, torch.device("cpu"), torch.float32, pipe.encode_prompt)


# ---------------------------------------------------------------------------- facts


def test_adapter_resolves_for_every_sibling(pipe):
    from diffusers import ZImageImg2ImgPipeline
    from diffusers import ZImageInpaintPipeline

    assert adapter_for(pipe) is ZImageAdapter
    for cls in (ZImageImg2ImgPipeline, ZImageInpaintPipeline):
        assert adapter_for(cls(**pipe.components)) is ZImageAdapter
    modules = ZImageAdapter(pipe).attention_modules(pipe.transformer)
    assert modules == {"layers.0.attention.processor": 0, "layers.1.attention.processor": 1}


def test_omni_pipeline_is_refused(pipe):
    from diffusers import ZImageOmniPipeline

    omni = object.__new__(ZImageOmniPipeline)  # its SigLIP parts are not needed to be refused
    with pytest.raises(NoAdapterError, match="ZImageOmniPipeline"):
        ZImageAdapter(omni).find_denoisers()


def test_negative_is_encoded_without_padding(pipe):
    """Only the real tokens of the chat-templated negative, and exactly the encoder's states at those tokens."""
    adapter = ZImageAdapter(pipe)
    call = encode_call(pipe)
    for padded in (False, True):
        cond = adapter.encode_negative(NEG, call, padded)
        n = real_tokens(pipe, NEG)
        assert cond.embeds.shape == (1, n, 32) and cond.mask is None
        templated = pipe.tokenizer.apply_chat_template(
            [{"role": "user", "content": NEG}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
        ids = pipe.tokenizer(templated, return_tensors="pt").input_ids  # no padding at all
        with torch.no_grad():
            want = pipe.text_encoder(input_ids=ids, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(cond.embeds, want, atol=1e-6, rtol=0)


def test_negative_prompt_embeds_formats(pipe):
    adapter = ZImageAdapter(pipe)
    call = encode_call(pipe)
    a, b = torch.randn(5, 32), torch.randn(3, 32)
    assert torch.equal(adapter.negative_from_embeds([a], call, False).embeds, a[None])
    cond = adapter.negative_from_embeds([a, b], call, False)
    assert cond.embeds.shape == (2, 5, 32) and cond.mask.tolist() == [[True] * 5, [True] * 3 + [False] * 2]
    assert torch.equal(adapter.negative_from_embeds(a[None], call, False).embeds, a[None])
    with pytest.raises(negguide.NegativePromptError, match="list of"):
        adapter.negative_from_embeds(torch.randn(32), call, False)


def test_join_keeps_captions_and_states_the_padded_caption_region(pipe):
    adapter = ZImageAdapter(pipe)
    caps = [torch.randn(35, 32), torch.randn(29, 32)]  # padded by the model to 64 and 32 tokens
    control = {0: torch.randn(2, 64 + 64, 32)}
    negative = torch.randn(2, 7, 32)
    joined = adapter.join({"x": ["x"], "cap_feats": caps, "controlnet_block_samples": control}, negative, None)
    assert joined.kwargs["cap_feats"] is caps and joined.carry is negative
    assert joined.num_pos == 64 and joined.pos_mask.tolist() == [[True] * 64, [True] * 32 + [False] * 32]
    padded = joined.kwargs["controlnet_block_samples"][0]
    assert torch.equal(padded[:, :128], control[0]) and not padded[:, 128:].any() and padded.shape[1] == 135


# ---------------------------------------------------------------------------- one attention call


def _rms(x, norm):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def _rope(x, freqs):
    """Rotate channel pairs by the complex ``freqs`` (B, L, D/2); the model rounds its input to float32."""
    x = x.float().double()
    re, im = x[..., 0::2], x[..., 1::2]
    cos, sin = freqs.real.double()[:, :, None], freqs.imag.double()[:, :, None]
    return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2)


def reference_vsf(attn, hidden, freqs, n_img, p, n, alpha, beta, pos_mask, neg_mask):
    """Float64 VSF over ``[I, P, N]`` with explicit keys ``[I, P, N(0), N(1)]`` and the paper's mask table."""

    def heads(x):
        return x.unflatten(-1, (attn.heads, -1))

    q = _rope(_rms(heads(hidden @ attn.to_q.weight.T), attn.norm_q), freqs)
    k = _rope(_rms(heads(hidden @ attn.to_k.weight.T), attn.norm_k), freqs)
    v = heads(hidden @ attn.to_v.weight.T)
    length = n_img + p + n
    img, pos, neg, flip = slice(0, n_img), slice(n_img, n_img + p), slice(n_img + p, length), slice(length, length + n)
    keys = torch.cat([k, k[:, neg]], dim=1)  # N(1): the rotated negative keys again
    values = torch.cat([v, -alpha * v[:, neg]], dim=1)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, keys) / math.sqrt(q.shape[-1])
    bias = torch.zeros(length, length + n, dtype=torch.float64)
    bias[img, neg], bias[img, flip] = -math.inf, -beta  # I sees I, P and N(1) with -beta
    bias[pos, neg], bias[pos, flip] = -math.inf, -math.inf  # P sees I, P
    bias[neg, pos], bias[neg, flip] = -math.inf, -math.inf  # N sees I, N(0)
    padding = torch.zeros(hidden.shape[0], length + n, dtype=torch.bool)
    padding[:, pos] = ~pos_mask
    padding[:, neg], padding[:, flip] = ~neg_mask, ~neg_mask
    logits = (logits + bias).masked_fill(padding[:, None, None, :], -math.inf)
    out = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), values).flatten(2, 3)
    return out @ attn.to_out[0].weight.T


@pytest.mark.parametrize("path", ["dense", "split"])
def test_processor_matches_float64_reference(pipe, path):
    """One guided main-layer call equals the mask-table reference; N(1) carries N's rotation (text positions)."""
    attn = copy.deepcopy(pipe.transformer.layers[0].attention).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in attn.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    batch, n_img, p, n, dim = 2, 6, 5, 4, 32
    length = n_img + p + n
    angles = torch.randn(batch, length, attn.to_q.out_features // attn.heads // 2, generator=gen)
    freqs = torch.polar(torch.ones_like(angles), angles)  # complex64, as the model's rope_embedder gives
    hidden = torch.randn(batch, length, dim, generator=gen, dtype=torch.float64)
    pos_mask = torch.tensor([[True] * p, [True] * (p - 2) + [False] * 2])  # the second caption is shorter
    neg_mask = torch.tensor([[True] * n, [True] * (n - 1) + [False]])
    method_cls = get_method("vsf")
    method = method_cls(method_cls.make_config({"scale": 2.5, "bias": 0.25, "attention": path}))
    installation = Installation(pipe, ZImageAdapter(pipe), method, [NegativeSpec("x")])
    installation.forward = Forward(
        slice(0, batch), TextLayout(p, p + n), ((p, p + n),), (neg_mask,), (1.0,), pos_mask, None
    )
    proc = guided_processor(installation, attn.processor, 0, 2)
    with torch.no_grad():
        got = proc(attn, hidden, None, None, freqs)
        want = reference_vsf(attn, hidden, freqs, n_img, p, n, 2.5, 0.25, pos_mask, neg_mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)  # the rotation rounds to float32, as the model does


def test_processor_outside_a_guided_forward_is_the_original(pipe):
    attn = pipe.transformer.layers[0].attention
    installation = Installation(pipe, ZImageAdapter(pipe), get_method("vsf")(), [NegativeSpec("x")])
    proc = guided_processor(installation, attn.processor, 0, 2)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 9, 32, generator=gen)
    freqs = torch.polar(torch.ones(1, 9, 8), torch.randn(1, 9, 8, generator=gen))
    with torch.no_grad():
        assert torch.equal(proc(attn, hidden, freqs_cis=freqs), attn.processor(attn, hidden, freqs_cis=freqs))


# ---------------------------------------------------------------------------- the joint sequence


def refined_alone(model, tokens):
    """The model's caption path on one negative alone, without caption padding: embed, refine at (1 + j, 0, 0)."""
    ids = torch.stack([torch.arange(1, len(tokens) + 1), torch.zeros(len(tokens)), torch.zeros(len(tokens))], -1)
    freqs = model.rope_embedder(ids.int())[None]
    hidden = model.cap_embedder(tokens[None])
    for layer in model.context_refiner:
        hidden = layer(hidden, None, freqs)
    return hidden[0], freqs[0]


def test_unified_sequence_appends_each_negative_refined_alone(pipe):
    """``[x, P]`` exactly as the model builds it, then each negative as its own caption (own refiner pass)."""
    model = pipe.transformer
    adapter = ZImageAdapter(pipe)
    gen = torch.Generator().manual_seed(2)
    batch, n_x, dim = 2, 32, 32
    x = torch.randn(batch, n_x, dim, generator=gen)
    x_freqs = torch.polar(torch.ones(batch, n_x, 8), torch.randn(batch, n_x, 8, generator=gen))
    cap = torch.randn(batch, 64, dim, generator=gen)
    cap_freqs = torch.polar(torch.ones(batch, 64, 8), torch.randn(batch, 64, 8, generator=gen))
    args = (x, x_freqs, [n_x, n_x], None, cap, cap_freqs, [64, 32], None, None, None, None, None, False, "cpu")
    n1, n2 = 3, 5
    negative = torch.randn(batch, n1 + n2, 32, generator=gen)
    mask2 = torch.tensor([[True] * n2, [True] * 3 + [False] * 2])  # the second row's second negative is shorter
    fwd = Forward(slice(0, batch), TextLayout(64, 64 + n1 + n2), ((64, 64 + n1), (64 + n1, 64 + n1 + n2)),
                  (None, mask2), (1.0, 1.0), None, None, negative)  # fmt: skip
    with torch.no_grad():
        want = model._build_unified_sequence(*args)
        unified, freqs, mask, noise = adapter.patched("_build_unified_sequence", model._build_unified_sequence,
                                                      fwd, *args)  # fmt: skip
        length = n_x + 64
        assert torch.equal(unified[:, :length], want[0]) and torch.equal(freqs[:, :length], want[1])
        assert noise is None and unified.shape[1] == length + n1 + n2
        assert mask.tolist() == [
            want[2][0].tolist() + [True] * (n1 + n2),
            want[2][1].tolist() + [True] * (n1 + 3) + [False] * 2,
        ]
        for row in range(batch):
            for a, real in ((0, n1), (n1, n2 if row == 0 else 3)):
                hidden, rot = refined_alone(model, negative[row, a : a + real])
                got = unified[row, length + a : length + a + real]
                torch.testing.assert_close(got, hidden, atol=1e-5, rtol=0)
                assert torch.equal(freqs[row, length + a : length + a + real], rot)


# ---------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("method", ["vsf", "nag", "nasa"])
def test_turbo_use_guides_and_bias_inf_is_unguided(pipe, method):
    """Z-Image Turbo's use (few steps, guidance_scale=0): each method changes the output; removal is bit-exact."""
    base = run(pipe)
    params = {"vsf": {"scale": 3.0}, "nag": {"scale": 5.0}, "nasa": {"scale": 0.5}}[method]
    with negguide.apply(pipe, method, negative_prompt=NEG, **params):
        guided = run(pipe)
    assert differs(guided, base)
    if method == "vsf":
        with negguide.apply(pipe, "vsf", negative_prompt=NEG, bias=math.inf):
            close(run(pipe), base)
    assert np.array_equal(run(pipe), base)


def test_pipeline_cfg_with_truncation_guides_conditional_rows_only(pipe):
    """``cfg_truncation`` drops the unconditional half in late steps: every forward guides its conditional rows."""
    own_cfg = {"guidance_scale": 3.0, "negative_prompt": "ugly", "cfg_truncation": 0.5, "num_inference_steps": 4}
    own = run(pipe, **own_cfg)
    rows = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, args: rows.append(len(args[0])))
    try:
        with negguide.apply(pipe, "vsf", negative_prompt=NEG, bias=math.inf) as handle:
            guided = []
            spy = pipe.transformer.register_forward_hook(
                lambda m, a, o: guided.append(handle.installation.forward.guided), prepend=True
            )
            try:
                close(run(pipe, **own_cfg), own)
            finally:
                spy.remove()
    finally:
        hook.remove()
    assert sorted(set(rows)) == [1, 2], "some steps batch [cond, uncond], the truncated ones only cond"
    assert guided == [slice(0, 1)] * len(rows)


def test_cfg_method_equals_the_pipelines_own_cfg(pipe):
    """negguide's CFG (scale s) is the pipeline's own CFG (guidance_scale s - 1: pos + g (pos - neg))."""
    own = run(pipe, guidance_scale=2.0, negative_prompt=NEG)
    with negguide.apply(pipe, "cfg", negative_prompt=NEG, scale=3.0):
        close(run(pipe), own)


def test_images_per_prompt_with_per_prompt_negatives_and_pipeline_cfg(pipe):
    """Rows repeated per image after encoding (and the CFG batch) give each image its own prompt's negative."""
    prompts, negatives = ["a red cat on a mat", "a green tree"], ["snow", NEG]
    with negguide.apply(pipe, "vsf", negative_prompt=negatives):
        both = run(pipe, prompts, seed=[0, 1, 2, 3], num_images_per_prompt=2, guidance_scale=2.0,
                   negative_prompt=["ugly", "ugly"])  # fmt: skip
    for i in range(2):
        with negguide.apply(pipe, "vsf", negative_prompt=negatives[i]):
            alone = run(pipe, prompts[i], seed=[2 * i, 2 * i + 1], num_images_per_prompt=2, guidance_scale=2.0,
                        negative_prompt="ugly")  # fmt: skip
        close(both[2 * i : 2 * i + 2], alone)


def test_negative_prompt_embeds_equal_the_text(pipe):
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(NEG, do_classifier_free_guidance=False, max_sequence_length=64)
    with negguide.apply(pipe, "vsf", negative_prompt=NEG):
        text = run(pipe)
    with negguide.apply(pipe, "vsf", negative_prompt_embeds=embeds):
        assert np.array_equal(run(pipe), text)


@pytest.fixture(scope="module")
def image():
    from PIL import Image

    return Image.fromarray((np.random.RandomState(0).rand(12, 12, 3) * 255).astype("uint8"))


@pytest.mark.parametrize("kind", ["img2img", "inpaint", "controlnet"])
def test_siblings_share_the_denoiser(pipe, image, kind):
    """img2img, inpaint and ControlNet: VSF bias=inf is unguided, VSF guides, negguide's CFG is the pipeline's."""
    from diffusers import ZImageControlNetPipeline
    from diffusers import ZImageImg2ImgPipeline
    from diffusers import ZImageInpaintPipeline

    if kind == "controlnet":
        sibling = tiny.zimage(kind="controlnet")
        inputs = {"control_image": image}
        assert isinstance(sibling, ZImageControlNetPipeline)
    else:
        cls = ZImageImg2ImgPipeline if kind == "img2img" else ZImageInpaintPipeline
        sibling = cls(**pipe.components)
        inputs = {"image": image, "strength": 0.9, "num_inference_steps": 3}
        if kind == "inpaint":
            from PIL import Image

            inputs["mask_image"] = Image.fromarray(np.tril(np.full((12, 12), 255, dtype="uint8")))
    sibling.set_progress_bar_config(disable=True)
    base = run(sibling, **inputs)
    with negguide.apply(sibling, "vsf", negative_prompt=NEG, bias=math.inf):
        close(run(sibling, **inputs), base)
    with negguide.apply(sibling, "vsf", negative_prompt=NEG):
        assert differs(run(sibling, **inputs), base)
    own = run(sibling, guidance_scale=2.0, negative_prompt=NEG, **inputs)
    with negguide.apply(sibling, "cfg", negative_prompt=NEG, scale=3.0):
        close(run(sibling, **inputs), own)
    assert np.array_equal(run(sibling, **inputs), base)


# ---------------------------------------------------------------------------- the conformance kit

CASE = testing.Case(
    build=tiny.zimage,
    call=tiny.CALL_KWARGS["zimage"],
    pipeline_cfg={"guidance_scale": 3.0, "negative_prompt": "ugly"},
)


@pytest.mark.parametrize("check", sorted(testing.CHECKS))
def test_conformance(check):
    """The adapter passes every check of negguide.testing on the tiny pipeline."""
    testing.CHECKS[check](CASE)
