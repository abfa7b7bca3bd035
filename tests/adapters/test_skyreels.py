"""SkyReels-V2 adapter on tiny offline pipelines: T2V, I2V (image context), diffusion forcing T2V / I2V / V2V.

Numbers are checked against the unpatched pipelines (their own CFG, unguided runs) or against an independent
float64 re-implementation of one guided cross-attention call (the closed form ``Z = W Z+ - alpha (1 - W) Z-``,
plus the unguided image-context attention of I2V).
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
from negguide.adapter import TextLayout
from negguide.adapters.skyreels import SkyReelsAdapter
from negguide.adapters.wan import WanAdapter
from negguide.errors import ConfigError
from negguide.errors import NegGuideError
from negguide.errors import NoAdapterError
from negguide.installation import Forward
from negguide.installation import GuidedProcessor
from negguide.installation import Installation
from negguide.installation import guided_processor
from negguide.negatives import NegativeSpec
from negguide.registry import adapter_for
from negguide.registry import family_defaults
from negguide.registry import get_method
from negguide.runtime import applied
from tests.memcap import run_capped

CALL = {"num_inference_steps": 2, "guidance_scale": 1.0, **tiny.CALL_KWARGS["skyreels"]}
#: diffusion forcing, asynchronous: 4 latent frames in causal blocks of 2, the second block one step behind
DF = {"num_frames": 13, "base_num_frames": 13, "causal_block_size": 2, "ar_step": 1}
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


class ContextSpy:
    """Records the context length (positional arg 1) and the timestep shape every forward's ``blocks[0].attn2`` gets."""

    def __init__(self, transformer):
        self.lengths = []
        self.handle = transformer.blocks[0].attn2.register_forward_pre_hook(
            lambda module, args: self.lengths.append(args[1].shape[1])
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pipe():
    return tiny.skyreels()


@pytest.fixture(scope="module")
def base(pipe):
    return run(pipe)


@pytest.fixture(scope="module")
def image():
    from PIL import Image

    return Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def i2v():
    return tiny.skyreels(pipeline="i2v")


@pytest.fixture(scope="module")
def df():
    return tiny.skyreels(pipeline="df")


# ---------------------------------------------------------------------------- facts


def test_adapter_resolves(pipe, df, i2v):
    for p in (pipe, df, i2v):
        assert adapter_for(p) is SkyReelsAdapter
    assert negguide.get_adapter(pipe.transformer) is SkyReelsAdapter
    assert SkyReelsAdapter.family == "skyreels" and SkyReelsAdapter.layout == "cross"
    assert not SkyReelsAdapter.matches(torch.nn.Linear(2, 2)) and not WanAdapter.matches(pipe.transformer)
    modules = SkyReelsAdapter(pipe).attention_modules(pipe.transformer)
    assert modules == {"blocks.0.attn2.processor": 0, "blocks.1.attn2.processor": 1}  # never attn1


def test_defaults_are_untuned():
    """No published SkyReels-V2 parameters: the methods' own defaults, not Wan's."""
    assert SkyReelsAdapter.defaults == {}
    for name in ("vsf", "nag", "nasa", "cfg"):
        assert family_defaults(get_method(name), "skyreels") == {}


def test_custom_processors_are_refused(pipe):
    """A processor negguide does not know on a guided module is refused, never silently replaced."""
    before = dict(pipe.transformer.attn_processors)
    try:
        pipe.transformer.blocks[1].attn2.set_processor(type("MyProcessor", (), {"__call__": lambda self, *a, **k: 0})())
        with pytest.raises(
            NoAdapterError, match=r"expected SkyReelsV2AttnProcessor on `blocks.1.attn2.processor`, got MyProcessor"
        ):
            negguide.apply(pipe, "nag", negative_prompt=NEG)
    finally:
        pipe.transformer.set_attn_processor(dict(before))
    assert applied(pipe) is None and pipe.transformer.attn_processors == before


def test_negative_encoded_without_padding(pipe):
    """The negative is its real UMT5 tokens (eos included): the padded encoding's first n rows, nothing more."""
    n = num_tokens(pipe, "a dark and blurry photo")
    with negguide.apply(pipe, "vsf", negative_prompt="a dark and blurry photo") as handle:
        pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False, max_sequence_length=32)
        got = handle.installation.encoded[0].embeds
    padded = pipe.encode_prompt("a dark and blurry photo", do_classifier_free_guidance=False, max_sequence_length=32)
    assert got.shape == (1, n, 32) and n < 32
    torch.testing.assert_close(got, padded[0][:, :n], atol=1e-6, rtol=0)
    assert not padded[0][:, n:].any()  # the pipeline zeroes its padding: those rows are what was cut


def test_context_is_prompt_then_negative(pipe, base):
    """attn2 sees [P (max_sequence_length), N (real tokens)]; beta = inf is the unguided pipeline."""
    with negguide.apply(pipe, "vsf", negative_prompt=NEG, bias=math.inf):
        with ContextSpy(pipe.transformer) as spy:
            out = run(pipe)
    assert spy.lengths == [32 + num_tokens(pipe, NEG)] * 2
    close(out, base)


# ---------------------------------------------------------------------------- one guided call, float64


def _rms(x, norm):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def _lin(layer, x):
    return x @ layer.weight.T + layer.bias


def _attention64(q, k, v, key_mask=None):
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], -math.inf)
    return logits.softmax(-1) @ v, torch.logsumexp(logits, -1)


def reference(attn, hidden, context, n_image, p, alpha, beta, neg_mask):
    """Float64: Z = W Z+ - alpha (1 - W) Z-, W = A+ / (A+ + e^-beta A-), plus the image-context attention."""

    def heads(x):
        return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

    q = heads(_rms(_lin(attn.to_q, hidden), attn.norm_q))
    text = context[:, n_image:]
    k, v = heads(_rms(_lin(attn.to_k, text), attn.norm_k)), heads(_lin(attn.to_v, text))
    z_pos, lse_pos = _attention64(q, k[:, :, :p], v[:, :, :p])
    z_neg, lse_neg = _attention64(q, k[:, :, p:], v[:, :, p:], neg_mask)
    w = torch.sigmoid(lse_pos - (lse_neg - beta))[..., None]
    out = w * z_pos - alpha * (1 - w) * z_neg
    if n_image:
        image = context[:, :n_image]
        ki, vi = heads(_rms(_lin(attn.add_k_proj, image), attn.norm_added_k)), heads(_lin(attn.add_v_proj, image))
        out = out + _attention64(q, ki, vi)[0]
    return _lin(attn.to_out[0], out.transpose(1, 2).flatten(2))


@pytest.mark.parametrize("path", ["dense", "split"])
@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_processor_matches_float64_closed_form(pipe, i2v, kind, path):
    """One guided attn2 call through the adapter's processor equals the closed form (I2V: with the image context)."""
    p_ = pipe if kind == "t2v" else i2v
    attn = copy.deepcopy(p_.transformer.blocks[0].attn2).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in attn.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    batch, n_q, p, n, dim = 2, 7, 5, 4, attn.inner_dim
    n_image = 3 if kind == "i2v" else 0
    hidden = torch.randn(batch, n_q, dim, generator=gen, dtype=torch.float64)
    context = torch.randn(batch, n_image + p + n, dim, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[True] * n, [True] * (n - 2) + [False] * 2])
    method_cls = get_method("vsf")
    method = method_cls(method_cls.make_config({"scale": 2.5, "bias": 0.25, "attention": path}))
    installation = Installation(p_, SkyReelsAdapter(p_), method, [NegativeSpec("x")])
    installation.forward = Forward(slice(0, batch), TextLayout(p, p + n), ((p, p + n),), (mask,), (1.0,), None, None)
    proc = guided_processor(installation, attn.processor, 0, 2)
    with torch.no_grad():
        got = proc(attn, hidden, context, None, None)
        want = reference(attn, hidden, context, n_image, p, 2.5, 0.25, mask)
    torch.testing.assert_close(got, want, atol=1e-10 if path == "dense" else 1e-5, rtol=0)


def test_guided_call_refuses_a_mask(pipe):
    attn = pipe.transformer.blocks[0].attn2
    installation = Installation(pipe, SkyReelsAdapter(pipe), get_method("vsf")(), [NegativeSpec("x")])
    installation.forward = Forward(slice(0, 1), TextLayout(2, 3), ((2, 3),), (None,), (1.0,), None, None)
    proc = guided_processor(installation, attn.processor, 0, 2)
    x, ctx = torch.randn(1, 4, attn.inner_dim), torch.randn(1, 3, attn.inner_dim)
    with pytest.raises(NegGuideError, match="skyreels: .*SkyReels-V2 blocks never pass"):
        proc(attn, x, ctx, torch.zeros(1, 1, 4, 3), None)


# ---------------------------------------------------------------------------- image-to-video


def test_i2v_pipeline(i2v, image):
    """[image_ctx (17), P (512: the length the processor hard-codes), N]: beta = inf is unguided; CFG is the
    pipeline's own CFG, the negative branch with its rows' image context."""
    # latents: the tiny random VAE squashes differences ~100x
    kw = {"image": image, "max_sequence_length": 512, "output_type": "latent"}
    unguided = run(i2v, **kw)
    with negguide.apply(i2v, "vsf", negative_prompt=NEG, bias=math.inf):
        with ContextSpy(i2v.transformer) as spy:
            isolated = run(i2v, **kw)
    assert spy.lengths == [17 + 512 + num_tokens(i2v, NEG)] * 2
    close(isolated, unguided)
    with negguide.apply(i2v, "vsf", negative_prompt=NEG, scale=3.0):
        assert differs(run(i2v, **kw), unguided)
    own = run(i2v, **kw, guidance_scale=3.0, negative_prompt=NEG)
    with negguide.apply(i2v, "cfg", negative_prompt=NEG, scale=3.0):
        close(run(i2v, **kw), own)
    assert differs(own, unguided)


# ---------------------------------------------------------------------------- diffusion forcing


def test_diffusion_forcing_vsf(df):
    """Per-frame timesteps and the block-causal self-attention mask leave attn2 alone: beta = inf is unguided, also
    beside the pipeline's own CFG (only its "cond" forward carries the negative)."""
    unguided = run(df, **DF)
    with negguide.apply(df, "vsf", negative_prompt=NEG, bias=math.inf):
        close(run(df, **DF), unguided)
    with negguide.apply(df, "vsf", negative_prompt=NEG):
        assert differs(run(df, **DF), unguided)
    own = run(df, **DF, **CFG)
    n = num_tokens(df, NEG)
    with negguide.apply(df, "vsf", negative_prompt=NEG, bias=math.inf):
        with ContextSpy(df.transformer) as spy:
            close(run(df, **DF, **CFG), own)
    assert spy.lengths[:2] == [32 + n, 32]  # cond (guided), uncond (untouched)


def test_diffusion_forcing_cfg_equals_pipeline_cfg(df):
    """negguide's CFG batches the negative branch with the per-frame (rows, frames) timesteps of its rows."""
    seen = []
    own = run(df, **DF, **{**CFG, "negative_prompt": NEG})
    with negguide.apply(df, "cfg", negative_prompt=NEG, scale=3.0):
        # registered after negguide's pre-hook: sees the batched inputs
        hook = df.transformer.register_forward_pre_hook(
            lambda m, a, kw: seen.append(tuple(kw["timestep"].shape)), with_kwargs=True
        )
        try:
            ours = run(df, **DF)
        finally:
            hook.remove()
    assert differs(own, run(df, **DF))
    close(ours, own)
    assert set(seen) == {(2, 4)}  # the positive row's per-frame timesteps, then the negative branch's


@pytest.mark.parametrize("kind", ["df-i2v", "df-v2v"])
def test_diffusion_forcing_conditioning_pipelines(kind, image):
    p = tiny.skyreels(pipeline=kind)
    kw = {"image": image} if kind == "df-i2v" else {"video": [image] * 5, "overlap_history": 1}
    kw["base_num_frames"] = 5
    unguided = run(p, **kw)
    with negguide.apply(p, "vsf", negative_prompt=NEG, bias=math.inf):
        close(run(p, **kw), unguided)
    with negguide.apply(p, "vsf", negative_prompt=NEG):
        assert differs(run(p, **kw), unguided)


def test_inject_sample_info_refuses_batched_cfg_keeps_attention_methods():
    """SkyReels-V2-DF-1.3B's fps embedding runs one row per forward: CFG's batched branch is refused with a clear
    error (the pipeline stays as it was); attention-level methods keep the batch and work."""
    p = tiny.skyreels(pipeline="df", inject_sample_info=True)
    kw = {"base_num_frames": 5}
    unguided = run(p, **kw)
    with pytest.raises(ConfigError, match="inject_sample_info.*pipeline's own CFG"):
        with negguide.apply(p, "cfg", negative_prompt=NEG):
            run(p, **kw)
    assert np.array_equal(run(p, **kw), unguided)
    with negguide.apply(p, "vsf", negative_prompt=NEG, bias=math.inf):
        close(run(p, **kw), unguided)
    with negguide.apply(p, "nag", negative_prompt=NEG):
        assert differs(run(p, **kw), unguided)


def test_diffusion_forcing_step_window(df):
    """start=0.5 of 2 steps guides the second step only: its first prediction equals the unguided one."""
    preds = []
    hook = df.transformer.register_forward_hook(lambda m, a, o: preds.append(o[0].detach().clone()))
    try:
        run(df, **DF)
        with negguide.apply(df, "vsf", negative_prompt=NEG, start=0.5):
            run(df, **DF)
    finally:
        hook.remove()
    half = len(preds) // 2
    torch.testing.assert_close(preds[half], preds[0], atol=1e-6, rtol=0)  # step 0: unguided
    assert (preds[-1] - preds[half - 1]).abs().max() > 1e-4  # last step: guided


# ---------------------------------------------------------------------------- the conformance kit

CASE = testing.Case(
    build=tiny.skyreels,
    call={**tiny.CALL_KWARGS["skyreels"], "guidance_scale": 1.0},
    output="frames",
    pipeline_cfg=CFG,
)


@pytest.mark.parametrize("check", sorted(testing.CHECKS))
def test_conformance(check):
    """The adapter passes every check of negguide.testing on the tiny T2V pipeline."""
    testing.CHECKS[check](CASE)


DF_CASE = testing.Case(
    build=functools.partial(tiny.skyreels, pipeline="df"),
    call={**tiny.CALL_KWARGS["skyreels"], "guidance_scale": 1.0, **DF},
    output="frames",
    pipeline_cfg=CFG,
)


@pytest.mark.parametrize(
    "check",
    ["batch_equals_separate_calls", "empty_negative_row_is_unguided", "pipeline_cfg_guides_conditional_rows"],
)
def test_conformance_diffusion_forcing(check):
    """The batch- and CFG-dependent checks on the asynchronous diffusion-forcing pipeline."""
    testing.CHECKS[check](DF_CASE)


# ---------------------------------------------------------------------------- memory at video length

BUDGET = 2 * 1024**3
N_VIDEO, N_POS, N_NEG, WIDTH = 32_768, 64, 8, 16
MEMORY_SCRIPT = r"""
import json, math, resource, sys
import torch
from negguide.adapter import TextLayout
from negguide.adapters.skyreels import SkyReelsAdapter
from negguide.installation import Forward, Installation, guided_processor
from negguide.negatives import NegativeSpec
from negguide.plugins.vsf import ValueSignFlip, VSFConfig

n_video, n_pos, n_neg, width, budget = (int(a) for a in sys.argv[1:])
alpha, beta = 3.0, 0.1
torch.set_num_threads(1)
torch.manual_seed(0)


class Attn(torch.nn.Module):  # what SkyReelsV2Attention gives attn2 (without importing diffusers: seconds saved)
    def __init__(self):
        super().__init__()
        self.heads, self.add_k_proj = 1, None
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(width, width) for _ in range(3))
        self.norm_q, self.norm_k = torch.nn.RMSNorm(width, eps=1e-6), torch.nn.RMSNorm(width, eps=1e-6)
        self.to_out = torch.nn.ModuleList([torch.nn.Linear(width, width), torch.nn.Dropout(0.0)])


class Processor:  # SkyReelsV2AttnProcessor's calling convention; a guided forward never calls it
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        raise AssertionError("the original processor ran")


attn = Attn().eval()
gen = torch.Generator().manual_seed(0)
hidden = torch.randn(1, n_video, width, generator=gen)
context = torch.randn(1, n_pos + n_neg, width, generator=gen)
adapter = SkyReelsAdapter(None)


def processor(path):
    method = ValueSignFlip(VSFConfig(scale=alpha, bias=beta, attention=path))
    inst = Installation(None, adapter, method, [NegativeSpec("x")])
    inst.forward = Forward(slice(0, 1), TextLayout(n_pos, n_pos + n_neg), ((n_pos, n_pos + n_neg),), (None,), (1.0,),
                           None, None)
    return guided_processor(inst, Processor(), 0, 1)


procs = {path: processor(path) for path in ("split", "dense")}
with torch.no_grad():
    for proc in procs.values():  # thread pools and allocator arenas exist before the cap
        proc(attn, hidden[:, :64], context, None, None)


cap_address_space(budget)
rows = torch.tensor([0, 1, n_video // 2, n_video - 1])
with torch.no_grad():
    # float64 closed form for a few video queries: Z = W Z+ - alpha (1 - W) Z-, then to_out
    a = attn.double()
    rms = lambda x, n: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + n.eps) * n.weight
    q = rms(a.to_q(hidden[0, rows].double()), a.norm_q)
    k, v = rms(a.to_k(context[0].double()), a.norm_k), a.to_v(context[0].double())
    logits = q @ k.T / math.sqrt(width)
    logits[:, n_pos:] -= beta
    ref = a.to_out[0](torch.softmax(logits, -1) @ torch.cat([v[:n_pos], -alpha * v[n_pos:]]))
    attn.float()
    result = {}
    for path, proc in procs.items():
        rss0 = peak_rss()
        out = proc(attn, hidden, context, None, None)
        result[path] = {
            "rss_growth": peak_rss() - rss0,
            "shape": list(out.shape),
            "max_err": (out[0, rows].double() - ref).abs().max().item(),
        }
        del out
try:  # the cap is real: an L x L float32 matrix does not fit under it
    torch.empty(n_video, n_video).fill_(0.0)
    result["square"] = "allocated"
except (RuntimeError, MemoryError):
    result["square"] = "refused"
print(json.dumps(result))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs RLIMIT_AS and /proc (Linux)")
def test_guided_call_at_video_length_is_linear_in_memory():
    """One guided attn2 call at 32k video tokens through the adapter's processor (``project``, the method, ``finish``)
    under a cap of 2 GiB above the baseline, where an L x L float32 matrix (4 GiB) cannot be allocated: in the cross
    layout neither path builds one (the dense mask is L x context), so both run, grow memory by O(L), and sampled
    rows match a float64 reference."""
    args = [str(a) for a in (N_VIDEO, N_POS, N_NEG, WIDTH, BUDGET)]
    result = run_capped(MEMORY_SCRIPT, *args)
    assert N_VIDEO * N_VIDEO * 4 >= 2 * BUDGET and result["square"] == "refused"
    for path in ("split", "dense"):
        assert result[path]["shape"] == [1, N_VIDEO, WIDTH]
        assert result[path]["rss_growth"] < 256 * 1024**2, result
        assert result[path]["max_err"] < 1e-4, result


def test_guided_processor_replaces_attn2_only(pipe):
    with negguide.apply(pipe, "vsf", negative_prompt=NEG):
        procs = pipe.transformer.attn_processors
        assert all(isinstance(procs[f"blocks.{i}.attn2.processor"], GuidedProcessor) for i in range(2))
        assert not any(isinstance(procs[f"blocks.{i}.attn1.processor"], GuidedProcessor) for i in range(2))
