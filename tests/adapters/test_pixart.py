"""The PixArt adapter on tiny offline PixArt-Σ and PixArt-α pipelines (+ one-step PixArt-α, PAG refused).

Numbers are checked against the unpatched pipeline (its own CFG, unguided runs), against T5 run on
the real tokens alone, or against an independent float64 closed form of one guided cross-attention
call.
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
from negguide.adapter import EncodeCall
from negguide.adapters.pixart import PixArtAdapter
from negguide.errors import NegativePromptError
from negguide.errors import NegGuideError
from negguide.errors import NoAdapterError
from negguide.installation import GuidedProcessor
from negguide.registry import adapter_for
from negguide.registry import get_method
from negguide.runtime import applied
from negguide.tiny.families.pixart import build
from tests.adapters.helpers import ContextSpy
from tests.adapters.helpers import close
from tests.adapters.helpers import differs
from tests.adapters.helpers import guided_one_negative
from tests.adapters.helpers import real_tokens

CALL = {"num_inference_steps": 2, **tiny.CALL_KWARGS["pixart"]}
MSL = CALL["max_sequence_length"]
PROMPT, NEG = "a red cube on a table", "snow, blurry"


@pytest.fixture(scope="module")
def sigma():
    return build()


@pytest.fixture(scope="module")
def alpha():
    return build(alpha=True)


@pytest.fixture(params=["sigma", "alpha"])
def pipe(request):
    return request.getfixturevalue(request.param)


def run(pipe, prompt=PROMPT, seed=0, **kwargs):
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), **{**CALL, **kwargs}).images


def encode_call(pipe, **arguments):
    """An ``EncodeCall`` as the installation makes it for ``encode_prompt(PROMPT, **arguments)``."""
    import inspect

    kw = {"device": torch.device("cpu"), "num_images_per_prompt": 1, "do_classifier_free_guidance": False,
          "clean_caption": False, "max_sequence_length": MSL, **arguments}  # fmt: skip
    output = pipe.encode_prompt(PROMPT, **kw)
    bound = inspect.signature(pipe.encode_prompt).bind(PROMPT, **kw)
    bound.apply_defaults()
    return EncodeCall(dict(bound.arguments), output, 1, 1, torch.device("cpu"), torch.float32, pipe.encode_prompt)


# ---------------------------------------------------------------------------- facts


def test_adapter_resolves_on_sigma_and_alpha(sigma, alpha):
    assert adapter_for(sigma) is PixArtAdapter and adapter_for(alpha) is PixArtAdapter
    assert negguide.get_adapter(sigma.transformer) is PixArtAdapter
    assert PixArtAdapter.layout == "cross" and PixArtAdapter.pipeline_cfg == "batched"
    assert PixArtAdapter.text_mask_input == "encoder_attention_mask"
    assert not PixArtAdapter.matches(torch.nn.Linear(2, 2))
    assert alpha.transformer.use_additional_conditions and not sigma.transformer.use_additional_conditions


def test_only_every_attn2_is_patched(sigma):
    modules = PixArtAdapter(sigma).attention_modules(sigma.transformer)
    assert modules == {f"transformer_blocks.{i}.attn2.processor": i for i in range(2)}
    attn1 = sigma.transformer.attn_processors["transformer_blocks.0.attn1.processor"]
    with negguide.apply(sigma, "vsf", negative_prompt=NEG):
        procs = sigma.transformer.attn_processors
        assert {k for k, v in procs.items() if isinstance(v, GuidedProcessor)} == set(modules)
        assert procs["transformer_blocks.0.attn1.processor"] is attn1


def test_negative_is_t5_on_the_real_tokens_alone(sigma):
    """Cut from the pipeline's padded, masked encoding, the real tokens equal T5 run on them without padding."""
    text = "a dark and blurry photo"
    cond = PixArtAdapter(sigma).encode_negative(text, encode_call(sigma), padded=False)
    n = real_tokens(sigma, text)
    assert cond.embeds.shape[:2] == (1, n) and cond.mask is None and n < MSL
    ids = torch.tensor([sigma.tokenizer(text).input_ids])
    with torch.no_grad():
        alone = sigma.text_encoder(ids).last_hidden_state
    torch.testing.assert_close(cond.embeds, alone, atol=1e-5, rtol=0)


def test_padded_negative_is_the_pipelines_own(sigma):
    cond = PixArtAdapter(sigma).encode_negative(NEG, encode_call(sigma), padded=True)
    own = sigma.encode_prompt(PROMPT, do_classifier_free_guidance=True, negative_prompt=NEG, clean_caption=False,
                              max_sequence_length=MSL)  # fmt: skip
    assert torch.equal(cond.embeds, own[2]) and torch.equal(cond.mask, own[3].bool())
    assert cond.embeds.shape[1] == MSL


# ---------------------------------------------------------------------------- one attention call, float64


def _attention64(q, k, v, scale, key_mask=None):
    logits = (q @ k.transpose(-1, -2)) * scale
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], -math.inf)
    return torch.softmax(logits, dim=-1) @ v, torch.logsumexp(logits, dim=-1)


def reference_vsf(attn, hidden, context, p, alpha, beta, pos_mask, neg_mask):
    """Float64 VSF on the cross layout, from the weights: Z = W Z+ - alpha (1 - W) Z-, W = A+ / (A+ + e^-beta A-),
    the prompt's padding and the negatives' padding excluded."""

    def lin(layer, x):
        return x @ layer.weight.T + (0 if layer.bias is None else layer.bias)

    def split(x):
        return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

    scale = 1 / math.sqrt(hidden.shape[-1] // attn.heads)
    q, k, v = split(lin(attn.to_q, hidden)), split(lin(attn.to_k, context)), split(lin(attn.to_v, context))
    z_pos, lse_pos = _attention64(q, k[:, :, :p], v[:, :, :p], scale, pos_mask)
    z_neg, lse_neg = _attention64(q, k[:, :, p:], v[:, :, p:], scale, neg_mask)
    w = torch.sigmoid(lse_pos - (lse_neg - beta))[..., None]
    z = (w * z_pos - alpha * (1 - w) * z_neg).transpose(1, 2).flatten(2, 3)
    return lin(attn.to_out[0], z)


def _guided(pipe, attn, p, n, pos_mask, neg_mask, **params):
    return guided_one_negative(pipe, PixArtAdapter, attn, p, n, pos_mask, neg_mask, **params)


def _bias(mask, dtype):
    """The transformer's own conversion of a 2-D mask (pixart_transformer_2d.py): (1 - mask) * -10000, (B, 1, L)."""
    return ((1 - mask.to(dtype)) * -10000.0)[:, None]


def _call_inputs(attn, p, n, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 9, attn.query_dim, generator=gen, dtype=dtype)
    context = torch.randn(2, p + n, attn.cross_attention_dim, generator=gen, dtype=dtype)
    pos_mask = torch.tensor([[True] * p, [True] * (p - 3) + [False] * 3])  # row 1: a padded prompt
    neg_mask = torch.tensor([[True] * n, [True] * (n - 2) + [False] * 2])  # row 1: a shorter negative
    return hidden, context, pos_mask, neg_mask


@pytest.mark.parametrize("path", ["dense", "split"])
@pytest.mark.parametrize(("alpha", "beta"), [(3.0, 0.1), (0.5, 2.0)])
def test_processor_matches_float64_closed_form(sigma, path, alpha, beta):
    """The guided attn2 call (the model's -10000 bias over [P; N] given, as the blocks pass it) equals the closed
    form with the prompt's and the negative's padding excluded."""
    attn = copy.deepcopy(sigma.transformer.transformer_blocks[0].attn2).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in attn.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    p, n = 6, 4
    hidden, context, pos_mask, neg_mask = _call_inputs(attn, p, n, seed=2)
    bias = _bias(torch.cat([pos_mask, neg_mask], dim=1), torch.float64)
    proc = _guided(sigma, attn, p, n, pos_mask, neg_mask, scale=alpha, bias=beta, attention=path)
    with torch.no_grad():
        got = proc(attn, hidden, context, attention_mask=bias)
    want = reference_vsf(attn, hidden, context, p, alpha, beta, pos_mask, neg_mask)
    # the dense oracle builds its bias mask in float32 (beta = 0.1 is rounded); the split path merges in float32
    torch.testing.assert_close(got, want, atol=1e-8 if path == "dense" else 1e-5, rtol=0)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused-kv"])
def test_infinite_bias_call_equals_the_original_with_the_models_bias(sigma, fused):
    """With the negative masked out, the guided call is the original processor over P with the model's own
    -10000 padding bias (the core's boolean mask gives the same numbers)."""
    attn = copy.deepcopy(sigma.transformer.transformer_blocks[1].attn2)
    if fused:
        from diffusers.models.attention_processor import FusedAttnProcessor2_0

        attn.fuse_projections()
        attn.set_processor(FusedAttnProcessor2_0())
    p, n = 5, 3
    hidden, context, pos_mask, neg_mask = _call_inputs(attn, p, n, seed=3, dtype=torch.float32)
    proc = _guided(sigma, attn, p, n, pos_mask, neg_mask, bias=math.inf)
    with torch.no_grad():
        got = proc(attn, hidden, context, attention_mask=_bias(torch.cat([pos_mask, neg_mask], 1), torch.float32))
        want = attn.processor(attn, hidden, context[:, :p], attention_mask=_bias(pos_mask, torch.float32))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_bias_of_another_length_is_refused(sigma):
    attn = copy.deepcopy(sigma.transformer.transformer_blocks[0].attn2)
    p, n = 5, 3
    hidden, context, pos_mask, neg_mask = _call_inputs(attn, p, n, seed=4, dtype=torch.float32)
    proc = _guided(sigma, attn, p, n, pos_mask, neg_mask)
    with pytest.raises(NegGuideError, match="bias over the 8 text tokens"):
        proc(attn, hidden, context, attention_mask=_bias(pos_mask, torch.float32))


# ---------------------------------------------------------------------------- refusals


def test_custom_processors_and_pag_are_refused(sigma):
    from diffusers import PixArtSigmaPAGPipeline

    before = dict(sigma.transformer.attn_processors)
    attn = sigma.transformer.transformer_blocks[1].attn2
    try:
        attn.set_processor(type("MyProcessor", (), {"__call__": lambda self, attn, h, e=None, m=None: h})())
        with pytest.raises(NoAdapterError, match=r"got MyProcessor.*AttnProcessor2_0"):
            negguide.apply(sigma, "nag", negative_prompt=NEG)
    finally:
        sigma.transformer.set_attn_processor(dict(before))
    assert applied(sigma) is None
    pag = PixArtSigmaPAGPipeline(**sigma.components)
    assert adapter_for(pag) is PixArtAdapter
    for method in ("vsf", "cfg"):
        with pytest.raises(NoAdapterError, match=r"\[uncond, cond, perturbed\].*PixArtSigmaPipeline\(\*\*pipe"):
            negguide.apply(pag, method, negative_prompt=NEG)
    assert applied(pag) is None and sigma.transformer.attn_processors == before


def test_a_3d_mask_given_to_the_transformer_is_refused(sigma):
    text, mask = sigma.encode_prompt(PROMPT, do_classifier_free_guidance=False, clean_caption=False,
                                     max_sequence_length=MSL)[:2]  # fmt: skip
    inputs = {"hidden_states": torch.randn(1, 4, 16, 16), "timestep": torch.tensor([500]),
              "encoder_hidden_states": text, "encoder_attention_mask": _bias(mask, torch.float32),
              "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}  # fmt: skip
    with negguide.apply(sigma, "vsf", negative_prompt=NEG):
        sigma.encode_prompt(PROMPT, do_classifier_free_guidance=False, clean_caption=False, max_sequence_length=MSL)
        with pytest.raises(NegGuideError, match=r"as a \(rows, tokens\) mask"):
            sigma.transformer(**inputs)
    assert applied(sigma) is None


# ---------------------------------------------------------------------------- end to end


def test_attn2_sees_p_then_the_unpadded_negative_and_bias_inf_is_unguided(pipe):
    base = run(pipe)
    n = real_tokens(pipe, NEG)
    with negguide.apply(pipe, "vsf", negative_prompt=NEG, bias=math.inf):
        with ContextSpy(pipe.transformer) as spy:
            close(run(pipe), base)
    assert spy.lengths == [MSL + n] * 2 and spy.biases == [(1, 1, MSL + n)] * 2  # the model's bias: joined length
    for method in ("vsf", "nag", "nasa"):
        with negguide.apply(pipe, method, negative_prompt=NEG):
            assert differs(run(pipe), base), method


def test_cfg_equals_the_pipelines_own_cfg(pipe):
    """PixArt-α's micro-conditions (resolution, aspect ratio) ride along into the negative branch."""
    base = run(pipe)
    own = run(pipe, guidance_scale=3.0, negative_prompt=NEG)
    with negguide.apply(pipe, "cfg", negative_prompt=NEG, scale=3.0):
        close(run(pipe), own)
    assert differs(own, base)


def test_negative_prompt_embeds_act_like_the_text(sigma):
    def encode(text):
        with torch.no_grad():
            return sigma.encode_prompt(text, do_classifier_free_guidance=False, clean_caption=False,
                                       max_sequence_length=MSL)[:2]  # fmt: skip

    embeds, mask = encode(NEG)
    n = int(mask.sum())
    with negguide.apply(sigma, "vsf", negative_prompt=NEG):
        text = run(sigma)
    for given in (embeds[:, :n], {"prompt_embeds": embeds, "prompt_attention_mask": mask}):
        with negguide.apply(sigma, "vsf", negative_prompt_embeds=given):
            close(run(sigma), text)
    # the pipeline refuses `prompt` beside `negative_prompt_embeds`: its own CFG run gets the prompt's embeddings
    pos, pos_mask = encode(PROMPT)
    own = run(sigma, prompt=None, prompt_embeds=pos, prompt_attention_mask=pos_mask, guidance_scale=3.0,
              negative_prompt=None, negative_prompt_embeds=embeds, negative_prompt_attention_mask=mask)  # fmt: skip
    for given in (embeds[:, :n], {"prompt_embeds": embeds, "prompt_attention_mask": mask}):
        with negguide.apply(sigma, "cfg", negative_prompt_embeds=given, scale=3.0):
            close(run(sigma), own)
    with negguide.apply(sigma, "vsf", negative_prompt_embeds=torch.zeros(1, 3, 7)):
        with pytest.raises(NegativePromptError, match=r"\(rows, tokens, 32\)"):
            run(sigma)


def test_one_step_pixart_alpha_student(alpha):
    """SNOOPI/DMD-style one-step PixArt-α: DDPM at one timestep (400), guidance_scale 1, the scheduler's predicted
    sample; NASA (designed for these students) and VSF guide that single forward."""
    from diffusers import DDPMScheduler
    from diffusers import PixArtAlphaPipeline

    one = PixArtAlphaPipeline(**{**alpha.components, "scheduler": DDPMScheduler()})
    one.set_progress_bar_config(disable=True)
    kw = {"num_inference_steps": 1, "timesteps": [400], "guidance_scale": 1.0}
    base = run(one, **kw)
    with negguide.apply(one, "nasa", negative_prompt=NEG, scale=0.0):
        with ContextSpy(one.transformer) as spy:
            close(run(one, **kw), base)
    assert spy.lengths == [MSL + real_tokens(one, NEG)]  # one forward, no CFG batch
    with negguide.apply(one, "vsf", negative_prompt=NEG, bias=math.inf):
        close(run(one, **kw), base)
    for method in ("nasa", "vsf", "nag"):
        with negguide.apply(one, method, negative_prompt=NEG):
            out = run(one, **kw)
        assert np.isfinite(out).all() and differs(out, base), method


def test_no_family_defaults():
    """No published PixArt values: every method keeps its own defaults (untuned)."""
    from negguide.registry import family_defaults

    for name in ("vsf", "nag", "nasa", "cfg"):
        assert family_defaults(get_method(name), "pixart") == {}


# ---------------------------------------------------------------------------- the conformance kit

CASE = testing.Case(build=build, call=tiny.CALL_KWARGS["pixart"],
                    pipeline_cfg={"guidance_scale": 4.0, "negative_prompt": "ugly"})  # fmt: skip
ALPHA_CASE = testing.Case(build=functools.partial(build, alpha=True), call=tiny.CALL_KWARGS["pixart"],
                          pipeline_cfg={"guidance_scale": 4.0, "negative_prompt": "ugly"})  # fmt: skip


@pytest.mark.parametrize("check", sorted(testing.CHECKS))
def test_conformance(check):
    """The adapter passes every check of negguide.testing on the tiny PixArt-Σ pipeline."""
    testing.CHECKS[check](CASE)


@pytest.mark.parametrize("check", sorted(set(testing.CHECKS) - {"compiles_without_recompiles"}))
def test_conformance_pixart_alpha(check):
    """PixArt-α (micro-conditions batched beside the text) too; compiled once above (same transformer class)."""
    testing.CHECKS[check](ALPHA_CASE)
