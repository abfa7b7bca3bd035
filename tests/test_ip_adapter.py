"""IP-Adapters with negguide: Flux's (and Chroma's) ``FluxIPAdapterAttnProcessor`` and the UNet's
``IPAdapterAttnProcessor2_0``.

The IP-Adapters are loaded with diffusers' own loader (``_load_ip_adapter_weights``) from random state dicts of
the real layout, so no download is needed. Numbers are checked against the unpatched pipeline (unguided runs,
its own CFG) and against a float64 re-implementation of one guided call including the image-prompt term. Both
processors keep the image-prompt attention apart from the text's, so a guided call keeps it exactly.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import negguide
from negguide import tiny
from negguide.adapter import TextLayout
from negguide.adapters.flux import FluxAdapter
from negguide.errors import NegGuideError
from negguide.errors import NoAdapterError
from negguide.installation import Forward
from negguide.installation import Installation
from negguide.installation import guided_processor
from negguide.negatives import NegativeSpec
from negguide.registry import get_method
from tests.adapters.helpers import close
from tests.adapters.helpers import differs
from tests.adapters.test_flux import _rms
from tests.adapters.test_flux import assert_restored
from tests.adapters.test_flux import reference_vsf
from tests.adapters.test_flux import snapshot

CALL = {"num_inference_steps": 2, **tiny.CALL_KWARGS["flux"]}
CLIP_DIM, IP_TOKENS = 24, 4


def flux_with_ip_adapter(seed: int = 0, build=tiny.flux):
    """A tiny Flux (or, with ``build``, Flux-family) pipeline with one IP-Adapter (random weights) loaded by
    diffusers' own loader."""
    pipe = build(seed=seed)
    t = pipe.transformer
    gen = torch.Generator().manual_seed(seed + 3)
    cross = t.config.joint_attention_dim

    def rand(*shape, std=0.3):
        return std * torch.randn(*shape, generator=gen)

    state = {
        "image_proj": {
            "proj.weight": rand(IP_TOKENS * cross, CLIP_DIM),
            "proj.bias": rand(IP_TOKENS * cross),
            "norm.weight": 1 + rand(cross),
            "norm.bias": rand(cross),
        },  # fmt: skip
        "ip_adapter": {},
    }
    for i in range(len(t.transformer_blocks)):
        for name in ("to_k_ip", "to_v_ip"):
            state["ip_adapter"][f"{i}.{name}.weight"] = rand(t.inner_dim, cross, std=1.0)
            state["ip_adapter"][f"{i}.{name}.bias"] = rand(t.inner_dim)
    t._load_ip_adapter_weights(state, low_cpu_mem_usage=False)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return flux_with_ip_adapter()


@pytest.fixture(scope="module")
def image_embeds():
    return torch.randn(1, 1, CLIP_DIM, generator=torch.Generator().manual_seed(7))


def run(pipe, embeds, seed=0, negative_embeds=None, **kwargs):
    """One call with the image prompt ``embeds`` (the negative image prompt given too: no image encoder)."""
    neg = torch.zeros_like(embeds) if negative_embeds is None else negative_embeds
    with torch.no_grad():
        return pipe(prompt="a red cube on a table", generator=torch.Generator().manual_seed(seed),
                    ip_adapter_image_embeds=[embeds], negative_ip_adapter_image_embeds=[neg],
                    **{**CALL, **kwargs}).images  # fmt: skip


def test_the_ip_adapter_is_loaded_and_its_term_matters(pipe, image_embeds):
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    assert isinstance(pipe.transformer.transformer_blocks[0].attn.processor, FluxIPAdapterAttnProcessor)
    other = run(pipe, image_embeds + 1.0)
    assert differs(run(pipe, image_embeds), other)


@pytest.mark.parametrize("path", ["dense", "split"])
def test_vsf_with_infinite_bias_equals_the_unguided_ip_adapter_output(pipe, image_embeds, path):
    base = run(pipe, image_embeds, num_images_per_prompt=2)
    with negguide.apply(pipe, "vsf", negative_prompt="snow, blurry", bias=float("inf"), attention=path):
        out = run(pipe, image_embeds, num_images_per_prompt=2)
    close(out, base)


@pytest.mark.parametrize("method", ["vsf", "nag", "nasa"])
def test_guided_output_differs(pipe, image_embeds, method):
    base = run(pipe, image_embeds)
    params = {"vsf": {"scale": 4.0, "bias": 0.0}, "nag": {"scale": 5.0, "alpha": 1.0}, "nasa": {"scale": 2.0}}
    with negguide.apply(pipe, method, negative_prompt="snow, blurry", **params[method]):
        out = run(pipe, image_embeds)
    assert differs(out, base)


def test_nag_with_scale_one_is_unguided(pipe, image_embeds):
    base = run(pipe, image_embeds)
    with negguide.apply(pipe, "nag", negative_prompt="snow, blurry", scale=1.0):
        close(run(pipe, image_embeds), base)


def reference_ip_term(attn, processor, hidden, ip_states):
    """Float64 image-prompt term of ``FluxIPAdapterAttnProcessor``: normed image queries (no rotary embedding)
    over each adapter's projected image tokens, times its scale."""
    heads = attn.heads
    query = (hidden @ attn.to_q.weight.T + attn.to_q.bias).unflatten(-1, (heads, -1))
    query = _rms(query, attn.norm_q)
    total = torch.zeros(hidden.shape[0], hidden.shape[1], heads * attn.head_dim, dtype=torch.float64)
    for states, scale, to_k, to_v in zip(ip_states, processor.scale, processor.to_k_ip, processor.to_v_ip):
        key = (states @ to_k.weight.T + to_k.bias).reshape(hidden.shape[0], -1, heads, attn.head_dim)
        value = (states @ to_v.weight.T + to_v.bias).reshape(hidden.shape[0], -1, heads, attn.head_dim)
        logits = torch.einsum("bqhd,bkhd->bhqk", query, key) / math.sqrt(attn.head_dim)
        total = total + scale * torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), value).flatten(2, 3)
    return total


@pytest.mark.parametrize("path", ["dense", "split"])
def test_one_guided_call_matches_a_float64_reference_with_the_ip_term(pipe, path):
    attn = copy.deepcopy(pipe.transformer.transformer_blocks[0].attn).double()
    original = attn.processor
    original.scale = [0.7]
    gen = torch.Generator().manual_seed(1)
    batch, p, n, n_img, dim = 2, 5, 3, 7, attn.query_dim
    angles = torch.randn(p + n + n_img, attn.head_dim // 2, generator=gen, dtype=torch.float64)
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    text = torch.randn(batch, p + n, dim, generator=gen, dtype=torch.float64)
    img = torch.randn(batch, n_img, dim, generator=gen, dtype=torch.float64)
    ip_states = [torch.randn(batch, 1, IP_TOKENS, pipe.transformer.config.joint_attention_dim, generator=gen,
                             dtype=torch.float64)]  # fmt: skip

    method_cls = get_method("vsf")
    method = method_cls(method_cls.make_config({"scale": 2.5, "bias": 0.25, "attention": path}))
    installation = Installation(pipe, FluxAdapter(pipe), method, [NegativeSpec("x")])
    installation.forward = Forward(slice(0, batch), TextLayout(p, p + n), ((p, p + n),), (None,), (1.0,), None, None)
    proc = guided_processor(installation, original, 0, 2)
    with torch.no_grad():
        got = proc(attn, img, text, None, (cos, sin), ip_states)
        want_img, want_text = reference_vsf(attn, img, text, cos, sin, p, n, 2.5, 0.25)
        want_ip = reference_ip_term(attn, original, img, ip_states)
    assert len(got) == 3  # (image, text, image-prompt term), as the original returns
    tol = {"atol": 1e-10 if path == "dense" else 1e-5, "rtol": 0}  # the split path merges in float32
    torch.testing.assert_close(got[0], want_img, **tol)
    torch.testing.assert_close(got[1], want_text, **tol)
    torch.testing.assert_close(got[2], want_ip, atol=1e-10, rtol=0)
    assert want_ip.abs().max() > 1e-2  # the term is not negligible


def test_remove_restores_the_ip_adapter_processors_bit_for_bit(pipe, image_embeds):
    never = run(flux_with_ip_adapter(), image_embeds)  # same weights, never patched
    before = snapshot(pipe)
    processors = dict(pipe.transformer.attn_processors)
    handle = negguide.apply(pipe, "vsf", negative_prompt="snow")
    assert all(p is not processors[k] for k, p in pipe.transformer.attn_processors.items())
    run(pipe, image_embeds)
    handle.remove()
    assert_restored(pipe, before)
    assert all(p is processors[k] for k, p in pipe.transformer.attn_processors.items())
    assert np.array_equal(run(pipe, image_embeds), never)


def test_cfg_equals_the_pipelines_true_cfg_with_the_same_image_prompt(pipe, image_embeds):
    """CFG's negative branch keeps the image prompt: the pipeline's true CFG with the positive image embeddings
    as the negative ones (num_images_per_prompt=2: the image embeddings are repeated for the negative rows)."""
    want = run(pipe, image_embeds, negative_embeds=image_embeds, negative_prompt="snow, blurry", true_cfg_scale=3.0,
               num_images_per_prompt=2)  # fmt: skip
    base = run(pipe, image_embeds, num_images_per_prompt=2)
    with negguide.apply(pipe, "cfg", negative_prompt="snow, blurry", scale=3.0):
        got = run(pipe, image_embeds, num_images_per_prompt=2)
    assert differs(want, base)
    close(got, want)


def test_vsf_guides_only_the_conditional_call_of_the_pipelines_true_cfg(pipe, image_embeds):
    """With the pipeline's own true CFG on, the unconditional call (its own image prompt) runs unguided:
    bias=inf equals the unpatched true CFG."""
    cfg = {"negative_prompt": "ugly", "true_cfg_scale": 2.0}
    base = run(pipe, image_embeds, **cfg)
    with negguide.apply(pipe, "vsf", negative_prompt="snow", bias=float("inf")):
        close(run(pipe, image_embeds, **cfg), base)


def test_an_unknown_ip_adapter_processor_is_refused_and_nothing_changes(image_embeds):
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    class MyIPAdapterProcessor(FluxIPAdapterAttnProcessor):
        pass

    pipe = flux_with_ip_adapter()
    old = pipe.transformer.transformer_blocks[0].attn.processor
    custom = MyIPAdapterProcessor(old.hidden_size, old.cross_attention_dim, num_tokens=(IP_TOKENS,))
    custom.load_state_dict(old.state_dict())
    pipe.transformer.transformer_blocks[0].attn.set_processor(custom)
    before = snapshot(pipe)
    with pytest.raises(NoAdapterError, match=r"MyIPAdapterProcessor.*unload_ip_adapter"):
        negguide.apply(pipe, "vsf", negative_prompt="snow")
    assert_restored(pipe, before)


def test_chroma_cfg_equals_the_pipelines_cfg_with_the_same_image_prompt(image_embeds):
    """Chroma (Flux's IP-Adapter loader and processor): negguide's CFG keeps the positive rows' image embeddings in
    its negative branch, as Chroma's own CFG does when given them as the negative image prompt."""
    chroma = flux_with_ip_adapter(build=tiny.chroma)
    call = {**tiny.CALL_KWARGS["chroma"], "num_images_per_prompt": 2}
    cfg = {"negative_prompt": "snow, blurry", "guidance_scale": 3.0}
    want = run(chroma, image_embeds, negative_embeds=image_embeds, **{**call, **cfg})
    base = run(chroma, image_embeds, **call)
    with negguide.apply(chroma, "cfg", negative_prompt="snow, blurry", scale=3.0):
        got = run(chroma, image_embeds, **call)
    assert differs(want, base)
    close(got, want)
    # the image prompt matters in the negative branch: Chroma's CFG with a zero negative image prompt differs
    assert differs(run(chroma, image_embeds, **{**call, **cfg}), want)


# ---------------------------------------------------------------------------- UNet (SD / SDXL) IP-Adapter


def unet_with_ip_adapter():
    """A tiny SD pipeline with one IP-Adapter (random weights) loaded by diffusers' own loader."""
    pipe = tiny.unet()
    unet = pipe.unet
    gen = torch.Generator().manual_seed(5)
    cross = unet.config.cross_attention_dim
    state = {
        "image_proj": {
            "proj.weight": torch.randn(IP_TOKENS * cross, CLIP_DIM, generator=gen),
            "proj.bias": torch.randn(IP_TOKENS * cross, generator=gen),
            "norm.weight": torch.ones(cross),
            "norm.bias": torch.zeros(cross),
        },  # fmt: skip
        "ip_adapter": {},
    }
    key_id = 1
    modules = dict(unet.named_modules())
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            hidden = modules[name.rsplit(".", 1)[0]].to_q.out_features
            for part in ("to_k_ip", "to_v_ip"):
                state["ip_adapter"][f"{key_id}.{part}.weight"] = torch.randn(hidden, cross, generator=gen)
            key_id += 2
    unet._load_ip_adapter_weights(state, low_cpu_mem_usage=False)
    return pipe


@pytest.fixture(scope="module")
def sd():
    return unet_with_ip_adapter()


def run_sd(pipe, embeds, **kwargs):
    """One SD call with the image prompt ``embeds`` (``[negative, positive]`` rows when the pipeline's CFG is on)."""
    call = {"num_inference_steps": 2, **tiny.CALL_KWARGS["unet"], "guidance_scale": 1.0, **kwargs}
    with torch.no_grad():
        return pipe(prompt="a red cube on a table", generator=torch.Generator().manual_seed(0),
                    ip_adapter_image_embeds=[embeds], **call).images  # fmt: skip


def test_the_unet_ip_adapter_is_loaded_and_its_term_matters(sd, image_embeds):
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    assert any(isinstance(p, IPAdapterAttnProcessor2_0) for p in sd.unet.attn_processors.values())
    assert differs(run_sd(sd, image_embeds), run_sd(sd, image_embeds + 1.0))


@pytest.mark.parametrize("path", ["dense", "split"])
def test_unet_vsf_with_infinite_bias_equals_the_unguided_ip_adapter_output(sd, image_embeds, path):
    base = run_sd(sd, image_embeds, num_images_per_prompt=2)
    with negguide.apply(sd, "vsf", negative_prompt="snow, blurry", bias=float("inf"), attention=path):
        close(run_sd(sd, image_embeds, num_images_per_prompt=2), base)


@pytest.mark.parametrize("method", ["vsf", "nag", "nasa"])
def test_unet_guided_output_differs(sd, image_embeds, method):
    base = run_sd(sd, image_embeds)
    params = {"vsf": {"scale": 4.0, "bias": 0.0}, "nag": {"scale": 5.0, "alpha": 1.0}, "nasa": {"scale": 2.0}}
    with negguide.apply(sd, method, negative_prompt="snow, blurry", **params[method]):
        assert differs(run_sd(sd, image_embeds), base)


def test_unet_vsf_guides_only_the_conditional_rows_of_the_pipelines_cfg(sd, image_embeds):
    both = torch.cat([torch.zeros_like(image_embeds), image_embeds])  # [negative image, positive image]
    base = run_sd(sd, both, guidance_scale=3.0, negative_prompt="ugly")
    with negguide.apply(sd, "vsf", negative_prompt="snow", bias=float("inf")):
        close(run_sd(sd, both, guidance_scale=3.0, negative_prompt="ugly"), base)


def test_unet_cfg_equals_the_pipelines_cfg_with_the_same_image_prompt(sd, image_embeds):
    want = run_sd(sd, torch.cat([image_embeds, image_embeds]), guidance_scale=3.0, negative_prompt="snow",
                  num_images_per_prompt=2)  # fmt: skip
    base = run_sd(sd, image_embeds, num_images_per_prompt=2)
    with negguide.apply(sd, "cfg", negative_prompt="snow", scale=3.0):
        got = run_sd(sd, image_embeds, num_images_per_prompt=2)
    assert differs(want, base)
    close(got, want)


@pytest.mark.parametrize("path", ["dense", "split"])
def test_one_guided_unet_call_matches_a_float64_reference_with_the_ip_term(sd, path):
    from tests.adapters.test_unet import _attention64
    from tests.adapters.test_unet import cross_attentions
    from tests.adapters.test_unet import reference_vsf as unet_reference_vsf

    attn = copy.deepcopy(cross_attentions(sd.unet)[0]).double()
    original = attn.processor
    original.scale = [0.6]
    gen = torch.Generator().manual_seed(1)
    batch, p, n, alpha, beta = 2, 6, 4, 3.0, 0.5  # beta exact in float32 (the dense path's bias mask)
    hidden = torch.randn(batch, 9, attn.query_dim, generator=gen, dtype=torch.float64)
    context = torch.randn(batch, p + n, attn.cross_attention_dim, generator=gen, dtype=torch.float64)
    ip_states = [torch.randn(batch, IP_TOKENS, attn.cross_attention_dim, generator=gen, dtype=torch.float64)]
    method_cls = get_method("vsf")
    method = method_cls(method_cls.make_config({"scale": alpha, "bias": beta, "attention": path}))
    from negguide.adapters.unet import UNetAdapter

    installation = Installation(sd, UNetAdapter(sd), method, [NegativeSpec("x")])
    installation.forward = Forward(slice(0, batch), TextLayout(p, p + n), ((p, p + n),), (None,), (1.0,), None, None)
    proc = guided_processor(installation, original, 0, 4)
    with torch.no_grad():
        got = proc(attn, hidden, (context, ip_states))

        without_ip = unet_reference_vsf(attn, hidden, context, p, alpha, beta)  # to_out[0](Z), Z the guided text

        def split(x):
            return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

        q = split(attn.to_q(hidden))
        ip_k, ip_v = split(original.to_k_ip[0](ip_states[0])), split(original.to_v_ip[0](ip_states[0]))
        ip_z, _ = _attention64(q, ip_k, ip_v)
        # to_out[0](Z + 0.6 ip) = to_out[0](Z) + 0.6 ip W^T (the IP-Adapter's term, scaled, before the projection)
        want = without_ip + 0.6 * ip_z.transpose(1, 2).flatten(2, 3) @ attn.to_out[0].weight.T
    torch.testing.assert_close(got, want, atol=1e-8 if path == "dense" else 1e-5, rtol=0)  # split: float32 merge
    assert (want - without_ip).abs().max() > 1e-2  # the term is not negligible


def test_unet_ip_adapter_masks_are_refused_and_the_pipeline_is_restored(sd, image_embeds):
    processors = dict(sd.unet.attn_processors)
    masks = [torch.ones(1, 1, 16, 16)]
    with pytest.raises(NegGuideError, match=r"ip_adapter_masks.*negguide.remove"):
        with negguide.apply(sd, "vsf", negative_prompt="snow"):
            run_sd(sd, image_embeds, cross_attention_kwargs={"ip_adapter_masks": masks})
    assert all(sd.unet.attn_processors[k] is v for k, v in processors.items())
    assert not sd.unet._forward_pre_hooks_with_kwargs and "encode_prompt" not in sd.__dict__


def test_remove_restores_the_unet_ip_adapter_processors_bit_for_bit(sd, image_embeds):
    never = run_sd(unet_with_ip_adapter(), image_embeds)
    processors = dict(sd.unet.attn_processors)
    with negguide.apply(sd, "vsf", negative_prompt="snow"):
        run_sd(sd, image_embeds)
    assert all(sd.unet.attn_processors[k] is v for k, v in processors.items())
    assert np.array_equal(run_sd(sd, image_embeds), never)


@pytest.mark.parametrize("method", ["vsf", "cfg"])
def test_an_ip_adapter_not_installed_by_diffusers_loader_is_refused(method):
    """A UNet whose config says IP-Adapter but whose ``attn2`` processors are not all IPAdapterAttnProcessor2_0."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe = unet_with_ip_adapter()
    name = next(k for k in pipe.unet.attn_processors if k.endswith("attn2.processor"))
    pipe.unet.set_attn_processor({**pipe.unet.attn_processors, name: AttnProcessor2_0()})
    processors = dict(pipe.unet.attn_processors)
    with pytest.raises(NoAdapterError, match=r"IP-Adapter is loaded.*not diffusers' own.*load_ip_adapter"):
        negguide.apply(pipe, method, negative_prompt="snow")
    assert all(pipe.unet.attn_processors[k] is v for k, v in processors.items())
