"""CogVideoX adapter on tiny offline pipelines: T2V (2b-like sinusoidal positions, 5b-like rotary), I2V (learned and
rotary positions), V2V and Fun control.

Numbers are checked against the unpatched pipelines (their own CFG, unguided runs) or against independent
re-implementations: the joined embedding of the negatives (text projection and text positions), and a float64
guided attention call (the paper's mask table over explicit keys ``[P, N(0), I, N(1)]``, rotary embedding on the
video tokens only).
"""

from __future__ import annotations

import copy
import functools
import math
import sys

import numpy as np
import pytest
import torch

import negguide
from negguide import testing
from negguide import tiny
from negguide.adapter import EncodeCall
from negguide.adapter import TextLayout
from negguide.adapters.cogvideox import CogVideoXAdapter
from negguide.errors import ConfigError
from negguide.errors import NegativePromptError
from negguide.errors import NoAdapterError
from negguide.installation import Forward
from negguide.installation import GuidedProcessor
from negguide.installation import Installation
from negguide.installation import guided_processor
from negguide.negatives import NegativeSpec
from negguide.registry import adapter_for
from negguide.registry import family_defaults
from negguide.registry import get_method
from tests.memcap import run_capped

CALL = {"num_inference_steps": 2, "guidance_scale": 1.0, **tiny.CALL_KWARGS["cogvideox"]}
CFG = {"guidance_scale": 3.0, "negative_prompt": "ugly"}
PROMPT, NEG = "a cat on a mat", "snow"


def run(pipe, prompt=PROMPT, seed=0, **kw):
    with torch.no_grad():
        out = pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), **{**CALL, **kw}).frames
    return out.double().numpy() if isinstance(out, torch.Tensor) else np.asarray(out, dtype=np.float64)


def num_tokens(pipe, text):
    return len(pipe.tokenizer(text).input_ids)


def close(got, want, atol=2e-5):
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)


def differs(got, want, by=1e-3):
    return float(np.abs(got - want).max()) > by


@pytest.fixture(scope="module")
def pipe():
    return tiny.cogvideox()


@pytest.fixture(scope="module")
def i2v():
    return tiny.cogvideox(pipeline="i2v")


@pytest.fixture(scope="module")
def image():
    from PIL import Image

    return Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8))


def call_kwargs(kind, image):
    """A quick call of each pipeline kind (latents: the tiny random VAE squashes differences)."""
    kw = {**CALL, "output_type": "latent"}
    if kind == "i2v":
        kw["image"] = image
    elif kind == "v2v":
        kw.update(video=[image] * 9, strength=1.0)
    elif kind == "fun-control":
        kw["control_video"] = [image] * 9
    if kind in ("v2v", "fun-control"):  # the frames come from the video
        del kw["num_frames"]
    return kw


def run_kind(p, kind, image, **kw):
    with torch.no_grad():
        out = p(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **{**call_kwargs(kind, image), **kw})
    return out.frames.double().numpy()


# ---------------------------------------------------------------------------- facts


def test_adapter_resolves(pipe, i2v):
    assert adapter_for(pipe) is CogVideoXAdapter and adapter_for(i2v) is CogVideoXAdapter
    assert negguide.get_adapter(pipe.transformer) is CogVideoXAdapter
    assert CogVideoXAdapter.family == "cogvideox" and CogVideoXAdapter.layout == "joint"
    assert CogVideoXAdapter.pipeline_cfg == "batched"
    assert not CogVideoXAdapter.matches(torch.nn.Linear(2, 2))
    modules = CogVideoXAdapter(pipe).attention_modules(pipe.transformer)
    assert modules == {"transformer_blocks.0.attn1.processor": 0, "transformer_blocks.1.attn1.processor": 1}
    assert CogVideoXAdapter.defaults == {}  # untuned
    for name in ("vsf", "nag", "nasa", "cfg"):
        assert family_defaults(get_method(name), "cogvideox") == {}


def test_other_processors_are_refused():
    from diffusers.models.attention_processor import AttnProcessor2_0

    p = tiny.cogvideox(num_layers=1)
    p.transformer.set_attn_processor(AttnProcessor2_0())
    with pytest.raises(NoAdapterError, match="expected CogVideoXAttnProcessor2_0 in block 0, got AttnProcessor2_0"):
        CogVideoXAdapter(p).attention_modules(p.transformer)


def _call(pipe, msl=16):
    args = {"prompt": PROMPT, "max_sequence_length": msl}
    return EncodeCall(args, None, 1, 1, torch.device("cpu"), torch.float32, pipe.encode_prompt)


def test_negative_encoded_without_padding(pipe):
    """The negative is T5 over its real tokens only (eos included); the pipeline's padded encoding, which T5 runs
    without a mask, lets every real token attend to the padding: it differs."""
    text = "dark sky"
    ids = pipe.tokenizer(text).input_ids
    got = CogVideoXAdapter(pipe).encode_negative(text, _call(pipe), padded=False).embeds
    with torch.no_grad():
        want = pipe.text_encoder(torch.tensor([ids]))[0]
    assert got.shape == (1, len(ids), 32) and len(ids) < 16
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    padded = pipe.encode_prompt(text, do_classifier_free_guidance=False, max_sequence_length=16)[0]
    assert (padded[:, : len(ids)] - got).abs().max() > 1e-4
    cfg = CogVideoXAdapter(pipe).encode_negative(text, _call(pipe), padded=True).embeds
    torch.testing.assert_close(cfg, padded, atol=0, rtol=0)  # CFG: exactly the pipeline's own negative


def test_negative_prompt_embeds_format(pipe):
    adapter = CogVideoXAdapter(pipe)
    assert adapter.negative_from_embeds(torch.zeros(1, 3, 32), _call(pipe), False).embeds.shape == (1, 3, 32)
    with pytest.raises(NegativePromptError, match=r"\(rows, tokens, 32\) tensor of T5 embeddings, got \(1, 3, 8\)"):
        adapter.negative_from_embeds(torch.zeros(1, 3, 8), _call(pipe), False)


# ---------------------------------------------------------------------------- the joined embedding


@pytest.mark.parametrize("kind", ["t2v", "t2v-rope", "i2v", "i2v-other-frames"])
def test_negatives_embedded_as_text_at_their_own_positions(kind, image):
    """patch_embed's output is [P, N_1, N_2, video]: P and the video exactly as unpatched (positions included), each
    negative's token j = text_proj(token) + the text positional embedding of a prompt's token j (2b: zero;
    5b-I2V: the learned table's row j at its trained frame count, zero at another, where diffusers swaps the table
    for sinusoidal positions; 5b: none)."""
    other_frames = kind == "i2v-other-frames"
    kind = "i2v" if other_frames else kind
    frames = {"num_frames": 5} if other_frames else {}  # the tiny 5b-I2V is trained at 9 frames
    p = tiny.cogvideox(pipeline=kind)
    embed = p.transformer.patch_embed
    outputs, inputs = [], []

    def record(module, args, out):
        inputs.append([a.detach().clone() for a in args])
        outputs.append(out.detach().clone())

    hook = embed.register_forward_hook(record)
    negatives = {"snow": 1.0, "dark sky": 0.5}
    try:
        run_kind(p, kind, image, num_inference_steps=1, **frames)
        with negguide.apply(p, "vsf", negatives=negatives):
            run_kind(p, kind, image, num_inference_steps=1, **frames)
    finally:
        hook.remove()
    plain, joined = outputs[0], outputs[1]
    text, video = inputs[1]
    lengths = [num_tokens(p, n) for n in negatives]
    n = sum(lengths)
    assert text.shape[1] == 16 + n and joined.shape[1] == plain.shape[1] + n
    torch.testing.assert_close(joined[:, :16], plain[:, :16], atol=1e-6, rtol=0)
    torch.testing.assert_close(joined[:, 16 + n :], plain[:, 16:], atol=1e-6, rtol=0)
    with torch.no_grad():
        want = text[:, 16:] @ embed.text_proj.weight.T + embed.text_proj.bias
        if kind == "i2v" and not other_frames:
            table = embed.pos_embedding[0].to(want.dtype)  # a float64 buffer, cast by the model too
            want = want + torch.cat([table[:length] for length in lengths])
    torch.testing.assert_close(joined[:, 16 : 16 + n], want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- one guided call, float64


def _rope(x, cos, sin):
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos + rotated * sin


def _layer_norm(x, norm):
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def reference_vsf(attn, video, text, cos, sin, p, n, alpha, beta, neg_mask):
    """Float64 VSF over [P, N, I] (text first) with explicit keys [P, N(0), I, N(1)] and the paper's mask table; the
    rotary embedding on the video tokens only; one to_out for both, split back into (video, text)."""

    def heads(x):
        return x.unflatten(-1, (attn.heads, -1))  # (B, L, H, D)

    joint = torch.cat([text, video], dim=1)
    q = _layer_norm(heads(joint @ attn.to_q.weight.T + attn.to_q.bias), attn.norm_q)
    k = _layer_norm(heads(joint @ attn.to_k.weight.T + attn.to_k.bias), attn.norm_k)
    v = heads(joint @ attn.to_v.weight.T + attn.to_v.bias)
    t = p + n
    cos, sin = cos[:, None], sin[:, None]
    q = torch.cat([q[:, :t], _rope(q[:, t:], cos, sin)], dim=1)
    k = torch.cat([k[:, :t], _rope(k[:, t:], cos, sin)], dim=1)
    length = q.shape[1]
    keys = torch.cat([k, k[:, p:t]], dim=1)  # N(1): the negative keys again
    values = torch.cat([v, -alpha * v[:, p:t]], dim=1)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, keys) / math.sqrt(q.shape[-1])
    bias = torch.zeros(length, length + n, dtype=torch.float64)
    pos, neg, img, flip = slice(0, p), slice(p, t), slice(t, length), slice(length, length + n)
    bias[img, neg], bias[img, flip] = -math.inf, -beta  # I sees I, P and N(1) with -beta
    bias[pos, neg], bias[pos, flip] = -math.inf, -math.inf  # P sees I, P
    bias[neg, pos], bias[neg, flip] = -math.inf, -math.inf  # N sees I, N(0)
    logits = logits + bias
    pad = torch.zeros(q.shape[0], length + n, dtype=torch.bool)
    pad[:, neg], pad[:, flip] = ~neg_mask, ~neg_mask
    logits = logits.masked_fill(pad[:, None, None, :], -math.inf)
    out = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), values).flatten(2, 3)
    out = out @ attn.to_out[0].weight.T + attn.to_out[0].bias
    return out[:, t:], out[:, :t]


@pytest.mark.parametrize("path", ["dense", "split"])
@pytest.mark.parametrize("rotary", [False, True], ids=["2b", "5b"])
def test_processor_matches_float64_reference(pipe, path, rotary):
    """One guided attn1 call through the adapter's processor equals the mask-table reference."""
    attn = copy.deepcopy(pipe.transformer.transformer_blocks[0].attn1).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in attn.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    batch, p, n, n_video, dim, head_dim = 2, 5, 3, 7, attn.query_dim, attn.inner_dim // attn.heads
    video = torch.randn(batch, n_video, dim, generator=gen, dtype=torch.float64)
    text = torch.randn(batch, p + n, dim, generator=gen, dtype=torch.float64)
    angles = torch.randn(n_video, head_dim // 2, generator=gen, dtype=torch.float64)
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    if not rotary:
        cos, sin = torch.ones_like(cos), torch.zeros_like(sin)
    mask = torch.tensor([[True] * n, [True] * (n - 1) + [False]])
    method_cls = get_method("vsf")
    method = method_cls(method_cls.make_config({"scale": 2.5, "bias": 0.25, "attention": path}))
    installation = Installation(pipe, CogVideoXAdapter(pipe), method, [NegativeSpec("x")])
    installation.forward = Forward(slice(0, batch), TextLayout(p, p + n), ((p, p + n),), (mask,), (1.0,), None, None)
    proc = guided_processor(installation, attn.processor, 0, 2)
    with torch.no_grad():
        got = proc(attn, video, text, None, (cos, sin) if rotary else None)
        want = reference_vsf(attn, video, text, cos, sin, p, n, 2.5, 0.25, mask)
    # the split path merges in float32; diffusers' apply_rotary_emb rotates in float32 too
    atol = 1e-10 if path == "dense" and not rotary else 1e-6 if path == "dense" else 1e-5
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=atol, rtol=0)


def test_guided_call_refuses_a_mask(pipe):
    attn = pipe.transformer.transformer_blocks[0].attn1
    installation = Installation(pipe, CogVideoXAdapter(pipe), get_method("vsf")(), [NegativeSpec("x")])
    installation.forward = Forward(slice(0, 1), TextLayout(2, 3), ((2, 3),), (None,), (1.0,), None, None)
    proc = guided_processor(installation, attn.processor, 0, 2)
    x, ctx = torch.randn(1, 4, attn.query_dim), torch.randn(1, 3, attn.query_dim)
    with pytest.raises(ConfigError, match="cogvideox: expected no attention mask"):
        proc(attn, x, ctx, torch.zeros(1, 7, 7))


# ---------------------------------------------------------------------------- a 32k-token call under a memory cap

MEMORY_SCRIPT = r"""
import json, math, resource, sys, warnings
import torch
from negguide.adapter import TextLayout
from negguide.adapters.cogvideox import CogVideoXAdapter
from negguide.installation import Forward, Installation, guided_processor
from negguide.negatives import NegativeSpec
from negguide.registry import get_method

n_video, p, n, budget = (int(a) for a in sys.argv[1:])
torch.set_num_threads(1)
dim = 16


class Attn(torch.nn.Module):  # CogVideoX's attn1 parts (diffusers' import alone would take longer than the call)
    is_cross_attention = False

    def __init__(self):
        super().__init__()
        self.heads = 1
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(dim, dim) for _ in range(3))
        self.norm_q, self.norm_k = torch.nn.LayerNorm(dim, eps=1e-6), torch.nn.LayerNorm(dim, eps=1e-6)
        self.to_out = torch.nn.ModuleList([torch.nn.Linear(dim, dim), torch.nn.Dropout(0.0)])


class CogVideoXAttnProcessor2_0:  # the signature the guided processor mirrors
    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        raise AssertionError("the original processor must not run in a guided call")


torch.manual_seed(0)
attn = Attn().eval()
gen = torch.Generator().manual_seed(1)
hidden = torch.randn(1, n_video, dim, generator=gen)
text = torch.randn(1, p + n, dim, generator=gen)
vsf = get_method("vsf")
procs = {}
for path in ("split", "dense"):
    method = vsf(vsf.make_config({"scale": 3.0, "bias": 0.1, "attention": path}))
    inst = Installation(None, CogVideoXAdapter(None), method, [NegativeSpec("x")])
    inst.forward = Forward(slice(0, 1), TextLayout(p, p + n), ((p, p + n),), (None,), (1.0,), None, None)
    procs[path] = guided_processor(inst, CogVideoXAttnProcessor2_0(), 0, 1)
with torch.no_grad(), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for proc in procs.values():  # warm up: thread pools and allocator arenas exist before the cap
        proc(attn, hidden[:, :64], text, None, None)


cap_address_space(budget)
result = {}
rows = torch.tensor([0, 1, n_video // 2, n_video - 1])
with torch.no_grad():
    joint = torch.cat([text[0], hidden[0]]).double()
    d = {k: v.double() for k, v in attn.state_dict().items()}
    def ln(x, name):
        x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-6)
        return x * d[name + ".weight"] + d[name + ".bias"]
    q = ln(hidden[0, rows].double() @ d["to_q.weight"].T + d["to_q.bias"], "norm_q")
    k = ln(joint @ d["to_k.weight"].T + d["to_k.bias"], "norm_k")
    v = joint @ d["to_v.weight"].T + d["to_v.bias"]
    t = p + n
    keys = torch.cat([k[:p], k[t:], k[p:t]])  # a video query sees P, the video and the flipped N (-beta)
    values = torch.cat([v[:p], v[t:], -3.0 * v[p:t]])
    logits = q @ keys.T / 4.0
    logits[:, -n:] -= 0.1
    ref = torch.softmax(logits, -1) @ values
    ref = ref @ d["to_out.0.weight"].T + d["to_out.0.bias"]
    for path, proc in procs.items():
        rss0 = peak_rss()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            video_out, text_out = proc(attn, hidden, text, None, None)
        result[path + "_rss_growth"] = peak_rss() - rss0
        result[path + "_shape"] = [list(video_out.shape), list(text_out.shape)]
        result[path + "_max_err"] = (video_out[0, rows].double() - ref).abs().max().item()
        result[path + "_warnings"] = [str(w.message) for w in caught]
        del video_out, text_out
print(json.dumps(result))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs RLIMIT_AS and /proc (Linux)")
def test_a_32k_token_guided_call_fits_in_linear_memory():
    """One guided attn1 call through the adapter's processor at 32,768 video tokens, in a subprocess capped at what
    it uses plus 2 GiB: an L x L float32 matrix (4.3 GB) could not even be allocated. The split path stays O(L);
    ``attention="dense"`` falls back to it with a warning (its joint mask would be L x L); sampled video rows equal
    a float64 reference of the mask table."""
    n_video, p, n, budget = 32_768, 16, 4, 2 * 1024**3
    assert n_video * n_video * 4 > budget
    result = run_capped(MEMORY_SCRIPT, n_video, p, n, budget)
    for path in ("split", "dense"):
        assert result[f"{path}_shape"] == [[1, n_video, 16], [1, p + n, 16]]
        assert result[f"{path}_rss_growth"] < 256 * 1024**2, result
        assert result[f"{path}_max_err"] < 1e-4, result
    assert result["split_warnings"] == [] and any("split" in w for w in result["dense_warnings"]), result


# ---------------------------------------------------------------------------- pipelines end to end


@pytest.mark.parametrize("kind", ["t2v-rope", "i2v", "v2v", "fun-control"])
def test_cfg_equals_pipeline_cfg(kind, image):
    """negguide's CFG (pipeline CFG off) is the pipeline's own [uncond, cond] CFG with the same negative."""
    p = tiny.cogvideox(pipeline=kind)
    own = run_kind(p, kind, image, guidance_scale=3.0, negative_prompt=NEG)
    with negguide.apply(p, "cfg", negative_prompt=NEG, scale=3.0):
        ours = run_kind(p, kind, image)
    assert differs(own, run_kind(p, kind, image))
    close(ours, own)


@pytest.mark.parametrize("kind", ["t2v-rope", "i2v", "v2v", "fun-control"])
def test_vsf_on_every_pipeline(kind, image):
    """VSF with beta = inf is the unguided pipeline (also beside the pipeline's own CFG with use_dynamic_cfg: only
    its cond rows carry the negatives); VSF changes the output."""
    p = tiny.cogvideox(pipeline=kind)
    unguided = run_kind(p, kind, image)
    with negguide.apply(p, "vsf", negative_prompt=NEG, bias=math.inf):
        close(run_kind(p, kind, image), unguided)
    with negguide.apply(p, "vsf", negative_prompt=NEG):
        assert differs(run_kind(p, kind, image), unguided)
    own = run_kind(p, kind, image, use_dynamic_cfg=True, **CFG)
    with negguide.apply(p, "vsf", negative_prompt=NEG, bias=math.inf):
        close(run_kind(p, kind, image, use_dynamic_cfg=True, **CFG), own)


def test_guided_processors_and_patch_restored(pipe):
    embed = pipe.transformer.patch_embed
    with negguide.apply(pipe, "vsf", negative_prompt=NEG):
        procs = pipe.transformer.attn_processors
        assert all(isinstance(procs[f"transformer_blocks.{i}.attn1.processor"], GuidedProcessor) for i in range(2))
        assert "forward" in embed.__dict__
    assert "forward" not in embed.__dict__


# ---------------------------------------------------------------------------- the conformance kit

CASE = testing.Case(build=tiny.cogvideox, call={**tiny.CALL_KWARGS["cogvideox"], "guidance_scale": 1.0},
                    output="frames", pipeline_cfg=CFG)  # fmt: skip


@pytest.mark.parametrize("check", sorted(testing.CHECKS))
def test_conformance(check):
    """The adapter passes every check of negguide.testing on the tiny CogVideoX-2b-like pipeline."""
    testing.CHECKS[check](CASE)


@pytest.mark.parametrize(
    "check", ["pipeline_cfg_guides_conditional_rows", "split_equals_dense", "vsf_infinite_bias_is_unguided"]
)
def test_conformance_i2v(check, image):
    """Learned text positions and the rotary embedding: the CFG, path and isolation checks on I2V (the batch checks
    need one image per prompt, which the kit's shared call cannot give)."""
    case = testing.Case(
        build=functools.partial(tiny.cogvideox, pipeline="i2v"),
        call={**call_kwargs("i2v", image), "guidance_scale": 1.0},
        output="frames",
        pipeline_cfg=CFG,
    )
    testing.CHECKS[check](case)
