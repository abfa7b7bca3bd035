"""The Flux.2 adapter on tiny offline Flux.2 pipelines: dev (Mistral-3), Klein, Klein inpaint and Klein KV (Qwen3).

Numbers are checked against the unpatched pipelines (their own CFG, unguided runs) or against an independent
float64 re-implementation of one guided attention call (the paper's mask table over explicit keys, rotary positions
from explicit per-token ids, the parallel block's MLP).
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
from negguide.adapter import TextLayout
from negguide.adapters.flux2 import Flux2Adapter
from negguide.errors import ConfigError
from negguide.errors import NoAdapterError
from negguide.installation import Forward
from negguide.installation import GuidedProcessor
from negguide.installation import Installation
from negguide.installation import guided_processor
from negguide.negatives import NegativeSpec
from negguide.registry import adapter_for
from negguide.registry import get_method
from negguide.tiny.families import flux2 as tiny_flux2

CALL = {"num_inference_steps": 2, **tiny_flux2.CALL}
PROMPT = "a red cat on a mat"
NEG = "snow, blurry"


@functools.cache
def tiny(kind: str, is_distilled: bool = False):
    return tiny_flux2.build(kind=kind, is_distilled=is_distilled)


@pytest.fixture(scope="module")
def image():
    from PIL import Image

    return Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8"))


def run(pipe, prompt=PROMPT, seed=0, **kwargs):
    call = {**CALL, **kwargs}
    if "KV" in type(pipe).__name__:
        call.pop("guidance_scale")  # the KV pipeline has no CFG and no guidance argument
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), **call).images


def close(a, b, atol=2e-6):
    np.testing.assert_allclose(a, b, atol=atol, rtol=0)


def differs(a, b, by=1e-5):
    return float(np.abs(a - b).max()) > by


# ---------------------------------------------------------------------------- facts


@pytest.mark.parametrize("kind", tiny_flux2.KINDS)
def test_adapter_resolves(kind):
    pipe = tiny(kind)
    assert adapter_for(pipe) is Flux2Adapter
    names = Flux2Adapter(pipe).attention_modules(pipe.transformer)
    assert names == {"transformer_blocks.0.attn.processor": 0, "single_transformer_blocks.0.attn.processor": 1}


@pytest.mark.parametrize("kind", ["dev", "klein"])
def test_negatives_are_encoded_without_padding(kind):
    """A negative is its real tokens only (chat template included), and they equal the padded encoding's first
    rows (causal encoders, right padding): no token is lost or added."""
    pipe = tiny(kind)
    with negguide.apply(pipe, "vsf", negative_prompt=NEG) as handle:
        run(pipe)
        encoded = handle.installation.encoded[0].embeds
    # the tiny tokenizers give one token per byte; the templates add 5 + the system message (dev) or 25 (Klein)
    template = 5 + len(tiny_flux2.SYSTEM_MESSAGE) if kind == "dev" else 25
    n = len(NEG.encode()) + template
    assert encoded.shape[:2] == (1, n)
    with torch.no_grad():
        padded = pipe.encode_prompt(NEG, max_sequence_length=64, text_encoder_out_layers=(1, 2, 3))[0]
    torch.testing.assert_close(encoded, padded[:, :n], atol=1e-6, rtol=0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_join_gives_negatives_text_ids_counted_from_zero(ndim):
    pipe = tiny("klein")
    adapter = Flux2Adapter(pipe)
    text, neg = torch.randn(2, 5, 96), torch.randn(2, 3, 96)
    ids = pipe._prepare_text_ids(text)  # (2, 5, 4): (0, 0, 0, j)
    ids = ids if ndim == 3 else ids[0]
    joined = adapter.join({"encoder_hidden_states": text, "txt_ids": ids, "guidance": "kept"}, neg, None)
    out = joined.kwargs
    assert torch.equal(out["encoder_hidden_states"], torch.cat([text, neg], dim=1)) and joined.num_pos == 5
    assert out["txt_ids"].ndim == ndim and out["guidance"] == "kept"
    want = torch.tensor([[0, 0, 0, j] for j in [*range(5), *range(3)]])
    assert torch.equal(out["txt_ids"] if ndim == 2 else out["txt_ids"][1], want)


# ---------------------------------------------------------------------------- one attention call, float64


def rope64(ids, axes=(4, 4, 4, 4), theta=2000):
    """The rotary table ``(cos, sin)`` of ``ids`` ``(L, 4)`` in float64, written from the Flux.2 definition."""
    cos, sin = [], []
    for axis, dim in enumerate(axes):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles = ids[:, axis].double()[:, None] * freqs[None]
        cos.append(angles.cos().repeat_interleave(2, -1))
        sin.append(angles.sin().repeat_interleave(2, -1))
    return torch.cat(cos, -1), torch.cat(sin, -1)


def text_ids(n):
    return torch.tensor([[0, 0, 0, j] for j in range(n)])


def image_ids(n, t=0):
    return torch.tensor([[t, i // 4, i % 4, 0] for i in range(n)])


def test_rope64_is_the_models_table():
    ids = torch.cat([text_ids(6), image_ids(8)])
    for got, want in zip(tiny("klein").transformer.pos_embed(ids), rope64(ids)):
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)


def _rms(x, norm):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def _rotate(x, cos, sin):
    x = x.float().double()  # diffusers' apply_rotary_emb rounds its input to float32
    rot = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
    return x * cos[None, :, None] + rot * sin[None, :, None]


def _lin(layer, x):
    out = x @ layer.weight.T
    return out if layer.bias is None else out + layer.bias


def reference_vsf(attn, text, image, ids, p, sizes, alpha, beta, masks, ref=0):
    """Float64 VSF of one Flux.2 attention call.

    Queries ``[P, N_1, .., I]`` (``text`` is ``[P, N_1, ..]``), explicit keys ``[P, N_1(0) .., I, N_1(1) ..]`` with
    the paper's mask table (I sees I, P and each N_i(1) at ``-beta`` with values ``-alpha V``; P sees I, P; N_i sees
    I and N_i); every token rotated by its own id in ``ids``. The first ``ref`` image tokens (KV extract step) attend
    to themselves only. Returns the processor's outputs.
    """
    parallel = hasattr(attn, "to_qkv_mlp_proj")

    def heads(x):
        return x.unflatten(-1, (-1, attn.head_dim))

    if parallel:
        proj = _lin(attn.to_qkv_mlp_proj, torch.cat([text, image], dim=1))
        qkv, mlp = proj.split([3 * attn.inner_dim, proj.shape[-1] - 3 * attn.inner_dim], dim=-1)
        q, k, v = (heads(x) for x in qkv.chunk(3, dim=-1))
        q, k = _rms(q, attn.norm_q), _rms(k, attn.norm_k)
    else:
        q = torch.cat([_rms(heads(_lin(attn.add_q_proj, text)), attn.norm_added_q),
                       _rms(heads(_lin(attn.to_q, image)), attn.norm_q)], dim=1)  # fmt: skip
        k = torch.cat([_rms(heads(_lin(attn.add_k_proj, text)), attn.norm_added_k),
                       _rms(heads(_lin(attn.to_k, image)), attn.norm_k)], dim=1)  # fmt: skip
        v = torch.cat([heads(_lin(attn.add_v_proj, text)), heads(_lin(attn.to_v, image))], dim=1)
    cos, sin = rope64(ids)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    t, length = text.shape[1], q.shape[1]
    bounds = [p]
    for n in sizes:
        bounds.append(bounds[-1] + n)
    negs = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    keys = torch.cat([k, *(k[:, s] for s in negs)], dim=1)
    values = torch.cat([v, *(-alpha * v[:, s] for s in negs)], dim=1)
    flips = [slice(length + a - p, length + b - p) for a, b in zip(bounds[:-1], bounds[1:])]
    bias = torch.zeros(length, keys.shape[1], dtype=torch.float64)
    img, pos = slice(t, length), slice(0, p)
    for i, (neg, flip) in enumerate(zip(negs, flips)):
        bias[img, neg], bias[img, flip] = -math.inf, -beta  # I sees I, P and N_i(1) with -beta
        bias[pos, neg], bias[pos, flip] = -math.inf, -math.inf  # P sees I, P
        bias[neg, pos], bias[neg, flip] = -math.inf, -math.inf  # N_i sees I and itself
        for j, (other, other_flip) in enumerate(zip(negs, flips)):
            if j != i:
                bias[neg, other], bias[neg, other_flip] = -math.inf, -math.inf
    if ref:  # the reference tokens see themselves only
        bias[t : t + ref] = -math.inf
        bias[t : t + ref, t : t + ref] = 0.0
    logits = torch.einsum("bqhd,bkhd->bhqk", q, keys) / math.sqrt(q.shape[-1]) + bias
    if masks is not None:
        pad = torch.zeros(q.shape[0], keys.shape[1], dtype=torch.bool)
        for s, flip, m in zip(negs, flips, masks):
            if m is not None:
                pad[:, s], pad[:, flip] = ~m, ~m
        logits = logits.masked_fill(pad[:, None, None, :], -math.inf)
    out = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), values).flatten(2, 3)
    if parallel:
        half = mlp.shape[-1] // 2
        return _lin(attn.to_out, torch.cat([out, torch.nn.functional.silu(mlp[..., :half]) * mlp[..., half:]], -1))
    return _lin(attn.to_out[0], out[:, t:]), _lin(attn.to_add_out, out[:, :t])


def _attention(kind):
    transformer = tiny("klein").transformer
    block = transformer.transformer_blocks[0] if kind == "double" else transformer.single_transformer_blocks[0]
    attn = copy.deepcopy(block.attn).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in attn.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    return attn, gen


def _installation(sizes, p, batch, masks, path):
    method_cls = get_method("vsf")
    method = method_cls(method_cls.make_config({"scale": 2.5, "bias": 0.25, "attention": path}))
    pipe = tiny("klein")
    installation = Installation(pipe, Flux2Adapter(pipe), method, [NegativeSpec("x")] * len(sizes))
    starts = [p + sum(sizes[:i]) for i in range(len(sizes))]
    spans = tuple((a, a + n) for a, n in zip(starts, sizes))
    t = p + sum(sizes)
    layout = TextLayout(p, t, spans)
    installation.forward = Forward(slice(0, batch), layout, spans, tuple(masks), (1.0,) * len(sizes), None, None)
    return installation


@pytest.mark.parametrize("kind", ["double", "single"])
@pytest.mark.parametrize("path", ["dense", "split"])
@pytest.mark.parametrize("sizes", [(3,), (3, 2)])
def test_processor_matches_float64_reference(kind, path, sizes):
    """One guided call equals the mask-table reference, negatives rotated at text positions counted from zero (the
    model's table, built from ``join``'s ids, holds them counted over the whole negative block); a padded negative."""
    attn, gen = _attention(kind)
    batch, p, n_img, dim = 2, 5, 8, attn.query_dim
    masks = [torch.tensor([[True] * n, [True] * (n - 1) + [False]]) for n in sizes]
    installation = _installation(sizes, p, batch, masks, path)
    proc = guided_processor(installation, attn.processor, 0 if kind == "double" else 1, 2)
    text = torch.randn(batch, p + sum(sizes), dim, generator=gen, dtype=torch.float64)
    image = torch.randn(batch, n_img, dim, generator=gen, dtype=torch.float64)
    table = rope64(torch.cat([text_ids(p), text_ids(sum(sizes)), image_ids(n_img)]))  # what the model computes
    ids = torch.cat([text_ids(p), *(text_ids(n) for n in sizes), image_ids(n_img)])  # where each token belongs
    want = reference_vsf(attn, text, image, ids, p, sizes, 2.5, 0.25, masks)
    tol = {"atol": 1e-10 if path == "dense" else 1e-5, "rtol": 0}  # the split path merges in float32
    with torch.no_grad():
        if kind == "double":
            got = proc(attn, image, text, None, table)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, **tol)
        else:
            got = proc(attn, torch.cat([text, image], dim=1), None, table)
            torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("kind", ["double", "single"])
def test_kv_processors_extract_and_cached_steps_match_the_reference(kind):
    """Klein KV: on the extract step the reference tokens (first image tokens) see themselves only and are cached;
    a cached step then gives the text and image tokens the same outputs without recomputing them."""
    from diffusers.models.transformers.transformer_flux2 import Flux2KVAttnProcessor
    from diffusers.models.transformers.transformer_flux2 import Flux2KVLayerCache
    from diffusers.models.transformers.transformer_flux2 import Flux2KVParallelSelfAttnProcessor

    attn, gen = _attention(kind)
    attn.set_processor(Flux2KVAttnProcessor() if kind == "double" else Flux2KVParallelSelfAttnProcessor())
    batch, p, n, ref, n_img, dim = 1, 5, 3, 4, 8, attn.query_dim
    installation = _installation((n,), p, batch, [None], "dense")
    proc = guided_processor(installation, attn.processor, 0, 2)
    text = torch.randn(batch, p + n, dim, generator=gen, dtype=torch.float64)
    image = torch.randn(batch, ref + n_img, dim, generator=gen, dtype=torch.float64)
    img_ids = torch.cat([image_ids(ref, t=10), image_ids(n_img)])
    ids = torch.cat([text_ids(p), text_ids(n), img_ids])
    want = reference_vsf(attn, text, image, ids, p, (n,), 2.5, 0.25, None, ref=ref)
    cache = Flux2KVLayerCache()
    table = rope64(ids)
    cached_table = rope64(torch.cat([text_ids(p), text_ids(n), image_ids(n_img)]))
    with torch.no_grad():
        if kind == "double":
            extract = proc(attn, image, text, None, table, cache, "extract", ref)
            cached = proc(attn, image[:, ref:], text, None, cached_table, cache, "cached", ref)
            for e, w in zip(extract, want):
                torch.testing.assert_close(e, w, atol=1e-10, rtol=0)
            torch.testing.assert_close(cached[0], want[0][:, ref:], atol=1e-10, rtol=0)
            torch.testing.assert_close(cached[1], want[1], atol=1e-10, rtol=0)
        else:
            t = p + n
            extract = proc(attn, torch.cat([text, image], dim=1), None, table, cache, "extract", t, ref)
            seq = torch.cat([text, image[:, ref:]], dim=1)
            cached = proc(attn, seq, None, cached_table, cache, "cached", t, ref)
            torch.testing.assert_close(extract, want, atol=1e-10, rtol=0)
            torch.testing.assert_close(cached, torch.cat([want[:, :t], want[:, t + ref :]], dim=1), atol=1e-10, rtol=0)
    assert cache.k_ref.shape[1] == ref


def test_processor_inactive_calls_the_original_bit_for_bit():
    pipe = tiny("klein")
    installation = Installation(pipe, Flux2Adapter(pipe), get_method("vsf")(), [NegativeSpec("x")])
    gen = torch.Generator().manual_seed(0)
    for index, block in enumerate(
        [pipe.transformer.transformer_blocks[0], pipe.transformer.single_transformer_blocks[0]]
    ):
        attn = block.attn
        proc = guided_processor(installation, attn.processor, index, 2)
        img, text = torch.randn(1, 6, attn.query_dim, generator=gen), torch.randn(1, 4, attn.query_dim, generator=gen)
        args = (img, text) if index == 0 else (torch.cat([text, img], dim=1),)
        with torch.no_grad():
            got, want = proc(attn, *args), attn.processor(attn, *args)
        for g, w in zip(got if index == 0 else [got], want if index == 0 else [want]):
            assert torch.equal(g, w)


# ---------------------------------------------------------------------------- end to end


PIPELINES = {
    "dev": ("dev", {}),
    "dev-edit": ("dev", {"image": True}),
    "klein-edit": ("klein", {"image": True}),
    "klein-inpaint": ("klein_inpaint", {"image": True, "mask_image": True, "strength": 0.9}),
    "klein-kv": ("klein_kv", {"image": True}),
}


def _kwargs(extra, image):
    out = dict(extra)
    if out.get("image"):
        out["image"] = image
    if out.get("mask_image"):
        from PIL import Image

        out["mask_image"] = Image.fromarray(((np.arange(64 * 64).reshape(64, 64) % 7) > 2).astype("uint8") * 255)
    if "mask_image" in out:
        out.update(height=64, width=64)
    return out


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_vsf_infinite_bias_is_unguided_and_vsf_guides(name, image):
    """Every pipeline sharing the denoiser: the negatives are isolated (bias=inf) and guide otherwise."""
    kind, extra = PIPELINES[name]
    pipe, kwargs = tiny(kind), _kwargs(extra, image)
    base = run(pipe, **kwargs)
    with negguide.apply(pipe, "vsf", negative_prompt=NEG, bias=math.inf):
        close(run(pipe, **kwargs), base)
    with negguide.apply(pipe, "vsf", negative_prompt=NEG):
        out = run(pipe, **kwargs)
    assert np.isfinite(out).all() and differs(out, base)


@pytest.mark.parametrize("kind", ["klein", "klein_inpaint"])
def test_cfg_equals_kleins_own_cfg(kind, image):
    """Klein runs its own CFG with ``negative_prompt_embeds``; negguide's ``cfg`` gives the same numbers."""
    pipe, kwargs = tiny(kind), _kwargs(PIPELINES["klein-inpaint"][1], image) if kind == "klein_inpaint" else {}
    with torch.no_grad():
        embeds = pipe.encode_prompt(NEG, max_sequence_length=64, text_encoder_out_layers=(1, 2, 3))[0]
    want = run(pipe, negative_prompt_embeds=embeds, guidance_scale=2.5, **kwargs)
    with negguide.apply(pipe, "cfg", negative_prompt=NEG, scale=2.5):
        close(run(pipe, **kwargs), want)
    with negguide.apply(pipe, "cfg", negative_prompt_embeds=embeds, scale=2.5):
        close(run(pipe, **kwargs), want)
    assert differs(want, run(pipe, **kwargs))


def test_cfg_on_dev_runs_true_cfg_beside_the_guidance_embedding():
    pipe = tiny("dev")
    base = run(pipe)
    with negguide.apply(pipe, "cfg", negative_prompt=NEG, scale=1.0):
        close(run(pipe), base)
    with negguide.apply(pipe, "cfg", negative_prompt=NEG, scale=2.5) as handle:
        out = run(pipe)
        assert handle.installation.encoded[0].num_tokens == CALL["max_sequence_length"]  # batched beside the prompt
    assert np.isfinite(out).all() and differs(out, base)


def test_kv_pipeline_without_reference_images_equals_klein():
    """Without reference images the KV processors behave as the standard ones, guided too."""
    kv, klein = tiny("klein_kv", is_distilled=True), tiny("klein", is_distilled=True)
    for method in ("vsf", "nag"):
        outs = []
        for pipe in (kv, klein):
            with negguide.apply(pipe, method, negative_prompt=NEG):
                outs.append(run(pipe))
        close(*outs)


def test_both_block_kinds_are_patched_and_layers_select_them():
    pipe = tiny("klein")
    base = run(pipe)
    with negguide.apply(pipe, "vsf", negative_prompt=NEG) as handle:
        guided = {k: v.index for k, v in pipe.transformer.attn_processors.items() if isinstance(v, GuidedProcessor)}
        assert guided == {"transformer_blocks.0.attn.processor": 0, "single_transformer_blocks.0.attn.processor": 1}
        assert handle.adapter.num_layers(pipe.transformer) == 2
    outs = {}
    for name, layers in {"double": [0], "single": [1], "last": [-1]}.items():
        with negguide.apply(pipe, "vsf", negative_prompt=NEG, layers=layers):
            outs[name] = run(pipe)
    assert differs(outs["double"], base) and differs(outs["single"], base)
    assert differs(outs["double"], outs["single"])
    close(outs["single"], outs["last"])


def test_negative_prompt_embeds_equal_the_text_path():
    pipe = tiny("dev")
    with negguide.apply(pipe, "vsf", negative_prompt=NEG) as handle:
        from_text = run(pipe)
        n = handle.installation.encoded[0].num_tokens
    with torch.no_grad():
        embeds = pipe.encode_prompt(NEG, max_sequence_length=n, text_encoder_out_layers=(1, 2, 3))[0]
    with negguide.apply(pipe, "vsf", negative_prompt_embeds=embeds):
        close(run(pipe), from_text)


def test_refused_configurations():
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe = tiny("klein")
    base = run(pipe)
    with negguide.apply(pipe, "vsf", negative_prompt=NEG), pytest.raises(ConfigError, match="attention mask"):
        run(pipe, attention_kwargs={"attention_mask": torch.ones(1, 1)})
    close(run(pipe), base)  # the error removed the guidance
    processor = pipe.transformer.single_transformer_blocks[0].attn.processor
    try:
        processor._parallel_config = object()  # as enable_parallelism leaves it
        with pytest.raises(NoAdapterError, match="context parallelism"):
            negguide.apply(pipe, "vsf", negative_prompt=NEG)
    finally:
        del processor._parallel_config
    attn = pipe.transformer.transformer_blocks[0].attn
    saved = attn.processor
    try:
        attn.set_processor(AttnProcessor2_0())
        with pytest.raises(NoAdapterError, match="expected one of Flux2AttnProcessor"):
            negguide.apply(pipe, "vsf", negative_prompt=NEG)
    finally:
        attn.set_processor(saved)
    close(run(pipe), base)


# ---------------------------------------------------------------------------- the conformance kit

CASE = testing.Case(
    build=functools.partial(tiny_flux2.build, kind="klein"), call=tiny_flux2.CALL, pipeline_cfg={"guidance_scale": 2.0}
)


@pytest.mark.parametrize("check", sorted(testing.CHECKS))
def test_conformance(check):
    """The adapter passes every check of negguide.testing on the tiny Klein pipeline (its own CFG included)."""
    testing.CHECKS[check](CASE)
