"""The LTX-Video adapter on tiny offline LTX pipelines (text-to-video, image-to-video, conditions, the distilled
few-step use, the long multi-prompt pipeline).

Numbers are checked against the unpatched pipelines (their own CFG, unguided runs), against T5 run on the real
tokens alone, or against an independent float64 closed form of one guided cross-attention call.
"""

from __future__ import annotations

import copy
import functools
import math
import sys

import numpy as np
import PIL.Image
import pytest
import torch

import negguide
from negguide import testing
from negguide import tiny
from negguide.adapter import EncodeCall
from negguide.adapters.ltx import LTXAdapter
from negguide.errors import NegativePromptError
from negguide.errors import NegGuideError
from negguide.errors import NoAdapterError
from negguide.installation import GuidedProcessor
from negguide.registry import adapter_for
from negguide.registry import get_method
from negguide.runtime import applied
from negguide.tiny.families.ltx import build
from tests.adapters.helpers import ContextSpy
from tests.adapters.helpers import close
from tests.adapters.helpers import differs
from tests.adapters.helpers import guided_one_negative
from tests.adapters.helpers import real_tokens
from tests.memcap import run_capped

CALL = {"num_inference_steps": 2, **tiny.CALL_KWARGS["ltx"]}
MSL = CALL["max_sequence_length"]
PROMPT, NEG = "a red cube on a table", "snow, blurry"


@pytest.fixture(scope="module")
def t2v():
    return build()


@pytest.fixture(scope="module")
def i2v(t2v):
    from diffusers import LTXImageToVideoPipeline

    pipe = LTXImageToVideoPipeline(**t2v.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def cond(t2v):
    from diffusers import LTXConditionPipeline

    pipe = LTXConditionPipeline(**t2v.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image():
    gen = np.random.default_rng(0)
    return PIL.Image.fromarray((gen.random((64, 64, 3)) * 255).astype("uint8"))


def inputs(pipe):
    """The per-pipeline inputs beside the prompt: the first frame of image-to-video, a first-frame condition."""
    from diffusers import LTXConditionPipeline
    from diffusers import LTXImageToVideoPipeline
    from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition

    if isinstance(pipe, LTXImageToVideoPipeline):
        return {"image": image()}
    if isinstance(pipe, LTXConditionPipeline):
        return {"conditions": [LTXVideoCondition(image=image(), frame_index=0)]}
    return {}


def run(pipe, prompt=PROMPT, seed=0, **kwargs):
    call = {**CALL, **inputs(pipe), **kwargs}
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), **call).frames


def encode_call(pipe, **arguments):
    """An ``EncodeCall`` as the installation makes it for ``encode_prompt(PROMPT, **arguments)``."""
    import inspect

    kw = {"device": torch.device("cpu"), "num_videos_per_prompt": 1, "do_classifier_free_guidance": False,
          "max_sequence_length": MSL, **arguments}  # fmt: skip
    output = pipe.encode_prompt(PROMPT, **kw)
    bound = inspect.signature(pipe.encode_prompt).bind(PROMPT, **kw)
    bound.apply_defaults()
    return EncodeCall(dict(bound.arguments), output, 1, 1, torch.device("cpu"), torch.float32, pipe.encode_prompt)


# ---------------------------------------------------------------------------- facts


def test_adapter_resolves_on_every_ltx_pipeline(t2v, i2v, cond):
    from diffusers import LTXI2VLongMultiPromptPipeline

    multi = LTXI2VLongMultiPromptPipeline(**t2v.components)
    for pipe in (t2v, i2v, cond, multi):
        assert adapter_for(pipe) is LTXAdapter
    assert negguide.get_adapter(t2v.transformer) is LTXAdapter
    assert LTXAdapter.layout == "cross" and LTXAdapter.pipeline_cfg == "batched"
    assert LTXAdapter.text_mask_input == "encoder_attention_mask"
    assert not LTXAdapter.matches(torch.nn.Linear(2, 2))


def test_only_every_attn2_is_patched(t2v):
    modules = LTXAdapter(t2v).attention_modules(t2v.transformer)
    assert modules == {f"transformer_blocks.{i}.attn2.processor": i for i in range(2)}
    attn1 = t2v.transformer.attn_processors["transformer_blocks.0.attn1.processor"]
    with negguide.apply(t2v, "vsf", negative_prompt=NEG):
        procs = t2v.transformer.attn_processors
        assert {k for k, v in procs.items() if isinstance(v, GuidedProcessor)} == set(modules)
        assert procs["transformer_blocks.0.attn1.processor"] is attn1


def test_negative_is_t5_on_its_real_tokens_alone(t2v):
    """Without padding: exactly T5 over the negative's tokens (eos included). LTX runs T5 without its mask, so the
    real tokens of a padded encoding differ (they saw the padding): the negative is not cut from one."""
    text = "a dark and blurry photo"
    cond = LTXAdapter(t2v).encode_negative(text, encode_call(t2v), padded=False)
    n = real_tokens(t2v, text)
    assert cond.embeds.shape[:2] == (1, n) and cond.mask is None and n < MSL
    ids = torch.tensor([t2v.tokenizer(text).input_ids])
    with torch.no_grad():
        alone = t2v.text_encoder(ids).last_hidden_state
        padded = t2v.encode_prompt(text, do_classifier_free_guidance=False, max_sequence_length=MSL)[0]
    torch.testing.assert_close(cond.embeds, alone, atol=1e-5, rtol=0)
    assert (padded[:, :n] - alone).abs().max() > 1e-3


def test_padded_negative_is_the_pipelines_own(t2v):
    cond = LTXAdapter(t2v).encode_negative(NEG, encode_call(t2v), padded=True)
    own = t2v.encode_prompt(PROMPT, do_classifier_free_guidance=True, negative_prompt=NEG, max_sequence_length=MSL)
    assert torch.equal(cond.embeds, own[2]) and torch.equal(cond.mask, own[3].bool())
    assert cond.embeds.shape[1] == MSL


# ---------------------------------------------------------------------------- one attention call, float64


def _attention64(q, k, v, scale, key_mask=None):
    logits = (q @ k.transpose(-1, -2)) * scale
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], -math.inf)
    return torch.softmax(logits, dim=-1) @ v, torch.logsumexp(logits, dim=-1)


def reference_vsf(attn, hidden, context, p, alpha, beta, pos_mask, neg_mask):
    """Float64 VSF on the cross layout, from the weights: q/k RMS-normed across all heads, then
    Z = W Z+ - alpha (1 - W) Z-, W = A+ / (A+ + e^-beta A-), the prompt's and the negatives' padding excluded."""

    def lin(layer, x):
        return x @ layer.weight.T + (0 if layer.bias is None else layer.bias)

    def rms(norm, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight

    def split(x):
        return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

    q = split(rms(attn.norm_q, lin(attn.to_q, hidden)))
    k, v = split(rms(attn.norm_k, lin(attn.to_k, context))), split(lin(attn.to_v, context))
    scale = 1 / math.sqrt(q.shape[-1])
    z_pos, lse_pos = _attention64(q, k[:, :, :p], v[:, :, :p], scale, pos_mask)
    z_neg, lse_neg = _attention64(q, k[:, :, p:], v[:, :, p:], scale, neg_mask)
    w = torch.sigmoid(lse_pos - (lse_neg - beta))[..., None]
    z = (w * z_pos - alpha * (1 - w) * z_neg).transpose(1, 2).flatten(2, 3)
    return lin(attn.to_out[0], z)


def _guided(pipe, attn, p, n, pos_mask, neg_mask, **params):
    return guided_one_negative(pipe, LTXAdapter, attn, p, n, pos_mask, neg_mask, **params)


def _bias(mask, dtype):
    """The transformer's own conversion of a 2-D mask (transformer_ltx.py): (1 - mask) * -10000, (B, 1, L)."""
    return ((1 - mask.to(dtype)) * -10000.0)[:, None]


def _call_inputs(attn, p, n, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 9, attn.query_dim, generator=gen, dtype=dtype)
    context = torch.randn(2, p + n, attn.cross_attention_dim, generator=gen, dtype=dtype)
    pos_mask = torch.tensor([[True] * p, [True] * (p - 3) + [False] * 3])  # row 1: a padded prompt
    neg_mask = torch.tensor([[True] * n, [True] * (n - 2) + [False] * 2])  # row 1: a shorter negative
    return hidden, context, pos_mask, neg_mask


def _perturbed(attn, seed=1):
    attn = copy.deepcopy(attn).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in attn.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    return attn


@pytest.mark.parametrize("path", ["dense", "split"])
@pytest.mark.parametrize(("alpha", "beta"), [(3.0, 0.1), (0.5, 2.0)])
def test_processor_matches_float64_closed_form(t2v, path, alpha, beta):
    """The guided attn2 call (the model's -10000 bias over [P; N] given, as the blocks pass it) equals the closed
    form with the prompt's and the negative's padding excluded."""
    attn = _perturbed(t2v.transformer.transformer_blocks[0].attn2)
    p, n = 6, 4
    hidden, context, pos_mask, neg_mask = _call_inputs(attn, p, n, seed=2)
    bias = _bias(torch.cat([pos_mask, neg_mask], dim=1), torch.float64)
    proc = _guided(t2v, attn, p, n, pos_mask, neg_mask, scale=alpha, bias=beta, attention=path)
    with torch.no_grad():
        got = proc(attn, hidden, context, bias, None)  # positional, as LTXAttention.forward calls its processor
    want = reference_vsf(attn, hidden, context, p, alpha, beta, pos_mask, neg_mask)
    # the dense oracle builds its bias mask in float32 (beta = 0.1 is rounded); the split path merges in float32
    torch.testing.assert_close(got, want, atol=1e-8 if path == "dense" else 1e-5, rtol=0)


def test_infinite_bias_call_equals_the_original_with_the_models_bias(t2v):
    """With the negative masked out, the guided call is the original processor over P with the model's own
    -10000 padding bias (the core's boolean mask gives the same numbers)."""
    attn = copy.deepcopy(t2v.transformer.transformer_blocks[1].attn2)
    p, n = 5, 3
    hidden, context, pos_mask, neg_mask = _call_inputs(attn, p, n, seed=3, dtype=torch.float32)
    proc = _guided(t2v, attn, p, n, pos_mask, neg_mask, bias=math.inf)
    with torch.no_grad():
        got = proc(attn, hidden, context, _bias(torch.cat([pos_mask, neg_mask], 1), torch.float32))
        want = attn.processor(attn, hidden, context[:, :p], _bias(pos_mask, torch.float32))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_bias_of_another_length_is_refused(t2v):
    attn = copy.deepcopy(t2v.transformer.transformer_blocks[0].attn2)
    p, n = 5, 3
    hidden, context, pos_mask, neg_mask = _call_inputs(attn, p, n, seed=4, dtype=torch.float32)
    proc = _guided(t2v, attn, p, n, pos_mask, neg_mask)
    with pytest.raises(NegGuideError, match="bias over the 8 text tokens"):
        proc(attn, hidden, context, _bias(pos_mask, torch.float32))


# ---------------------------------------------------------------------------- a 32k-token call under a memory cap

MEMORY_SCRIPT = r"""
import json, math, resource, sys
import torch
from negguide.adapter import TextLayout
from negguide.adapters.ltx import LTXAdapter
from negguide.installation import Forward, Installation, guided_processor
from negguide.negatives import NegativeSpec
from negguide.registry import get_method

n_video, p, n, budget = (int(a) for a in sys.argv[1:])
torch.set_num_threads(1)


class Attn(torch.nn.Module):  # LTXAttention's parts (diffusers' import alone would take longer than the call)
    def __init__(self, dim):
        super().__init__()
        self.heads = 1
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(dim, dim) for _ in range(3))
        self.norm_q, self.norm_k = torch.nn.RMSNorm(dim, eps=1e-5), torch.nn.RMSNorm(dim, eps=1e-5)
        self.to_out = torch.nn.ModuleList([torch.nn.Linear(dim, dim), torch.nn.Dropout(0.0)])


class LTXVideoAttnProcessor:  # the signature the guided processor mirrors
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        raise AssertionError("the original processor must not run in a guided call")


torch.manual_seed(0)
attn = Attn(16).eval()
gen = torch.Generator().manual_seed(1)
hidden = torch.randn(1, n_video, 16, generator=gen)
context = torch.randn(1, p + n, 16, generator=gen)
pos_mask = torch.tensor([[True] * (p - 4) + [False] * 4])  # the prompt's padding
bias = ((1 - torch.cat([pos_mask, torch.ones(1, n, dtype=torch.bool)], 1).float()) * -10000.0)[:, None]
vsf = get_method("vsf")
procs = {}
for path in ("split", "dense"):
    method = vsf(vsf.make_config({"scale": 3.0, "bias": 0.1, "attention": path}))
    inst = Installation(None, LTXAdapter(None), method, [NegativeSpec("x")])
    inst.forward = Forward(slice(0, 1), TextLayout(p, p + n), ((p, p + n),), (None,), (1.0,), pos_mask, None)
    procs[path] = guided_processor(inst, LTXVideoAttnProcessor(), 0, 1)
with torch.no_grad():
    for proc in procs.values():  # warm up: thread pools and allocator arenas exist before the cap
        proc(attn, hidden[:, :64], context, bias, None)


cap_address_space(budget)
result = {}
rows = torch.tensor([0, 1, n_video // 2, n_video - 1])
with torch.no_grad():
    q = attn.norm_q(attn.to_q(hidden[0, rows])).double()
    k = attn.norm_k(attn.to_k(context[0])).double()
    v = attn.to_v(context[0]).double()
    logits = q @ k.T / 4.0
    logits[:, :p][:, ~pos_mask[0]] = -math.inf
    logits[:, p:] -= 0.1
    ref = torch.softmax(logits, -1) @ torch.cat([v[:p], -3.0 * v[p:]])
    ref = ref @ attn.to_out[0].weight.double().T + attn.to_out[0].bias.double()
    for path, proc in procs.items():
        rss0 = peak_rss()
        out = proc(attn, hidden, context, bias, None)
        result[path + "_rss_growth"] = peak_rss() - rss0
        result[path + "_shape"] = list(out.shape)
        result[path + "_max_err"] = (out[0, rows].double() - ref).abs().max().item()
        del out
print(json.dumps(result))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs RLIMIT_AS and /proc (Linux)")
def test_a_32k_token_guided_call_fits_in_linear_memory():
    """One guided attn2 call through the adapter's processor at 32,768 video tokens, in a subprocess capped at what
    it uses plus 2 GiB: an L x L float32 matrix (4.3 GB) could not even be allocated. Both paths stay O(L) (the
    cross layout's mask is L x (P + N)), grow far less than that, and sampled rows equal a float64 reference."""
    n_video, p, n, budget = 32_768, 32, 8, 2 * 1024**3
    assert n_video * n_video * 4 > budget
    result = run_capped(MEMORY_SCRIPT, n_video, p, n, budget)
    for path in ("split", "dense"):
        assert result[f"{path}_shape"] == [1, n_video, 16]
        assert result[f"{path}_rss_growth"] < 256 * 1024**2, result
        assert result[f"{path}_max_err"] < 1e-4, result


# ---------------------------------------------------------------------------- refusals


def test_custom_processors_are_refused(t2v):
    before = dict(t2v.transformer.attn_processors)
    attn = t2v.transformer.transformer_blocks[1].attn2
    try:
        attn.set_processor(type("MyProcessor", (), {"__call__": lambda self, attn, h, e=None, m=None, r=None: h})())
        with pytest.raises(NoAdapterError, match=r"got MyProcessor.*LTXVideoAttnProcessor"):
            negguide.apply(t2v, "nag", negative_prompt=NEG)
    finally:
        t2v.transformer.set_attn_processor(dict(before))
    assert applied(t2v) is None and t2v.transformer.attn_processors == before


def test_a_3d_mask_given_to_the_transformer_is_refused(t2v):
    text, mask = t2v.encode_prompt(PROMPT, do_classifier_free_guidance=False, max_sequence_length=MSL)[:2]
    inputs = {"hidden_states": torch.randn(1, 48, 8), "timestep": torch.tensor([500]),
              "encoder_hidden_states": text, "encoder_attention_mask": _bias(mask, torch.float32),
              "num_frames": 3, "height": 4, "width": 4}  # fmt: skip
    with negguide.apply(t2v, "vsf", negative_prompt=NEG):
        t2v.encode_prompt(PROMPT, do_classifier_free_guidance=False, max_sequence_length=MSL)
        with pytest.raises(NegGuideError, match=r"as a \(rows, tokens\) mask"):
            t2v.transformer(**inputs)
    assert applied(t2v) is None


# ---------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("kind", ["t2v", "i2v", "cond"])
def test_attn2_sees_p_then_the_unpadded_negative_and_bias_inf_is_unguided(kind, request):
    pipe = request.getfixturevalue(kind)
    base = run(pipe)
    n = real_tokens(pipe, NEG)
    with negguide.apply(pipe, "vsf", negative_prompt=NEG, bias=math.inf):
        with ContextSpy(pipe.transformer) as spy:
            close(run(pipe), base)
    assert spy.lengths == [MSL + n] * 2 and spy.biases == [(1, 1, MSL + n)] * 2  # the model's bias: joined length
    for method in ("vsf", "nag", "nasa"):
        with negguide.apply(pipe, method, negative_prompt=NEG):
            assert differs(run(pipe), base), method


@pytest.mark.parametrize("kind", ["t2v", "i2v", "cond"])
def test_cfg_equals_the_pipelines_own_cfg(kind, request):
    """Image-to-video's per-token timestep and the condition pipeline's video_coords ride along into the negative
    branch; VSF beside the pipeline's own CFG guides its conditional half only."""
    pipe = request.getfixturevalue(kind)
    base = run(pipe)
    own = run(pipe, guidance_scale=3.0, negative_prompt=NEG)
    with negguide.apply(pipe, "cfg", negative_prompt=NEG, scale=3.0):
        close(run(pipe), own)
    assert differs(own, base)
    with negguide.apply(pipe, "vsf", negative_prompt="ugly", bias=math.inf):
        close(run(pipe, guidance_scale=3.0, negative_prompt=NEG), own)


def test_distilled_few_step_use(cond):
    """The distilled 13B recipe: LTXConditionPipeline with CFG off (guidance_scale=1) and a short list of
    timesteps: one forward per step, each guided; bias=inf is unguided, the methods act."""
    kw = {"timesteps": [1000, 981, 725], "num_inference_steps": None, "guidance_scale": 1.0,
          "decode_timestep": 0.05, "decode_noise_scale": 0.025, "image_cond_noise_scale": 0.0}  # fmt: skip
    base = run(cond, **kw)
    n = real_tokens(cond, NEG)
    with negguide.apply(cond, "vsf", negative_prompt=NEG, bias=math.inf):
        with ContextSpy(cond.transformer) as spy:
            close(run(cond, **kw), base)
    assert spy.lengths == [MSL + n] * 3  # one forward per timestep, no CFG batch
    for method in ("vsf", "nag", "nasa"):
        with negguide.apply(cond, method, negative_prompt=NEG):
            out = run(cond, **kw)
        assert np.isfinite(out).all() and differs(out, base), method


def test_long_multi_prompt_pipeline(t2v):
    """LTXI2VLongMultiPromptPipeline encodes one prompt per temporal window (and shares one video_coords row):
    every window is guided, bias=inf is unguided, CFG equals the pipeline's own."""
    from diffusers import LTXI2VLongMultiPromptPipeline

    pipe = LTXI2VLongMultiPromptPipeline(**t2v.components)
    pipe.set_progress_bar_config(disable=True)
    kw = {"height": 64, "width": 64, "num_frames": 17, "temporal_tile_size": 8, "temporal_overlap": 4,
          "num_inference_steps": 2, "max_sequence_length": MSL, "output_type": "latent"}  # fmt: skip

    def go(**extra):
        return pipe(prompt="a cat | a dog", generator=torch.Generator().manual_seed(0), **{**kw, **extra}).frames

    base = go()
    with negguide.apply(pipe, "vsf", negative_prompt=NEG, bias=math.inf):
        with ContextSpy(pipe.transformer) as spy:
            close(go(), base)
    assert len(spy.lengths) >= 2 and set(spy.lengths) == {MSL + real_tokens(pipe, NEG)}
    with negguide.apply(pipe, "vsf", negative_prompt=NEG):
        assert differs(go(), base)
    own = go(guidance_scale=3.0, negative_prompt=NEG)
    with negguide.apply(pipe, "cfg", negative_prompt=NEG, scale=3.0):
        close(go(), own)


def test_negative_prompt_embeds_act_like_the_text(t2v):
    n = real_tokens(t2v, NEG)
    with torch.no_grad():
        alone = t2v.encode_prompt(NEG, do_classifier_free_guidance=False, max_sequence_length=n)[0]
        padded, mask = t2v.encode_prompt(NEG, do_classifier_free_guidance=False, max_sequence_length=MSL)[:2]
    with negguide.apply(t2v, "vsf", negative_prompt=NEG):
        text = run(t2v)
    with negguide.apply(t2v, "vsf", negative_prompt_embeds=alone):
        close(run(t2v), text)
    # a padded encoding with its mask: the padding is hidden, the real tokens are the padded encoding's
    with negguide.apply(t2v, "vsf", negative_prompt_embeds={"prompt_embeds": padded, "prompt_attention_mask": mask}):
        masked = run(t2v)
    with negguide.apply(t2v, "vsf", negative_prompt_embeds=padded[:, :n]):
        close(run(t2v), masked)
    own = run(t2v, guidance_scale=3.0, negative_prompt=NEG)
    for given in (padded[:, :n], {"prompt_embeds": padded, "prompt_attention_mask": mask}):
        with negguide.apply(t2v, "cfg", negative_prompt_embeds=given, scale=3.0):
            close(run(t2v), own)
    with negguide.apply(t2v, "vsf", negative_prompt_embeds=torch.zeros(1, 3, 7)):
        with pytest.raises(NegativePromptError, match=r"\(rows, tokens, 32\)"):
            run(t2v)


def test_no_family_defaults():
    """No published LTX-Video values: every method keeps its own defaults (untuned)."""
    from negguide.registry import family_defaults

    for name in ("vsf", "nag", "nasa", "cfg"):
        assert family_defaults(get_method(name), "ltx") == {}


# ---------------------------------------------------------------------------- the conformance kit

CASE = testing.Case(build=build, call=tiny.CALL_KWARGS["ltx"], output="frames",
                    pipeline_cfg={"guidance_scale": 3.0, "negative_prompt": "ugly"})  # fmt: skip
COND_CASE = testing.Case(build=functools.partial(build, kind="condition"), call=tiny.CALL_KWARGS["ltx"],
                         output="frames", pipeline_cfg={"guidance_scale": 3.0, "negative_prompt": "ugly"})  # fmt: skip


@pytest.mark.parametrize("check", sorted(testing.CHECKS))
def test_conformance(check):
    """The adapter passes every check of negguide.testing on the tiny LTX text-to-video pipeline."""
    testing.CHECKS[check](CASE)


@pytest.mark.parametrize("check", ["batch_equals_separate_calls", "several_negatives", "vsf_infinite_bias_is_unguided"])
def test_conformance_condition_pipeline(check):
    """LTXConditionPipeline (per-token timesteps, video_coords) through the kit's batching and weighting checks."""
    testing.CHECKS[check](COND_CASE)
