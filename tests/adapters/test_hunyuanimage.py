"""The HunyuanImage adapter on tiny offline HunyuanImage 2.1 pipelines (1 double- and 1 single-stream block; base with
and without a guider, distilled, refiner).

Numbers are checked against the unpatched pipeline (its guider's own CFG, unguided runs), the unpatched text refiner
(``context_embedder``) called on one text alone, or an independent float64 re-implementation of one guided
attention call with the paper's mask table and the model's rotary embedding on the image tokens.

Attention-level methods rely on two core facts: a dotted ``patched_methods`` name (``context_embedder.forward``, the
text refiner inside the denoiser) and the guiders' ``"pred_uncond"`` branch name.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings

import numpy as np
import pytest
import torch

import negguide
from negguide import testing
from negguide import tiny
from negguide.adapter import EncodeCall
from negguide.adapter import TextLayout
from negguide.adapters.hunyuanimage import HunyuanImageAdapter
from negguide.errors import NegGuideWarning
from negguide.errors import NoAdapterError
from negguide.installation import Forward
from negguide.installation import Installation
from negguide.installation import guided_processor
from negguide.negatives import NegativeSpec
from negguide.registry import adapter_for
from negguide.registry import get_method
from tests.adapters.helpers import close
from tests.adapters.helpers import differs

CALL = {"num_inference_steps": 2, **tiny.CALL_KWARGS["hunyuanimage"]}
NEG = "snow, dark rain"


@pytest.fixture(scope="module")
def pipe():
    return tiny.hunyuanimage()


@pytest.fixture(scope="module")
def image():
    from PIL import Image

    return Image.fromarray((np.random.RandomState(0).rand(16, 16, 3) * 255).astype("uint8"))


def apg_guider(scale=3.0):
    """HunyuanImage 2.1's guider kind; APG from the second step on (a 2-step call runs CFG, then APG)."""
    from diffusers.guiders import AdaptiveProjectedMixGuidance

    return AdaptiveProjectedMixGuidance(guidance_scale=scale, adaptive_projected_guidance_start_step=0)


def cfg_guider(scale=3.0):
    from diffusers.guiders import ClassifierFreeGuidance

    return ClassifierFreeGuidance(guidance_scale=scale)


def run(pipe, prompt="a red cat", seed=0, **kwargs):
    gen = (
        [torch.Generator().manual_seed(s) for s in seed]
        if isinstance(seed, list)
        else torch.Generator().manual_seed(seed)
    )
    with torch.no_grad():
        out = pipe(prompt=prompt, generator=gen, **{**CALL, **kwargs}).images
    return np.asarray(out, dtype=np.float64)


def real_tokens(pipe, text):
    """Qwen tokens the pipeline keeps of ``text``: its template, tokenized, less the template's first tokens."""
    return (
        len(pipe.tokenizer(pipe.prompt_template_encode.format(text)).input_ids) - pipe.prompt_template_encode_start_idx
    )


def encode_call(pipe):
    """An ``EncodeCall`` for one prompt, as the installation records it."""
    output = pipe.encode_prompt("a red cat")
    return EncodeCall({}, output, 1, 1, torch.device("cpu"), torch.float32, pipe.encode_prompt)


# ---------------------------------------------------------------------------- facts


@pytest.mark.parametrize("kind", ["base", "distilled", "refiner"])
def test_adapter_resolves(kind):
    assert adapter_for(tiny.hunyuanimage(kind=kind)) is HunyuanImageAdapter


@torch.no_grad()
def test_negatives_are_encoded_without_padding(pipe):
    """A negative is the pipeline's own Qwen encoding of it alone (template dropped), cut to its real tokens;
    CFG's is the pipeline's own negative: both streams, padded and masked."""
    adapter, call = HunyuanImageAdapter(pipe), encode_call(pipe)
    embeds, mask, glyph, glyph_mask = pipe.encode_prompt(NEG)
    n = real_tokens(pipe, NEG)
    assert int(mask.sum()) == n < embeds.shape[1]
    got = adapter.encode_negative(NEG, call, padded=False)
    assert got.num_tokens == n and got.mask is None and not got.extras
    torch.testing.assert_close(got.embeds, embeds[:, :n], atol=0, rtol=0)
    padded = adapter.encode_negative(NEG, call, padded=True)
    assert padded.num_tokens == embeds.shape[1] and padded.mask.sum().item() == n
    torch.testing.assert_close(padded.extras["glyph"], glyph, atol=0, rtol=0)
    assert not glyph_mask.any()  # no quoted text: the glyph stream is padding only


def test_a_quoted_negative_warns_that_its_glyphs_are_not_used(pipe):
    adapter, call = HunyuanImageAdapter(pipe), encode_call(pipe)
    with torch.no_grad(), pytest.warns(NegGuideWarning, match="quotes text"):
        got = adapter.encode_negative('a sign saying "SALE"', call, padded=False)
    assert got.num_tokens == real_tokens(pipe, 'a sign saying "SALE"')
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        assert adapter.encode_negative('a sign saying "SALE"', call, padded=True).extras["glyph_mask"].any()


@torch.no_grad()
def test_context_embedder_refines_the_prompt_and_each_negative_alone(pipe):
    """The patched text refiner gives the prompt's tokens exactly the unpatched refiner's numbers on the prompt alone,
    and each negative the refiner's numbers on that negative alone (its own pooled mean and self-attention)."""
    refiner = pipe.transformer.context_embedder
    gen = torch.Generator().manual_seed(0)
    p, sizes, width = 6, (3, 4), refiner.proj_in.in_features
    text = torch.randn(2, p + sum(sizes), width, generator=gen)
    pos_mask = torch.tensor([[1] * p, [1] * 4 + [0] * 2])
    neg_masks = (None, torch.tensor([[True] * 4, [True] * 2 + [False] * 2]))
    timestep = torch.tensor([700.0, 700.0])
    glyph = 5  # the reordered text stream starts with the glyph stream: spans count from p + glyph
    spans = ((p + glyph, p + glyph + 3), (p + glyph + 3, p + glyph + 7))
    fwd = Forward(slice(0, 2), TextLayout(p + glyph, p + glyph + 7, spans), spans, neg_masks, (1.0, 1.0), None, None)
    joined_mask = torch.cat([pos_mask, torch.zeros(2, 7, dtype=torch.long)], dim=1)
    got = HunyuanImageAdapter(pipe).patched("context_embedder.forward", refiner.forward, fwd, text, timestep,
                                            joined_mask.bool())  # fmt: skip
    torch.testing.assert_close(got[:, :p], refiner(text[:, :p], timestep, pos_mask.bool()), atol=0, rtol=0)
    torch.testing.assert_close(got[:, p : p + 3], refiner(text[:, p : p + 3], timestep, None), atol=0, rtol=0)
    want = refiner(text[:, p + 3 :], timestep, neg_masks[1])
    torch.testing.assert_close(got[:, p + 3 :][neg_masks[1]], want[neg_masks[1]], atol=0, rtol=0)


# ---------------------------------------------------------------------------- one attention call


def _rms(x, norm):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def _rope(x, cos, sin):
    x = x.float().double()  # diffusers' apply_rotary_emb rounds its input to float32
    rot = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)  # interleaved pairs
    return x * cos[None, :, None] + rot * sin[None, :, None]


def reference_vsf(attn, img, text, cos, sin, p, sizes, alpha, beta, pos_mask, neg_masks):
    """Float64 VSF over ``[I, P, N_1..]`` (image first) with explicit keys ``[.., N_i(1)..]`` and the paper's mask
    table; the rotary embedding on the image tokens only (text, so every negative, unrotated)."""

    def lin(layer, x):
        return x @ layer.weight.T + layer.bias

    def heads(x):
        return x.unflatten(-1, (attn.heads, -1))

    double = attn.add_q_proj is not None
    q = _rope(_rms(heads(lin(attn.to_q, img)), attn.norm_q), cos, sin)
    k = _rope(_rms(heads(lin(attn.to_k, img)), attn.norm_k), cos, sin)
    v = heads(lin(attn.to_v, img))
    tq = _rms(heads(lin(attn.add_q_proj if double else attn.to_q, text)), attn.norm_added_q if double else attn.norm_q)
    tk = _rms(heads(lin(attn.add_k_proj if double else attn.to_k, text)), attn.norm_added_k if double else attn.norm_k)
    tv = heads(lin(attn.add_v_proj if double else attn.to_v, text))
    q, k, v = torch.cat([q, tq], 1), torch.cat([k, tk], 1), torch.cat([v, tv], 1)
    i, length = img.shape[1], q.shape[1]
    starts = [i + p + sum(sizes[:j]) for j in range(len(sizes))]
    negs = [slice(a, a + n) for a, n in zip(starts, sizes)]
    keys = torch.cat([k, *(k[:, s] for s in negs)], dim=1)
    values = torch.cat([v, *(-alpha * v[:, s] for s in negs)], dim=1)
    flips = [slice(length + a - i - p, length + a - i - p + n) for a, n in zip(starts, sizes)]
    bias = torch.zeros(length, keys.shape[1], dtype=torch.float64)
    image, pos = slice(0, i), slice(i, i + p)
    for s, f in zip(negs, flips):
        bias[image, s], bias[image, f] = -math.inf, -beta  # I sees I, P and each N_i(1) with -beta
        bias[pos, s], bias[pos, f] = -math.inf, -math.inf  # P sees I, P
        bias[s, pos] = -math.inf  # N_i sees I and itself
        for s2, f2 in zip(negs, flips):
            bias[s, f2] = -math.inf
            if s2 != s:
                bias[s, s2] = -math.inf
    pad = torch.zeros(q.shape[0], keys.shape[1], dtype=torch.bool)
    pad[:, pos] = ~pos_mask
    for s, f, m in zip(negs, flips, neg_masks):
        pad[:, s], pad[:, f] = ~m, ~m
    logits = torch.einsum("bqhd,bkhd->bhqk", q, keys) / math.sqrt(q.shape[-1]) + bias
    logits = logits.masked_fill(pad[:, None, None, :], -math.inf)
    out = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), values).flatten(2, 3)
    if not double:
        return out[:, :i], out[:, i:]
    return attn.to_out[0](out[:, :i]), attn.to_add_out(out[:, i:])


@pytest.mark.parametrize("kind", ["double", "single"])
@pytest.mark.parametrize("path", ["dense", "split"])
@pytest.mark.parametrize("sizes", [(3,), (3, 2)], ids=["one-negative", "two-negatives"])
def test_processor_matches_float64_reference(pipe, kind, path, sizes):
    """One guided call equals the mask-table reference (negatives unrotated like text; padding masks honoured;
    the model's own attention mask ignored for the core's)."""
    block = (pipe.transformer.transformer_blocks if kind == "double" else pipe.transformer.single_transformer_blocks)[0]
    attn = copy.deepcopy(block.attn).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in attn.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    batch, p, n_img, dim = 2, 5, 7, attn.query_dim
    t = p + sum(sizes)
    angles = 3 * torch.randn(n_img, attn.inner_dim // attn.heads // 2, generator=gen, dtype=torch.float64)
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    text = torch.randn(batch, t, dim, generator=gen, dtype=torch.float64)
    img = torch.randn(batch, n_img, dim, generator=gen, dtype=torch.float64)
    pos_mask = torch.tensor([[True] * p, [True] * (p - 2) + [False] * 2])
    neg_masks = [torch.tensor([[True] * n, [True] * (n - 1) + [False]]) for n in sizes]
    spans = tuple((p + sum(sizes[:j]), p + sum(sizes[: j + 1])) for j in range(len(sizes)))

    method_cls = get_method("vsf")
    method = method_cls(method_cls.make_config({"scale": 2.5, "bias": 0.25, "attention": path}))
    installation_ = Installation(pipe, HunyuanImageAdapter(pipe), method, [NegativeSpec("x")])
    installation_.forward = Forward(slice(0, batch), TextLayout(p, t, spans), spans, tuple(neg_masks),
                                    (1.0,) * len(sizes), pos_mask, None)  # fmt: skip
    proc = guided_processor(installation_, attn.processor, 0, 2)
    model_mask = torch.ones(batch, 1, 1, n_img + t, dtype=torch.bool)
    model_mask[:, 0, 0, n_img + p :] = False  # what the model passes: the negatives marked as padding
    with torch.no_grad():
        got = proc(attn, img, text, model_mask, (cos, sin))
        want = reference_vsf(attn, img, text, cos, sin, p, sizes, 2.5, 0.25, pos_mask, neg_masks)
    tol = {"atol": 1e-6 if path == "dense" else 2e-5, "rtol": 0}  # RoPE rounds to float32; split merges in float32
    torch.testing.assert_close(got[0], want[0], **tol)
    real = torch.cat([pos_mask, *neg_masks], dim=1)
    torch.testing.assert_close(got[1][real], want[1][real], **tol)  # padding tokens' outputs are never read


def test_other_processors_are_refused():
    from diffusers.models.attention_processor import AttnProcessor2_0

    other = tiny.hunyuanimage()
    other.transformer.single_transformer_blocks[0].attn.set_processor(AttnProcessor2_0())
    with pytest.raises(NoAdapterError, match="HunyuanImageAttnProcessor in block 1"):
        negguide.apply(other, "vsf", negative_prompt="snow")
    assert "encode_prompt" not in other.__dict__


# ---------------------------------------------------------------------------- end to end


@torch.no_grad()
def test_negatives_sit_after_the_whole_prompt(pipe):
    """The text stream reaching the blocks is the unpatched one (glyph and Qwen tokens reordered, padding last),
    then each negative as the refiner makes it of that negative alone."""
    seen = []
    hook = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(
        lambda module, args: seen.append(args[1].clone())
    )
    try:
        run(pipe, num_inference_steps=1)
        with negguide.apply(pipe, "vsf", negative_prompt=NEG, bias=math.inf):
            run(pipe, num_inference_steps=1)
    finally:
        hook.remove()
    plain, guided = seen
    n = real_tokens(pipe, NEG)
    assert guided.shape[1] == plain.shape[1] + n
    torch.testing.assert_close(guided[:, : plain.shape[1]], plain, atol=0, rtol=0)
    embeds = pipe.encode_prompt(NEG)[0][:, :n]
    timestep = torch.tensor([1000.0])  # the first step of a 1-step call
    torch.testing.assert_close(guided[:, plain.shape[1] :], pipe.transformer.context_embedder(embeds, timestep),
                               atol=1e-6, rtol=0)  # fmt: skip


def test_guider_branches_pred_cond_only_is_guided():
    """The base model's APG-mix guider runs pred_cond and pred_uncond as separate calls: the negatives join the
    conditional call only, and VSF with bias=inf equals the guider's own result."""
    target = tiny.hunyuanimage(guider=apg_guider())
    own = run(target, negative_prompt="ugly")
    seen = []
    with negguide.apply(target, "vsf", negative_prompt=NEG, bias=math.inf):
        hook = target.transformer.register_forward_pre_hook(  # after negguide's: it sees the joined text
            lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True
        )
        try:
            close(run(target, negative_prompt="ugly"), own)
        finally:
            hook.remove()
    assert seen == [32 + real_tokens(target, NEG), 32] * 2


def test_cfg_equals_the_guiders_own_cfg():
    """negguide's CFG (no guider: the negative branch batched beside the prompt, both streams encoded as the
    pipeline's own negative) equals the pipeline with a CFG guider and that negative prompt; also for a negative
    quoting text (its glyph stream included)."""
    plain, guided = tiny.hunyuanimage(), tiny.hunyuanimage(guider=cfg_guider(3.0))
    for negative in (NEG, 'a sign saying "SALE"'):
        own = run(guided, prompt='a cat holding a sign "hi"', negative_prompt=negative)
        with negguide.apply(plain, "cfg", negative_prompt=negative, scale=3.0):
            close(run(plain, prompt='a cat holding a sign "hi"'), own)


def test_cfg_beside_the_guider_batches_into_the_conditional_call_only():
    """negguide's CFG beside the guider's own: the pred_uncond call stays as the guider made it."""
    target = tiny.hunyuanimage(guider=cfg_guider(2.0))
    rows = []
    hook = target.transformer.register_forward_hook(lambda module, args, output: rows.append(output[0].shape[0]))
    try:
        with negguide.apply(target, "cfg", negative_prompt=NEG, scale=3.0):
            out = run(target, negative_prompt="ugly")
    finally:
        hook.remove()
    assert rows == [2, 1] * 2 and np.isfinite(out).all()


def test_distilled_is_guided_every_step():
    """2.1 Distilled (guidance embedding, MeanFlow's timestep_r, no guider): one call per step, each guided."""
    target = tiny.hunyuanimage(kind="distilled")
    base = run(target, distilled_guidance_scale=3.25)
    with negguide.apply(target, "vsf", negative_prompt=NEG, bias=math.inf):
        close(run(target, distilled_guidance_scale=3.25), base)
    with negguide.apply(target, "nag", negative_prompt=NEG) as handle:
        calls = []
        original = handle.installation.run_method
        handle.installation.run_method = lambda seg, processor: (
            calls.append(processor.index) or original(seg, processor)
        )
        out = run(target, distilled_guidance_scale=3.25)
    assert calls == [0, 1] * 2 and differs(out, base)
    with negguide.apply(target, "cfg", negative_prompt=NEG, scale=2.0):
        assert differs(run(target, distilled_guidance_scale=3.25), base)


# ---------------------------------------------------------------------------- the refiner


@pytest.fixture(scope="module")
def refiner_case(image):
    return testing.Case(
        build=functools.partial(tiny.hunyuanimage, kind="refiner"),
        call={**tiny.CALL_KWARGS["hunyuanimage"], "image": image},
    )


@pytest.mark.parametrize(
    "check", ["vsf_infinite_bias_is_unguided", "remove_is_bit_exact", "compiles_without_recompiles"]
)
def test_refiner(refiner_case, check):
    """HunyuanImageRefinerPipeline (no glyph stream, 5-D latents): isolation, restore, and compile (it has no glyph
    reorder, so its transformer compiles with fullgraph=True)."""
    testing.CHECKS[check](refiner_case)


def test_refiner_batches_differ_from_prompts_alone_unguided(refiner_case):
    """Why the batch check is not run on the refiner: it samples the input image's latents with the first generator
    of the list for every row, so a batch differs from each prompt alone without negguide."""
    both = refiner_case.run(prompt=list(refiner_case.prompts), seed=[0, 1])
    assert differs(both[1:], refiner_case.run(prompt=refiner_case.prompts[1], seed=1))


# ---------------------------------------------------------------------------- the conformance kit

CASE = testing.Case(build=tiny.hunyuanimage, call=tiny.CALL_KWARGS["hunyuanimage"])
GUIDER_CASE = testing.Case(
    build=lambda: tiny.hunyuanimage(guider=apg_guider()),
    call=tiny.CALL_KWARGS["hunyuanimage"],
    pipeline_cfg={"negative_prompt": "ugly"},
)


def test_unpatched_transformer_does_not_compile_fullgraph():
    """Why the compile check runs on the refiner: the base transformer's glyph reorder (boolean indexing per row)
    has data-dependent shapes, so diffusers' own model fails under fullgraph=True, negguide or not. In a fresh
    interpreter: dynamo's global state left by other tests in the same worker must not decide it."""
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from negguide import tiny\n"
        "from tests.adapters.test_hunyuanimage import run\n"
        "target = tiny.hunyuanimage()\n"
        "target.transformer.compile(backend='aot_eager', fullgraph=True)\n"
        "try:\n"
        "    run(target, num_inference_steps=1)\n"
        "except Exception as exc:\n"
        "    print('RAISED', 'data-dependent' in str(exc))\n"
        "else:\n"
        "    print('COMPILED')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "RAISED True", done.stdout[-2000:] + done.stderr[-2000:]


@pytest.mark.parametrize("check", sorted(set(testing.CHECKS) - {"compiles_without_recompiles"}))
def test_conformance(check):
    """The adapter passes every check of negguide.testing on the tiny pipeline (the pipeline's own CFG: with its
    guider; compile: on the refiner)."""
    testing.CHECKS[check](GUIDER_CASE if check == "pipeline_cfg_guides_conditional_rows" else CASE)
