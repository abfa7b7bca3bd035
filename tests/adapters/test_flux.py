"""The Flux adapter on tiny offline Flux and Flux Kontext pipelines (1 double- and 1 single-stream block).

Numbers are checked against the unpatched pipeline (its own true CFG, unguided runs) or against an
independent float64 re-implementation of one guided attention call with the paper's mask table.
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
from negguide.adapter import TextLayout
from negguide.adapters.flux import FluxAdapter
from negguide.errors import ConfigError
from negguide.errors import NegativePromptError
from negguide.installation import Forward
from negguide.installation import GuidedProcessor
from negguide.installation import Installation
from negguide.installation import guided_processor
from negguide.negatives import NegativeSpec
from negguide.registry import get_method
from tests.adapters.helpers import close
from tests.adapters.helpers import differs

CALL = {"num_inference_steps": 2, **tiny.CALL_KWARGS["flux"]}
KONTEXT = {"max_area": 32 * 32, "_auto_resize": False}


@pytest.fixture(scope="module")
def pipe():
    return tiny.flux()


@pytest.fixture(scope="module")
def kontext():
    return tiny.flux(kontext=True)


@pytest.fixture(scope="module")
def image():
    from PIL import Image

    pixels = (np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8")
    return Image.fromarray(pixels)


def run(pipe, prompt="a red cube on a table", seed=0, **kwargs):
    gen = (
        [torch.Generator().manual_seed(s) for s in seed]
        if isinstance(seed, list)
        else torch.Generator().manual_seed(seed)
    )
    return pipe(prompt=prompt, generator=gen, **{**CALL, **kwargs}).images


def t5_embeds(pipe, text):
    """The pipeline's own T5 encoding of ``text`` at exactly its token count (no padding)."""
    n = len(pipe.tokenizer_2(text).input_ids)
    return pipe.encode_prompt(prompt=text, max_sequence_length=n)[0]


def snapshot(pipe):
    t = pipe.transformer
    return {
        "processors": dict(t.attn_processors),
        "transformer": set(t.__dict__),
        "pipe": set(pipe.__dict__),
        "hooks": [dict(d) for d in (t._forward_pre_hooks, t._forward_hooks)],
        "hooks_kw": [dict(d) for d in (t._forward_pre_hooks_with_kwargs, t._forward_hooks_with_kwargs)],
    }


def assert_restored(pipe, before):
    after = snapshot(pipe)
    assert after["processors"].keys() == before["processors"].keys()
    assert all(after["processors"][k] is v for k, v in before["processors"].items())
    assert after["transformer"] == before["transformer"]
    assert after["pipe"] == before["pipe"]
    assert after["hooks"] == before["hooks"]
    assert after["hooks_kw"] == before["hooks_kw"]


# ---------------------------------------------------------------------------- one attention call


def _rms(x, norm):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def _rope(x, cos, sin):
    x = x.float().double()  # diffusers' apply_rotary_emb rounds its input to float32
    rot = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
    return x * cos[None, :, None] + rot * sin[None, :, None]


def reference_vsf(attn, hidden, text, cos, sin, p, n, alpha, beta, neg_mask=None):
    """Float64 VSF over ``[P, N, I]`` with explicit keys ``[P, N(0), I, N(1)]`` and the paper's mask table."""

    def lin(layer, x):
        return x @ layer.weight.T + layer.bias

    def heads(x):
        return x.unflatten(-1, (-1, attn.head_dim))

    q = _rms(heads(lin(attn.to_q, hidden)), attn.norm_q)
    k = _rms(heads(lin(attn.to_k, hidden)), attn.norm_k)
    v = heads(lin(attn.to_v, hidden))
    if text is not None:
        q = torch.cat([_rms(heads(lin(attn.add_q_proj, text)), attn.norm_added_q), q], dim=1)
        k = torch.cat([_rms(heads(lin(attn.add_k_proj, text)), attn.norm_added_k), k], dim=1)
        v = torch.cat([heads(lin(attn.add_v_proj, text)), v], dim=1)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    length, t = q.shape[1], p + n
    keys = torch.cat([k, k[:, p:t]], dim=1)  # N(1): the rotated negative keys again
    values = torch.cat([v, -alpha * v[:, p:t]], dim=1)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, keys) / math.sqrt(q.shape[-1])
    bias = torch.zeros(length, length + n, dtype=torch.float64)
    pos, neg, img, flip = slice(0, p), slice(p, t), slice(t, length), slice(length, length + n)
    bias[img, neg], bias[img, flip] = -math.inf, -beta  # I sees I, P and N(1) with -beta
    bias[pos, neg], bias[pos, flip] = -math.inf, -math.inf  # P sees I, P
    bias[neg, pos], bias[neg, flip] = -math.inf, -math.inf  # N sees I, N(0)
    logits = logits + bias
    if neg_mask is not None:
        pad = torch.zeros(q.shape[0], length + n, dtype=torch.bool)
        pad[:, neg], pad[:, flip] = ~neg_mask, ~neg_mask
        logits = logits.masked_fill(pad[:, None, None, :], -math.inf)
    out = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), values).flatten(2, 3)
    if text is None:
        return out
    return attn.to_out[0](out[:, t:]), attn.to_add_out(out[:, :t])


@pytest.mark.parametrize("kind", ["double", "single"])
@pytest.mark.parametrize("path", ["dense", "split"])
@pytest.mark.parametrize("padded", [False, True])
def test_processor_matches_float64_reference(pipe, kind, path, padded):
    """One guided call equals the mask-table reference, with text positions rotated too (N(1) carries N's rotation)."""
    block = (
        pipe.transformer.transformer_blocks[0] if kind == "double" else pipe.transformer.single_transformer_blocks[0]
    )
    attn = copy.deepcopy(block.attn).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in attn.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    batch, p, n, n_img, dim = 2, 5, 3, 7, attn.query_dim
    angles = torch.randn(p + n + n_img, attn.head_dim // 2, generator=gen, dtype=torch.float64)
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    text = torch.randn(batch, p + n, dim, generator=gen, dtype=torch.float64)
    img = torch.randn(batch, n_img, dim, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[True] * n, [True] * (n - 1) + [False]]) if padded else None

    method_cls = get_method("vsf")
    method = method_cls(method_cls.make_config({"scale": 2.5, "bias": 0.25, "attention": path}))
    installation = Installation(pipe, FluxAdapter(pipe), method, [NegativeSpec("x")])
    installation.forward = Forward(slice(0, batch), TextLayout(p, p + n), ((p, p + n),), (mask,), (1.0,), None, None)
    proc = guided_processor(installation, attn.processor, 0, 2)
    tol = {"atol": 1e-10 if path == "dense" else 1e-5, "rtol": 0}  # the split path merges in float32
    with torch.no_grad():
        if kind == "double":
            got = proc(attn, img, text, None, (cos, sin))
            want = reference_vsf(attn, img, text, cos, sin, p, n, 2.5, 0.25, mask)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, **tol)
        else:
            seq = torch.cat([text, img], dim=1)
            got = proc(attn, seq, None, None, (cos, sin))
            want = reference_vsf(attn, seq, None, cos, sin, p, n, 2.5, 0.25, mask)
            torch.testing.assert_close(got, want, **tol)


def test_processor_inactive_calls_the_original_bit_for_bit(pipe):
    attn = pipe.transformer.transformer_blocks[0].attn
    installation = Installation(pipe, FluxAdapter(pipe), get_method("vsf")(), [NegativeSpec("x")])
    proc = guided_processor(installation, attn.processor, 0, 2)
    gen = torch.Generator().manual_seed(0)
    img, text = torch.randn(1, 6, attn.query_dim, generator=gen), torch.randn(1, 4, attn.query_dim, generator=gen)
    with torch.no_grad():
        for g, w in zip(proc(attn, img, text), attn.processor(attn, img, text)):
            assert torch.equal(g, w)


@pytest.mark.parametrize("ndim", [2, 3])
def test_extend_inputs_appends_negative_tokens_and_zero_text_ids(pipe, ndim):
    adapter = FluxAdapter(pipe)
    text = torch.randn(2, 5, 32)
    ids = torch.ones(5, 3) if ndim == 2 else torch.ones(2, 5, 3)
    neg = torch.randn(1, 3, 32).expand(2, 3, 32)
    joined = adapter.join({"encoder_hidden_states": text, "txt_ids": ids, "pooled_projections": "kept"}, neg, None)
    out = joined.kwargs
    assert torch.equal(out["encoder_hidden_states"], torch.cat([text, neg], dim=1))
    seq = -2 if ndim == 2 else 1
    assert out["txt_ids"].shape[seq] == 8 and out["txt_ids"].ndim == ndim
    assert torch.equal(out["txt_ids"].narrow(seq, 0, 5), ids)
    assert not out["txt_ids"].narrow(seq, 5, 3).any()
    assert out["pooled_projections"] == "kept" and joined.num_pos == 5


# ---------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("path", ["dense", "split"])
def test_vsf_with_infinite_bias_is_unguided(pipe, path):
    base = run(pipe)
    with negguide.apply(pipe, "vsf", negative_prompt="snow, blurry", bias=float("inf"), attention=path):
        out = run(pipe)
    close(out, base)


def test_vsf_changes_output_and_paths_agree(pipe):
    base = run(pipe)
    outs = {}
    for path in ("dense", "split"):
        with negguide.apply(pipe, "vsf", negative_prompt="snow, blurry", attention=path):
            outs[path] = run(pipe)
    assert differs(outs["dense"], base)
    close(outs["dense"], outs["split"])


def test_remove_restores_bit_for_bit_also_after_an_exception(pipe):
    never = run(tiny.flux())  # same seed, same weights, never patched
    before = snapshot(pipe)
    handle = negguide.apply(pipe, "vsf", negative_prompt="snow")
    assert isinstance(pipe.transformer.attn_processors["transformer_blocks.0.attn.processor"], GuidedProcessor)
    run(pipe)
    handle.remove()
    assert_restored(pipe, before)
    assert np.array_equal(run(pipe), never)

    with pytest.raises(RuntimeError, match="boom"), negguide.apply(pipe, "nag", negative_prompt="snow"):
        run(pipe)
        raise RuntimeError("boom")
    assert_restored(pipe, before)
    assert np.array_equal(run(pipe), never)


@pytest.mark.parametrize("guidance_embeds", [False, True])
def test_cfg_equals_the_pipelines_true_cfg(guidance_embeds):
    pipe = tiny.flux(guidance_embeds=guidance_embeds)
    base = run(pipe)
    want = run(pipe, negative_prompt="snow, blurry", true_cfg_scale=3.0)
    with negguide.apply(pipe, "cfg", negative_prompt="snow, blurry", scale=3.0):
        got = run(pipe)
    assert differs(want, base)
    close(got, want)
    with negguide.apply(pipe, "cfg", negative_prompt="snow, blurry", scale=1.0):
        close(run(pipe), base)


def _spy(obj, name, record):
    """Wrap ``obj.name`` (an instance attribute shadows the method) and return the list of records."""
    seen = []
    original = getattr(obj, name)

    def spy(*args):
        seen.append(record(*args))
        return original(*args)

    setattr(obj, name, spy)
    return seen


def test_cfg_equals_kontexts_true_cfg(kontext, image):
    """Kontext's transformer input also carries the conditioning image's tokens; its true CFG has no cache_context."""
    want = run(kontext, image=image, negative_prompt="snow", true_cfg_scale=2.5, **KONTEXT)
    with negguide.apply(kontext, "cfg", negative_prompt="snow", scale=2.5):
        got = run(kontext, image=image, **KONTEXT)
    assert differs(want, run(kontext, image=image, **KONTEXT))
    close(got, want)


def test_both_block_kinds_are_patched_and_layers_select_them(pipe):
    base = run(pipe)
    with negguide.apply(pipe, "vsf", negative_prompt="snow") as handle:
        guided = {k: v for k, v in pipe.transformer.attn_processors.items() if isinstance(v, GuidedProcessor)}
        assert {k: v.index for k, v in guided.items()} == {
            "transformer_blocks.0.attn.processor": 0,
            "single_transformer_blocks.0.attn.processor": 1,
        }
        assert handle.adapter.num_layers(pipe.transformer) == 2
    outs = {}
    for name, layers in {"double": [0], "single": [1], "last": [-1]}.items():
        with negguide.apply(pipe, "vsf", negative_prompt="snow", layers=layers) as handle:
            attended = _spy(handle.method, "attend", lambda seg: 0)
            calls = _spy(handle.installation, "run_method", lambda seg, processor: processor.index)
            outs[name] = run(pipe)
        assert calls == [0, 1, 0, 1]  # every block sees the negative tokens, every step
        assert len(attended) == 2
    # an empty selection guides nothing: refused (the issue on careless input), `enabled=False` says it
    with pytest.raises(ConfigError, match="at least one block index in `layers`"):
        negguide.apply(pipe, "vsf", negative_prompt="snow", layers=[])
    with negguide.apply(pipe, "vsf", negative_prompt="snow", enabled=False):
        close(run(pipe), base)
    assert differs(outs["double"], base) and differs(outs["single"], base)
    assert differs(outs["double"], outs["single"])
    close(outs["single"], outs["last"])


def test_negative_token_order_does_not_matter(pipe):
    embeds = t5_embeds(pipe, "snow, dark, blurry photo")
    base = run(pipe)
    with negguide.apply(pipe, "vsf", negative_prompt_embeds=embeds):
        out = run(pipe)
    with negguide.apply(pipe, "vsf", negative_prompt_embeds=embeds.flip(1)):
        flipped = run(pipe)
    assert differs(out, base)
    close(out, flipped)


def test_batch_with_per_prompt_negatives_equals_each_prompt_alone(pipe):
    prompts, negs = ["a red cube", "a blue ball on grass"], ["snow", "a dark and blurry photo of rain"]
    with negguide.apply(pipe, "vsf", negative_prompt=negs) as handle:
        batch = run(pipe, prompts, seed=[0, 1])
        assert handle.installation.encoded[0].mask is not None  # different lengths: padded and masked
    for i in range(2):
        with negguide.apply(pipe, "vsf", negative_prompt=negs[i]):
            close(batch[i], run(pipe, prompts[i], seed=i)[0])


def test_images_per_prompt(pipe):
    with negguide.apply(pipe, "vsf", negative_prompt="snow"):
        both = run(pipe, seed=[0, 1], num_images_per_prompt=2)
        singles = [run(pipe, seed=s)[0] for s in (0, 1)]
    assert both.shape[0] == 2
    close(both[0], singles[0])
    close(both[1], singles[1])


@pytest.mark.parametrize("family", ["flux", "kontext"])
def test_vsf_guides_only_the_conditional_call_of_the_pipelines_true_cfg(pipe, kontext, image, family):
    """FluxPipeline names its branches with cache_context; Kontext does not (second call per step)."""
    target, extra = (pipe, {}) if family == "flux" else (kontext, {"image": image, **KONTEXT})
    cfg = {"negative_prompt": "x", "true_cfg_scale": 2.0, **extra}
    plain = run(target, **cfg)
    with negguide.apply(target, "vsf", negative_prompt="snow", bias=float("inf")):
        close(run(target, **cfg), plain)
    with negguide.apply(target, "vsf", negative_prompt="snow") as handle:
        calls = _spy(handle.installation, "run_method", lambda seg, processor: processor.index)
        forwards = []
        hook = target.transformer.register_forward_pre_hook(lambda module, args: forwards.append(1))
        try:
            out = run(target, **cfg)
        finally:
            hook.remove()
    assert len(forwards) == 4  # 2 steps x (conditional + unconditional)
    assert calls == [0, 1, 0, 1]  # 2 steps x 2 blocks of the conditional calls only
    assert np.isfinite(out).all() and differs(out, plain)


def test_consecutive_one_step_calls_are_all_guided(kontext, image):
    """Kontext names no branch: a new call's first forward is not taken for the last step's second call."""
    with negguide.apply(kontext, "vsf", negative_prompt="snow") as handle:
        calls = _spy(handle.installation, "run_method", lambda seg, processor: processor.index)
        first = run(kontext, image=image, num_inference_steps=1, **KONTEXT)
        second = run(kontext, image=image, num_inference_steps=1, **KONTEXT)
    assert calls == [0, 1, 0, 1]
    assert np.array_equal(first, second)


def test_kontext_vsf(kontext, image):
    base = run(kontext, image=image, **KONTEXT)
    with negguide.apply(kontext, "vsf", negative_prompt="snow", bias=float("inf")):
        close(run(kontext, image=image, **KONTEXT), base)
    with negguide.apply(kontext, "vsf", negative_prompt="snow"):
        out = run(kontext, image=image, **KONTEXT)
    assert np.isfinite(out).all() and differs(out, base)


def test_negative_prompt_embeds_equal_the_text_path(pipe):
    with negguide.apply(pipe, "vsf", negative_prompt="snow, blurry") as handle:
        from_text = run(pipe)
        n_tokens = handle.installation.encoded[0].num_tokens
        assert n_tokens == len(pipe.tokenizer_2("snow, blurry").input_ids)  # no padding
    with negguide.apply(pipe, "vsf", negative_prompt_embeds=t5_embeds(pipe, "snow, blurry")):
        close(run(pipe), from_text)


def test_cfg_with_negative_prompt_embeds(pipe):
    embeds, pooled, _ = pipe.encode_prompt(prompt="snow", max_sequence_length=CALL["max_sequence_length"])
    want = run(pipe, negative_prompt="snow", true_cfg_scale=2.0)
    with negguide.apply(
        pipe, "cfg", scale=2.0, negative_prompt_embeds={"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    ):
        close(run(pipe), want)
    base = run(pipe)
    before = snapshot(pipe)
    with negguide.apply(pipe, "cfg", negative_prompt_embeds=embeds), pytest.raises(NegativePromptError, match="pooled"):
        run(pipe)
    assert_restored(pipe, before)
    assert np.array_equal(run(pipe), base)


def test_empty_negative_is_unguided(pipe):
    base = run(pipe)
    with negguide.apply(pipe, "vsf", negative_prompt=""):
        assert np.array_equal(run(pipe), base)


@pytest.mark.parametrize("method", ["nag", "nasa"])
def test_other_attention_methods_run(pipe, method):
    base = run(pipe)
    with negguide.apply(pipe, method, negative_prompt="snow, blurry"):
        out = run(pipe)
    assert np.isfinite(out).all() and differs(out, base)


# ---------------------------------------------------------------------------- the conformance kit

CASE = testing.Case(
    build=tiny.flux, call=tiny.CALL_KWARGS["flux"], pipeline_cfg={"true_cfg_scale": 2.0, "negative_prompt": "ugly"}
)


@pytest.mark.parametrize("check", sorted(testing.CHECKS))
def test_conformance(check):
    """The adapter passes every check of negguide.testing on the tiny pipeline."""
    testing.CHECKS[check](CASE)
