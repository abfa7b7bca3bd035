"""The CogView4 adapter on tiny offline CogView4 pipelines (2 joint blocks; text-to-image and Control).

Numbers are checked against the unpatched pipeline (its own CFG, unguided runs), the GLM encoder called by hand,
or an independent float64 re-implementation of one guided attention call with the paper's mask table and the
model's rotary embedding on the image tokens.

The kit's prompts are short: the pipeline pads every prompt to a multiple of 16 tokens with attended pad tokens,
so two prompts in one call equal each prompt alone only while they round to the same multiple (the tiny
tokenizer spends a token per character).
"""

from __future__ import annotations

import copy
import functools
import math

import numpy as np
import pytest
import torch

import negguide
from negguide import testing
from negguide import tiny
from negguide.adapter import TextLayout
from negguide.adapters.cogview4 import CogView4Adapter
from negguide.errors import ConfigError
from negguide.errors import NegativePromptError
from negguide.errors import NoAdapterError
from negguide.installation import Forward
from negguide.installation import Installation
from negguide.installation import guided_processor
from negguide.negatives import NegativeSpec
from negguide.registry import adapter_for
from negguide.registry import get_method
from tests.adapters.helpers import close
from tests.adapters.helpers import differs

CALL = {"num_inference_steps": 2, **tiny.CALL_KWARGS["cogview4"]}
NEG = "dark rain"


@pytest.fixture(scope="module")
def pipe():
    return tiny.cogview4()


@pytest.fixture(scope="module")
def control_image():
    from PIL import Image

    return Image.fromarray((np.random.RandomState(0).rand(16, 16, 3) * 255).astype("uint8"))


def run(pipe, prompt="a red cat", seed=0, **kwargs):
    gen = (
        [torch.Generator().manual_seed(s) for s in seed]
        if isinstance(seed, list)
        else torch.Generator().manual_seed(seed)
    )
    with torch.no_grad():
        out = pipe(prompt=prompt, generator=gen, **{**CALL, **kwargs}).images
    return np.asarray(out, dtype=np.float64)


def glm(pipe, ids):
    """The pipeline's GLM on exactly these token ids: ``hidden_states[-2]``, as ``_get_glm_embeds`` reads it."""
    with torch.no_grad():
        return pipe.text_encoder(torch.tensor([ids]), output_hidden_states=True).hidden_states[-2]


# ---------------------------------------------------------------------------- facts


@pytest.mark.parametrize("control", [False, True])
def test_adapter_resolves(control):
    assert adapter_for(tiny.cogview4(control=control)) is CogView4Adapter


@torch.no_grad()
def test_negatives_are_encoded_without_padding(pipe):
    """Each negative is its own tokens ([gMASK] <sop> and the text) through GLM, without the pad tokens the
    pipeline puts in front of a prompt (which, in a causal encoder, would change every real token)."""
    short, long = "snow", "dark rain at night"
    ids = {t: pipe.tokenizer(t).input_ids for t in (short, long)}
    assert ids[short][:2] == pipe.tokenizer.convert_tokens_to_ids(["[gMASK]", "<sop>"])
    with negguide.apply(pipe, "vsf", negative_prompt=short) as handle:
        pipe.encode_prompt("a red cat", do_classifier_free_guidance=False)
        encoded = handle.installation.encoded[0]
    assert encoded.num_tokens == len(ids[short]) == 6 and encoded.mask is None
    torch.testing.assert_close(encoded.embeds, glm(pipe, ids[short]), atol=0, rtol=0)
    # the pipeline's own encoding pads to 16 tokens in front: its last tokens are other numbers
    own = pipe.encode_prompt(short, do_classifier_free_guidance=False)[0]
    assert own.shape[1] == 16 and differs(own[0, -6:].numpy(), encoded.embeds[0].numpy(), by=1e-3)
    with negguide.apply(pipe, "vsf", negative_prompt=[short, long]) as handle:
        pipe.encode_prompt(["a red cat", "a tree"], do_classifier_free_guidance=False)
        encoded = handle.installation.encoded[0]
    lengths = [len(ids[short]), len(ids[long])]
    assert encoded.mask.sum(1).tolist() == lengths and encoded.num_tokens == max(lengths)
    for row, text in enumerate((short, long)):
        torch.testing.assert_close(encoded.embeds[row, : lengths[row]], glm(pipe, ids[text])[0], atol=0, rtol=0)


def test_max_sequence_length_truncates_the_negative_like_the_prompt(pipe):
    with negguide.apply(pipe, "vsf", negative_prompt="a dark and blurry photo") as handle:
        pipe.encode_prompt("a red cat", do_classifier_free_guidance=False, max_sequence_length=8)
        assert handle.installation.encoded[0].num_tokens == 8


# ---------------------------------------------------------------------------- one attention call


def _layer_norm(x, eps):
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)


def _rope(x, cos, sin):
    x = x.float().double()  # diffusers' apply_rotary_emb rounds its input to float32
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # CogView4 pairs channel i with i + D/2
    return x * cos[None, :, None] + rot * sin[None, :, None]


def reference_vsf(attn, img, text, cos, sin, p, sizes, alpha, beta, neg_masks):
    """Float64 VSF over ``[P, N_1.., I]`` (text first) with explicit keys ``[.., N_i(1)..]`` and the paper's mask
    table; the rotary embedding on the image tokens only, the text (so every negative) unrotated."""

    def lin(layer, x):
        return x @ layer.weight.T + layer.bias

    def heads(x):
        return x.unflatten(-1, (attn.heads, -1))

    seq = torch.cat([text, img], dim=1)
    t, length = p + sum(sizes), seq.shape[1]
    q = _layer_norm(heads(lin(attn.to_q, seq)), attn.norm_q.eps)
    k = _layer_norm(heads(lin(attn.to_k, seq)), attn.norm_k.eps)
    v = heads(lin(attn.to_v, seq))
    q = torch.cat([q[:, :t], _rope(q[:, t:], cos, sin)], dim=1)
    k = torch.cat([k[:, :t], _rope(k[:, t:], cos, sin)], dim=1)
    starts = [p + sum(sizes[:i]) for i in range(len(sizes))]
    negs = [slice(a, a + n) for a, n in zip(starts, sizes)]
    keys = torch.cat([k, *(k[:, s] for s in negs)], dim=1)
    values = torch.cat([v, *(-alpha * v[:, s] for s in negs)], dim=1)
    flips = [slice(length + a - p, length + a - p + n) for a, n in zip(starts, sizes)]
    bias = torch.zeros(length, keys.shape[1], dtype=torch.float64)
    pos, image = slice(0, p), slice(t, length)
    for s, f in zip(negs, flips):
        bias[image, s], bias[image, f] = -math.inf, -beta  # I sees I, P and each N_i(1) with -beta
        bias[pos, s], bias[pos, f] = -math.inf, -math.inf  # P sees I, P
        bias[s, pos] = -math.inf  # N_i sees I and itself
        for s2, f2 in zip(negs, flips):
            bias[s, f2] = -math.inf
            if s2 != s:
                bias[s, s2] = -math.inf
    pad = torch.zeros(q.shape[0], keys.shape[1], dtype=torch.bool)
    for s, f, m in zip(negs, flips, neg_masks):
        pad[:, s], pad[:, f] = ~m, ~m
    logits = torch.einsum("bqhd,bkhd->bhqk", q, keys) / math.sqrt(q.shape[-1]) + bias
    logits = logits.masked_fill(pad[:, None, None, :], -math.inf)
    out = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), values).flatten(2, 3)
    out = attn.to_out[0](out)
    return out[:, t:], out[:, :t]


@pytest.mark.parametrize("path", ["dense", "split"])
@pytest.mark.parametrize("sizes", [(3,), (3, 2)], ids=["one-negative", "two-negatives"])
def test_processor_matches_float64_reference(pipe, path, sizes):
    """One guided call equals the mask-table reference (negatives unrotated, like text; padding masks honoured)."""
    attn = copy.deepcopy(pipe.transformer.transformer_blocks[0].attn1).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in attn.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    batch, p, n_img, dim = 2, 5, 7, attn.query_dim
    t = p + sum(sizes)
    angles = 3 * torch.randn(n_img, attn.inner_dim // attn.heads // 2, generator=gen, dtype=torch.float64)
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)  # CogView4's [freqs, freqs] layout
    text = torch.randn(batch, t, dim, generator=gen, dtype=torch.float64)
    img = torch.randn(batch, n_img, dim, generator=gen, dtype=torch.float64)
    neg_masks = [torch.tensor([[True] * n, [True] * (n - 1) + [False]]) for n in sizes]
    spans = tuple((p + sum(sizes[:i]), p + sum(sizes[: i + 1])) for i in range(len(sizes)))

    method_cls = get_method("vsf")
    method = method_cls(method_cls.make_config({"scale": 2.5, "bias": 0.25, "attention": path}))
    installation = Installation(pipe, CogView4Adapter(pipe), method, [NegativeSpec("x")])
    installation.forward = Forward(slice(0, batch), TextLayout(p, t, spans), spans, tuple(neg_masks),
                                   (1.0,) * len(sizes), None, None)  # fmt: skip
    proc = guided_processor(installation, attn.processor, 0, 2)
    with torch.no_grad():
        got = proc(attn, img, text, None, (cos, sin))
        want = reference_vsf(attn, img, text, cos, sin, p, sizes, 2.5, 0.25, neg_masks)
    tol = {"atol": 1e-6 if path == "dense" else 2e-5, "rtol": 0}  # RoPE rounds to float32; split merges in float32
    torch.testing.assert_close(got[0], want[0], **tol)
    real = torch.cat([torch.ones(batch, p, dtype=torch.bool), *neg_masks], dim=1)
    torch.testing.assert_close(got[1][real], want[1][real], **tol)  # padding tokens' outputs are never read


def test_processor_outside_a_guided_forward_is_the_original_bit_for_bit(pipe):
    attn = pipe.transformer.transformer_blocks[0].attn1
    installation = Installation(pipe, CogView4Adapter(pipe), get_method("vsf")(), [NegativeSpec("x")])
    proc = guided_processor(installation, attn.processor, 0, 2)
    gen = torch.Generator().manual_seed(0)
    img, text = torch.randn(1, 4, attn.query_dim, generator=gen), torch.randn(1, 3, attn.query_dim, generator=gen)
    rope = pipe.transformer.rope(torch.zeros(1, 4, 4, 4))
    with torch.no_grad():
        got, want = proc(attn, img, text, None, rope), attn.processor(attn, img, text, None, rope)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_guided_call_refuses_an_attention_mask(pipe):
    transformer = pipe.transformer
    with negguide.apply(pipe, "vsf", negative_prompt=NEG):
        embeds = pipe.encode_prompt("a red cat", do_classifier_free_guidance=False)[0]
        size = torch.tensor([[16.0, 16.0]])
        with pytest.raises(ConfigError, match="attention mask"), torch.no_grad():
            transformer(torch.randn(1, 4, 16, 16), embeds, torch.tensor([500.0]), size, size, torch.zeros(1, 2),
                        attention_mask=torch.ones(1, embeds.shape[1]))  # fmt: skip
    assert "encode_prompt" not in pipe.__dict__  # the error removed the installation


def test_other_processors_are_refused():
    from diffusers.models.transformers.transformer_cogview4 import CogView4TrainingAttnProcessor

    other = tiny.cogview4()
    other.transformer.transformer_blocks[1].attn1.set_processor(CogView4TrainingAttnProcessor())
    with pytest.raises(NoAdapterError, match="CogView4AttnProcessor in block 1"):
        negguide.apply(other, "vsf", negative_prompt="snow")
    assert "encode_prompt" not in other.__dict__


# ---------------------------------------------------------------------------- the pipeline's own CFG


def test_vsf_beside_the_pipelines_cfg_joins_the_conditional_call_only(pipe):
    """CogView4Pipeline names its calls (cache_context "cond" / "uncond"): the negative tokens join "cond" only."""
    seen = []
    with negguide.apply(pipe, "vsf", negative_prompt=NEG):
        hook = pipe.transformer.register_forward_pre_hook(  # after negguide's: it sees the transformer's text
            lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True
        )
        try:
            run(pipe, negative_prompt="ugly", guidance_scale=4.0)
        finally:
            hook.remove()
    assert seen == [16 + len(pipe.tokenizer(NEG).input_ids), 16] * 2


def test_cfg_equals_the_pipelines_own_cfg(pipe):
    """negguide's CFG (the negative batched beside the prompt, left-padded to its 16 tokens) equals the pipeline's
    own CFG with that negative prompt."""
    own = run(pipe, negative_prompt=NEG, guidance_scale=3.0)
    with negguide.apply(pipe, "cfg", negative_prompt=NEG, scale=3.0):
        close(run(pipe), own)


def test_cfg_refuses_a_negative_longer_than_the_prompt(pipe):
    long = "a dark and blurry photo of rain"  # 33 tokens: 48 once padded, the prompt 16
    with negguide.apply(pipe, "cfg", negative_prompt=long):
        with pytest.raises(NegativePromptError, match="at most 16 negative tokens"):
            run(pipe)
    assert "encode_prompt" not in pipe.__dict__
    with negguide.apply(pipe, "vsf", negative_prompt=long):  # attention level: any length
        assert np.isfinite(run(pipe)).all()


# ---------------------------------------------------------------------------- CogView4 Control


def test_control_pipeline(control_image):
    """CogView4ControlPipeline shares the transformer; its CFG's second call of a step (no cache_context) stays
    unguided: the kit's checks of isolation, guidance and CFG rows on it."""
    case = testing.Case(
        build=functools.partial(tiny.cogview4, control=True),
        call={**tiny.CALL_KWARGS["cogview4"], "control_image": control_image},
        prompts=("a red cat", "a tree"),
        negatives=("snow", NEG),
        pipeline_cfg={"guidance_scale": 4.0, "negative_prompt": "ugly"},
    )
    testing.check_vsf_infinite_bias_is_unguided(case)
    testing.check_pipeline_cfg_guides_conditional_rows(case)
    own = case.run(negative_prompt=NEG, guidance_scale=3.0)
    with case.apply(method="cfg", negative_prompt=NEG, scale=3.0):
        close(case.run(), own)


# ---------------------------------------------------------------------------- the conformance kit

CASE = testing.Case(
    build=tiny.cogview4,
    call=tiny.CALL_KWARGS["cogview4"],
    prompts=("a red cat", "a tree"),
    negatives=("snow", NEG),
    pipeline_cfg={"guidance_scale": 4.0, "negative_prompt": "ugly"},
)


@pytest.mark.parametrize("check", sorted(testing.CHECKS))
def test_conformance(check):
    """The adapter passes every check of negguide.testing on the tiny pipeline."""
    testing.CHECKS[check](CASE)
