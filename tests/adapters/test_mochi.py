"""The Mochi adapter on a tiny offline ``MochiPipeline``.

Numbers are checked against the unpatched pipeline (its own CFG, unguided runs), against T5 on the real tokens, or
against an independent float64 evaluation of the paper's mask table over explicit keys (rotary embedding, the
prompt's padding and the asymmetric text projections included).
"""

from __future__ import annotations

import copy
import inspect
import math
import sys
import types

import numpy as np
import pytest
import torch

import negguide
from negguide import testing
from negguide import tiny
from negguide.adapter import EncodeCall
from negguide.adapter import TextLayout
from negguide.adapters.mochi import MochiAdapter
from negguide.errors import NegativePromptError
from negguide.errors import NegGuideError
from negguide.errors import NoAdapterError
from negguide.installation import GuidedProcessor
from negguide.installation import attention_processors
from negguide.registry import adapter_for
from negguide.registry import get_method
from negguide.tiny.families.mochi import build
from tests.adapters.helpers import differs
from tests.adapters.helpers import guided_one_negative
from tests.adapters.helpers import real_tokens
from tests.memcap import run_capped

#: the tiny call without the VAE decode (the decoder dominates a tiny call, most of all in bfloat16, and never sees the
#: guidance); ``test_decoded_frames`` runs the decode
CALL = {"num_inference_steps": 2, **tiny.CALL_KWARGS["mochi"], "output_type": "latent"}
MSL = CALL["max_sequence_length"]
PROMPT, NEG = "a red cube on a table", "snow, blurry"


@pytest.fixture(scope="module")
def pipe():
    return build()


def run(pipe, prompt=PROMPT, seed=0, **kwargs):
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), **{**CALL, **kwargs}).frames


def close(a, b, atol=2e-5):
    np.testing.assert_allclose(a, b, atol=atol, rtol=0)


def encode_call(pipe, **arguments):
    """An ``EncodeCall`` as the installation makes it for ``encode_prompt(PROMPT, **arguments)``."""
    kw = {"device": torch.device("cpu"), "num_videos_per_prompt": 1, "do_classifier_free_guidance": False,
          "max_sequence_length": MSL, **arguments}  # fmt: skip
    output = pipe.encode_prompt(PROMPT, **kw)
    bound = inspect.signature(pipe.encode_prompt).bind(PROMPT, **kw)
    bound.apply_defaults()
    return EncodeCall(dict(bound.arguments), output, 1, 1, torch.device("cpu"), torch.float32, pipe.encode_prompt)


# ---------------------------------------------------------------------------- facts


def test_adapter_resolves(pipe):
    assert adapter_for(pipe) is MochiAdapter
    assert negguide.get_adapter(pipe.transformer) is MochiAdapter
    assert MochiAdapter.layout == "joint" and MochiAdapter.pipeline_cfg == "batched"
    assert MochiAdapter.text_mask_input == "encoder_attention_mask"
    assert not MochiAdapter.matches(torch.nn.Linear(2, 2))


def test_every_attn1_is_guided_and_the_text_stream_is_narrower(pipe):
    transformer = pipe.transformer
    modules = MochiAdapter(pipe).attention_modules(transformer)
    assert modules == {f"transformer_blocks.{i}.attn1.processor": i for i in range(2)}
    attn = transformer.transformer_blocks[0].attn1
    assert attn.add_k_proj.in_features == transformer.config.pooled_projection_dim < attn.to_k.in_features
    assert not hasattr(transformer.transformer_blocks[1].attn1, "to_add_out")  # the last block: context_pre_only


def test_only_attn1_processors_are_swapped(pipe):
    before = attention_processors(pipe.transformer)
    with negguide.apply(pipe, "vsf", negative_prompt=NEG):
        procs = attention_processors(pipe.transformer)
        assert set(procs) == set(before) and all(isinstance(p, GuidedProcessor) for p in procs.values())
    assert attention_processors(pipe.transformer) == before


def test_negative_is_t5_on_its_real_tokens(pipe):
    """Without padding: the pipeline's own (masked) T5 encoding cut to the real tokens, which is T5 over those
    tokens alone (its mask hides the padding)."""
    text = "a dark and blurry photo"
    cond = MochiAdapter(pipe).encode_negative(text, encode_call(pipe), padded=False)
    n = real_tokens(pipe, text)
    assert cond.embeds.shape[:2] == (1, n) and cond.mask is None and n < MSL
    with torch.no_grad():
        alone = pipe.text_encoder(torch.tensor([pipe.tokenizer(text).input_ids])).last_hidden_state
    torch.testing.assert_close(cond.embeds, alone, atol=1e-5, rtol=0)


def test_padded_negative_is_the_pipelines_own(pipe):
    cond = MochiAdapter(pipe).encode_negative(NEG, encode_call(pipe), padded=True)
    own = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=True, negative_prompt=NEG, max_sequence_length=MSL)
    assert torch.equal(cond.embeds, own[2]) and torch.equal(cond.mask, own[3].bool())


def test_time_embedding_pools_the_prompt_only(pipe):
    """The patched ``time_embed``: the conditioning vector is the unpatched one of the prompt alone (the pooler never
    sees a negative token), the text stream is ``caption_proj`` of every token."""
    embed = pipe.transformer.time_embed
    gen = torch.Generator().manual_seed(0)
    p, n = 6, 3
    text = torch.randn(2, p + n, 32, generator=gen)
    mask = torch.tensor([[True] * p + [True] * n, [True] * (p - 2) + [False] * 2 + [True] * n])
    forward = types.SimpleNamespace(text=TextLayout(p, p + n))
    t = torch.tensor([300.0, 300.0])
    with torch.no_grad():
        temb, caption = MochiAdapter(pipe).patched("time_embed.forward", embed.forward, forward, t, text, mask,
                                                   hidden_dtype=torch.float32)  # fmt: skip
        want_temb, want_caption = embed(t, text[:, :p], mask[:, :p], hidden_dtype=torch.float32)
        leaky, _ = embed(t, text, mask, hidden_dtype=torch.float32)
    assert torch.equal(temb, want_temb) and torch.equal(caption[:, :p], want_caption)
    torch.testing.assert_close(caption[:, p:], embed.caption_proj(text[:, p:]), atol=0, rtol=0)
    assert (leaky - want_temb).abs().max() > 1e-4  # the unpatched pooler would have seen the negatives


def test_no_family_defaults():
    """No published Mochi values: every method keeps its own defaults (untuned)."""
    from negguide.registry import family_defaults

    for name in ("vsf", "nag", "nasa", "cfg"):
        assert family_defaults(get_method(name), "mochi") == {}


# ---------------------------------------------------------------------------- one attention call, float64


def _perturbed(attn, seed=1):
    attn = copy.deepcopy(attn).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in attn.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    return attn


def reference_vsf(attn, hidden, context, rotary, p, alpha, beta, pos_mask, neg_mask):
    """Float64 VSF by the paper's mask table over explicit keys ``[I, P, N(0), N(1)]``: I sees I, P and the flipped
    copy N(1) (values * -alpha, logits - beta); P sees I, P; N(0) sees I, N(0); padding is never a key. Mochi's
    asymmetric projections, per-head RMS norms and the rotary embedding (as complex rotations of pairs) on the video
    tokens; masked text outputs zeroed before ``to_add_out``, as the processor does."""

    def lin(layer, x):
        return x @ layer.weight.T + (0 if layer.bias is None else layer.bias)

    def rms(norm, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight

    def split(x):
        return x.unflatten(-1, (attn.heads, -1))  # (B, L, H, D)

    def rope(x, cos, sin):
        z = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous()) * torch.complex(cos, sin)
        return torch.view_as_real(z).flatten(-2)

    cos, sin = (r.double() for r in rotary)
    qi = rope(rms(attn.norm_q, split(lin(attn.to_q, hidden))), cos, sin).transpose(1, 2)
    ki = rope(rms(attn.norm_k, split(lin(attn.to_k, hidden))), cos, sin).transpose(1, 2)
    vi = split(lin(attn.to_v, hidden)).transpose(1, 2)
    qt = rms(attn.norm_added_q, split(lin(attn.add_q_proj, context))).transpose(1, 2)
    kt = rms(attn.norm_added_k, split(lin(attn.add_k_proj, context))).transpose(1, 2)
    vt = split(lin(attn.add_v_proj, context)).transpose(1, 2)
    li, n = hidden.shape[1], context.shape[1] - p
    keys = torch.cat([ki, kt, kt[:, :, p:]], dim=2)  # [I, P, N(0), N(1)]
    values = torch.cat([vi, vt, -alpha * vt[:, :, p:]], dim=2)
    queries = torch.cat([qi, qt], dim=2)  # [I, P, N(0)]
    inf = -math.inf
    table = torch.zeros(2, li + p + n, li + p + 2 * n, dtype=torch.float64)
    for b in range(2):
        ii, pp, nn = slice(0, li), slice(li, li + p), slice(li + p, li + p + n)
        k_pos, k_n0, k_n1 = slice(li, li + p), slice(li + p, li + p + n), slice(li + p + n, None)
        table[b, ii, k_n0] = inf
        table[b, ii, k_n1] = -beta
        table[b, pp, k_n0] = inf
        table[b, pp, k_n1] = inf
        table[b, nn, k_pos] = inf
        table[b, nn, k_n1] = inf
        table[b, :, k_pos][:, ~pos_mask[b]] = inf  # padding is never a key
        padded = torch.cat([~pos_mask[b], ~neg_mask[b], ~neg_mask[b]])
        table[b, :, li:][:, padded] = inf
    out = torch.softmax(queries @ keys.transpose(-1, -2) / math.sqrt(qi.shape[-1]) + table[:, None], -1) @ values
    out = out.transpose(1, 2).flatten(2, 3)  # (B, L, H * D)
    img = lin(attn.to_out[0], out[:, :li])
    txt = out[:, li:] * torch.cat([pos_mask, neg_mask], 1)[..., None]
    return img, (lin(attn.to_add_out, txt) if hasattr(attn, "to_add_out") else txt)


def _guided(pipe, attn, p, n, pos_mask, neg_mask, **params):
    return guided_one_negative(pipe, MochiAdapter, attn, p, n, pos_mask, neg_mask, **params)


def _call_inputs(attn, p, n, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    li, heads, dim = 8, attn.heads, attn.to_q.out_features // attn.heads
    hidden = torch.randn(2, li, attn.to_q.in_features, generator=gen, dtype=dtype)
    context = torch.randn(2, p + n, attn.add_k_proj.in_features, generator=gen, dtype=dtype)
    angles = torch.randn(li, heads, dim // 2, generator=gen, dtype=torch.float32) * 2
    pos_mask = torch.tensor([[True] * p, [True] * (p - 3) + [False] * 3])  # row 1: a padded prompt
    neg_mask = torch.tensor([[True] * n, [True] * (n - 2) + [False] * 2])  # row 1: a shorter negative
    return hidden, context, (angles.cos(), angles.sin()), pos_mask, neg_mask


@pytest.mark.parametrize("block", [0, 1])
@pytest.mark.parametrize("path", ["dense", "split"])
@pytest.mark.parametrize(("alpha", "beta"), [(3.0, 0.1), (0.5, 2.0)])
def test_processor_matches_float64_mask_table(pipe, block, path, alpha, beta):
    """The guided attn1 call (keywords as MochiAttention passes them, the joined 2-D mask) equals the float64 mask
    table; block 1 is the last, ``context_pre_only`` one (text outputs not projected)."""
    attn = _perturbed(pipe.transformer.transformer_blocks[block].attn1)
    p, n = 6, 4
    hidden, context, rotary, pos_mask, neg_mask = _call_inputs(attn, p, n, seed=2 + block)
    proc = _guided(pipe, attn, p, n, pos_mask, neg_mask, scale=alpha, bias=beta, attention=path)
    with torch.no_grad():
        got = proc(attn, hidden_states=hidden, encoder_hidden_states=context,
                   attention_mask=torch.cat([pos_mask, neg_mask], 1), image_rotary_emb=rotary)  # fmt: skip
    want = reference_vsf(attn, hidden, context, rotary, p, alpha, beta, pos_mask, neg_mask)
    # Mochi's rotary embedding runs in float32 by design (the model's own `.float()`), the dense oracle builds its
    # bias mask in float32 and the split path merges in float32: float32 rounding of outputs of size ~10
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("block", [0, 1])
def test_infinite_bias_call_equals_the_original_processor(pipe, block):
    """With the flipped copy masked out, the video and prompt outputs are the model's own processor over
    ``[video, P]`` with the prompt's padding mask (it drops the padded tokens and zero-fills their outputs)."""
    attn = copy.deepcopy(pipe.transformer.transformer_blocks[block].attn1)
    p, n = 5, 3
    hidden, context, rotary, pos_mask, neg_mask = _call_inputs(attn, p, n, seed=5, dtype=torch.float32)
    proc = _guided(pipe, attn, p, n, pos_mask, neg_mask, bias=math.inf)
    with torch.no_grad():
        got = proc(attn, hidden, context, torch.cat([pos_mask, neg_mask], 1), rotary)
        want = attn.processor(attn, hidden, context[:, :p], pos_mask, rotary)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1][:, :p], want[1], atol=1e-5, rtol=0)


def test_a_mask_of_another_length_is_refused(pipe):
    attn = copy.deepcopy(pipe.transformer.transformer_blocks[0].attn1)
    p, n = 5, 3
    hidden, context, rotary, pos_mask, neg_mask = _call_inputs(attn, p, n, seed=4, dtype=torch.float32)
    proc = _guided(pipe, attn, p, n, pos_mask, neg_mask)
    with pytest.raises(NegGuideError, match=r"\(rows, 8\) text mask"):
        proc(attn, hidden, context, pos_mask, rotary)


def test_custom_processors_are_refused(pipe):
    attn = pipe.transformer.transformer_blocks[1].attn1
    original = attn.processor
    try:
        attn.processor = type("MyProcessor", (), {"__call__": lambda self, attn, h, e, m, r=None: (h, e)})()
        with pytest.raises(NoAdapterError, match=r"got MyProcessor.*MochiAttnProcessor2_0"):
            MochiAdapter(pipe).attention_modules(pipe.transformer)
    finally:
        attn.processor = original


# ---------------------------------------------------------------------------- a 32k-token call under a memory cap

MEMORY_SCRIPT = r"""
import json, math, resource, sys, warnings
import torch
from negguide.adapter import TextLayout
from negguide.adapters.mochi import MochiAdapter
from negguide.installation import Forward, Installation, guided_processor
from negguide.negatives import NegativeSpec
from negguide.registry import get_method

n_video, p, n, budget = (int(a) for a in sys.argv[1:])
torch.set_num_threads(1)
dim, text_dim = 16, 12


class Attn(torch.nn.Module):  # MochiAttention's parts, one head (diffusers' import would take longer than the call)
    def __init__(self):
        super().__init__()
        self.heads = 1
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (
            torch.nn.Linear(text_dim, dim, bias=False) for _ in range(3))
        self.norm_q, self.norm_k, self.norm_added_q, self.norm_added_k = (
            torch.nn.RMSNorm(dim, eps=1e-5) for _ in range(4))
        self.to_out = torch.nn.ModuleList([torch.nn.Linear(dim, dim), torch.nn.Dropout(0.0)])
        self.to_add_out = torch.nn.Linear(dim, text_dim)


class MochiAttnProcessor2_0:  # the signature the guided processor mirrors
    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb=None):
        raise AssertionError("the original processor must not run in a guided call")


torch.manual_seed(0)
attn = Attn().eval()
gen = torch.Generator().manual_seed(1)
hidden = torch.randn(1, n_video, dim, generator=gen)
context = torch.randn(1, p + n, text_dim, generator=gen)
angles = torch.randn(n_video, 1, dim // 2, generator=gen)
rotary = (angles.cos(), angles.sin())
pos_mask = torch.tensor([[True] * (p - 4) + [False] * 4])  # the prompt's padding
mask = torch.cat([pos_mask, torch.ones(1, n, dtype=torch.bool)], 1)
vsf = get_method("vsf")
procs = {}
for path in ("split", "dense"):
    method = vsf(vsf.make_config({"scale": 3.0, "bias": 0.1, "attention": path}))
    inst = Installation(None, MochiAdapter(None), method, [NegativeSpec("x")])
    inst.forward = Forward(slice(0, 1), TextLayout(p, p + n), ((p, p + n),), (None,), (1.0,), pos_mask, None)
    procs[path] = guided_processor(inst, MochiAttnProcessor2_0(), 0, 1)
with torch.no_grad():
    for proc in procs.values():  # warm up: thread pools and allocator arenas exist before the cap
        proc(attn, hidden[:, :64], context, mask, (rotary[0][:64], rotary[1][:64]))


cap_address_space(budget)
result = {}
rows = torch.tensor([0, 1, n_video // 2, n_video - 1])


def rope(x):  # complex rotation of pairs, float64
    turn = torch.complex(*(r[:, 0].double() for r in rotary))
    z = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous()) * turn
    return torch.view_as_real(z).flatten(-2)


with torch.no_grad():
    w = lambda layer: layer.weight.double()
    rms = lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    h, c = hidden[0].double(), context[0].double()
    q = rope(rms(h @ w(attn.to_q).T))[rows]  # the norms' weights are ones
    k = torch.cat([rope(rms(h @ w(attn.to_k).T)), rms(c @ w(attn.add_k_proj).T)])
    v = torch.cat([h @ w(attn.to_v).T, c[:p] @ w(attn.add_v_proj).T, -3.0 * (c[p:] @ w(attn.add_v_proj).T)])
    logits = q @ k.T / 4.0  # keys [I, P, N(1)]: the collector N(0) is never an image key
    logits[:, n_video : n_video + p][:, ~pos_mask[0]] = -math.inf
    logits[:, n_video + p :] -= 0.1
    ref = torch.softmax(logits, -1) @ v
    ref = ref @ w(attn.to_out[0]).T + attn.to_out[0].bias.double()
    for path, proc in procs.items():
        rss0 = peak_rss()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            img, txt = proc(attn, hidden, context, mask, rotary)
        result[path + "_rss_growth"] = peak_rss() - rss0
        result[path + "_shapes"] = [list(img.shape), list(txt.shape)]
        result[path + "_max_err"] = (img[0, rows].double() - ref).abs().max().item()
        result[path + "_warning"] = " ".join(str(w.message) for w in caught)
        del img, txt
print(json.dumps(result))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs RLIMIT_AS and /proc (Linux)")
def test_a_32k_token_guided_call_fits_in_linear_memory():
    """One guided attn1 call through the adapter's processor at 32,768 video tokens in the joint layout, in a
    subprocess capped at what it uses plus 2 GiB: an L x L float32 matrix (4.3 GB) could not even be allocated. The
    split path (and a dense request, which the core runs split on a sequence this long) grows far less than that,
    and sampled video rows equal a float64 reference (rotary embedding, padding and the flipped copy included)."""
    n_video, p, n, budget = 32_768, 16, 6, 2 * 1024**3
    assert n_video * n_video * 4 > budget
    result = run_capped(MEMORY_SCRIPT, n_video, p, n, budget)
    for path in ("split", "dense"):
        assert result[f"{path}_shapes"] == [[1, n_video, 16], [1, p + n, 12]]
        assert result[f"{path}_rss_growth"] < 256 * 1024**2, result
        assert result[f"{path}_max_err"] < 1e-4, result
    assert "split" in result["dense_warning"], result


# ---------------------------------------------------------------------------- end to end


def test_blocks_see_p_then_the_unpadded_negative_and_bias_inf_is_unguided(pipe):
    base = run(pipe)
    n = real_tokens(pipe, NEG)
    lengths = []
    hook = pipe.transformer.transformer_blocks[0].attn1.register_forward_pre_hook(
        lambda m, a, kw: lengths.append((kw["encoder_hidden_states"].shape[1], kw["attention_mask"].shape[1])),
        with_kwargs=True,
    )
    try:
        with negguide.apply(pipe, "vsf", negative_prompt=NEG, bias=math.inf):
            close(run(pipe), base)
    finally:
        hook.remove()
    assert lengths == [(MSL + n, MSL + n)] * 2
    for method in ("vsf", "nag", "nasa"):
        with negguide.apply(pipe, method, negative_prompt=NEG):
            assert differs(run(pipe), base), method


def test_decoded_frames(pipe):
    """The whole pipeline with the tiny VAE's decode: bias=inf is unguided, VSF changes the frames."""
    base = run(pipe, output_type="np")
    assert base.shape == (1, 7, 32, 32, 3)
    with negguide.apply(pipe, "vsf", negative_prompt=NEG, bias=math.inf):
        close(run(pipe, output_type="np"), base)
    with negguide.apply(pipe, "vsf", negative_prompt=NEG):
        assert differs(run(pipe, output_type="np"), base)


def test_cfg_equals_the_pipelines_own_cfg(pipe):
    """Prediction level (no attention processor swapped: runs on today's core too)."""
    base = run(pipe)
    own = run(pipe, guidance_scale=4.5, negative_prompt=NEG)
    with negguide.apply(pipe, "cfg", negative_prompt=NEG, scale=4.5):
        close(run(pipe), own)
    assert differs(own, base)


def test_vsf_beside_the_pipelines_own_cfg(pipe):
    own = run(pipe, guidance_scale=4.5, negative_prompt=NEG)
    with negguide.apply(pipe, "vsf", negative_prompt="ugly", bias=math.inf):
        close(run(pipe, guidance_scale=4.5, negative_prompt=NEG), own)


def test_cfg_with_prompt_embeds_of_another_length(pipe):
    """Given prompt embeddings (24 tokens, the call's max_sequence_length 32): CFG encodes the negative at the
    prompt's length, as the pipeline needs its own negative beside it."""
    pe, pm = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False, max_sequence_length=24)[:2]
    ne, nm = pipe.encode_prompt(NEG, do_classifier_free_guidance=False, max_sequence_length=24)[:2]
    given = {"prompt": None, "prompt_embeds": pe, "prompt_attention_mask": pm}
    own = run(pipe, **given, guidance_scale=4.5, negative_prompt_embeds=ne, negative_prompt_attention_mask=nm)
    with negguide.apply(pipe, "cfg", negative_prompt=NEG, scale=4.5):
        close(run(pipe, **given), own)


def test_force_zeros_for_empty_prompt(pipe):
    """``force_zeros_for_empty_prompt``: the pipeline's own empty negative is all-masked zeros (the unconditional row
    attends to the video only); VSF beside that CFG guides the conditional row, bias=inf is the pipeline's own."""
    from diffusers import MochiPipeline

    zeros = MochiPipeline(**pipe.components, force_zeros_for_empty_prompt=True)
    zeros.set_progress_bar_config(disable=True)
    own = run(zeros, guidance_scale=4.5)
    assert differs(own, run(pipe, guidance_scale=4.5))  # the option acts
    with negguide.apply(zeros, "vsf", negative_prompt=NEG, bias=math.inf):
        close(run(zeros, guidance_scale=4.5), own)
    with negguide.apply(zeros, "vsf", negative_prompt=NEG):
        guided = run(zeros, guidance_scale=4.5)
    assert np.isfinite(guided).all() and differs(guided, own)


def test_videos_per_prompt(pipe):
    base = run(pipe, num_videos_per_prompt=2, seed=3)
    with negguide.apply(pipe, "vsf", negative_prompt=NEG, bias=math.inf):
        close(run(pipe, num_videos_per_prompt=2, seed=3), base)
    with negguide.apply(pipe, "vsf", negative_prompt=NEG):
        out = run(pipe, num_videos_per_prompt=2, seed=3)
    assert out.shape == base.shape and differs(out[:1], base[:1]) and differs(out[1:], base[1:])


def test_negative_prompt_embeds_act_like_the_text(pipe):
    n = real_tokens(pipe, NEG)
    with torch.no_grad():
        padded, mask = pipe.encode_prompt(NEG, do_classifier_free_guidance=False, max_sequence_length=MSL)[:2]
    with negguide.apply(pipe, "vsf", negative_prompt=NEG):
        text = run(pipe)
    with negguide.apply(pipe, "vsf", negative_prompt_embeds=padded[:, :n]):
        close(run(pipe), text)
    with negguide.apply(pipe, "vsf", negative_prompt_embeds={"prompt_embeds": padded, "prompt_attention_mask": mask}):
        close(run(pipe), text)
    own = run(pipe, guidance_scale=3.0, negative_prompt=NEG)
    for given in (padded[:, :n], {"prompt_embeds": padded, "prompt_attention_mask": mask}):
        with negguide.apply(pipe, "cfg", negative_prompt_embeds=given, scale=3.0):
            close(run(pipe), own)
    with negguide.apply(pipe, "vsf", negative_prompt_embeds=torch.zeros(1, 3, 7)):
        with pytest.raises(NegativePromptError, match=r"\(rows, tokens, 32\)"):
            run(pipe)


# ---------------------------------------------------------------------------- the conformance kit

CASE = testing.Case(build=build, call={**tiny.CALL_KWARGS["mochi"], "output_type": "latent"}, output="frames",
                    pipeline_cfg={"guidance_scale": 4.5, "negative_prompt": "ugly"})  # fmt: skip


@pytest.mark.parametrize("check", sorted(testing.CHECKS))
def test_conformance(check):
    """The adapter passes every check of negguide.testing on the tiny Mochi pipeline."""
    testing.CHECKS[check](CASE)
