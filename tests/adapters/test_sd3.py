"""SD3 adapter end to end on the tiny offline pipeline."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

import negguide
from negguide import testing
from negguide import tiny
from negguide.errors import ConfigError
from negguide.errors import NegativePromptError
from negguide.errors import NoAdapterError

KW = {"height": 32, "width": 32, "max_sequence_length": 32, "output_type": "np", "num_inference_steps": 2}
NEG = "blurry dog, low quality"


def run(pipe, prompt="a red cat", seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    kw = {**KW, "guidance_scale": 0.0, **kw}
    return pipe(prompt, generator=g, **kw).images


@pytest.fixture(scope="module")
def base(sd3_pipe):
    return run(sd3_pipe)


def snapshot(pipe):
    t = pipe.transformer
    return (
        dict(t.attn_processors),
        set(t.__dict__),
        set(pipe.__dict__),
        dict(t._forward_pre_hooks),
        dict(t._forward_hooks),
    )


def assert_restored(pipe, snap):
    procs, tkeys, pkeys, pre, post = snap
    now = snapshot(pipe)
    assert all(now[0][k] is v for k, v in procs.items()) and now[0].keys() == procs.keys()
    assert now[1:] == (tkeys, pkeys, pre, post)


@pytest.mark.parametrize("path", ["dense", "split"])
def test_beta_inf_equals_unguided(sd3_pipe, base, path):
    """VSF with the flipped copy fully masked is the unguided pipeline: negative tokens are isolated."""
    with negguide.apply(sd3_pipe, "vsf", negative_prompt=NEG, bias=math.inf, attention=path):
        out = run(sd3_pipe)
    np.testing.assert_allclose(out, base, atol=1e-5)


def test_guidance_changes_output_and_paths_agree(sd3_pipe, base):
    outs = {}
    for path in ("dense", "split"):
        with negguide.apply(sd3_pipe, "vsf", negative_prompt=NEG, scale=3.0, bias=0.1, attention=path):
            outs[path] = run(sd3_pipe)
    assert np.abs(outs["dense"] - base).max() > 1e-4
    np.testing.assert_allclose(outs["dense"], outs["split"], atol=1e-5)


@pytest.mark.parametrize("method", ["vsf", "nag", "nasa"])
def test_empty_negative_is_bit_identical(sd3_pipe, base, method):
    """An empty negative prompt leaves the pipeline unguided, bit for bit."""
    with negguide.apply(sd3_pipe, method, negative_prompt="  "):
        out = run(sd3_pipe)
    assert np.array_equal(out, base)


def test_remove_restores_bit_identically(sd3_pipe, base):
    snap = snapshot(sd3_pipe)
    handle = negguide.apply(sd3_pipe, "vsf", negative_prompt=NEG)
    run(sd3_pipe)
    handle.remove()
    assert_restored(sd3_pipe, snap)
    assert np.array_equal(run(sd3_pipe), base)
    handle.remove()  # idempotent


def test_restored_after_exception_in_with_block(sd3_pipe, base):
    snap = snapshot(sd3_pipe)
    with pytest.raises(ZeroDivisionError):
        with negguide.apply(sd3_pipe, "nag", negative_prompt=NEG):
            run(sd3_pipe)
            1 / 0  # noqa: B018
    assert_restored(sd3_pipe, snap)
    assert np.array_equal(run(sd3_pipe), base)


def test_negative_is_encoded_without_padding_and_pooled_stays_positive(sd3_pipe):
    seen = {}

    def spy(module, args, kwargs):
        seen.setdefault("ehs", kwargs["encoder_hidden_states"].shape)
        seen.setdefault("pooled", kwargs["pooled_projections"].clone())

    h = sd3_pipe.transformer.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        run(sd3_pipe)
        plain = dict(seen)
        seen.clear()
        with negguide.apply(sd3_pipe, "vsf", negative_prompt=NEG) as handle:
            run(sd3_pipe)
            neg = handle.installation.encoded[0]
    finally:
        h.remove()
    n_clip = len(sd3_pipe.tokenizer(NEG).input_ids)
    n_t5 = len(sd3_pipe.tokenizer_3(NEG).input_ids)
    assert neg.num_tokens == n_clip + n_t5
    assert neg.mask is None
    # the pre-hook above ran before negguide's: it saw the positive text only, and the pooled vector is the positive one
    assert seen["ehs"] == plain["ehs"]
    assert torch.equal(seen["pooled"], plain["pooled"])


def test_text_stream_gets_the_negative_tokens(sd3_pipe):
    lengths = []
    with negguide.apply(sd3_pipe, "vsf", negative_prompt=NEG) as handle:
        proc = sd3_pipe.transformer.transformer_blocks[0].attn.processor
        original = proc.__class__.__call__

        def spy(self, attn, hidden_states, encoder_hidden_states=None, *a, **k):
            lengths.append(encoder_hidden_states.shape[1])
            return original(self, attn, hidden_states, encoder_hidden_states, *a, **k)

        proc.__class__.__call__ = spy
        try:
            run(sd3_pipe)
        finally:
            proc.__class__.__call__ = original
        n = handle.installation.encoded[0].num_tokens
    assert lengths and all(length == 77 + 32 + n for length in lengths)


def test_batch_with_per_prompt_negatives_equals_each_alone(sd3_pipe):
    """Negatives of different lengths in one batch (padding masked) equal each prompt run alone."""
    prompts, negs = ["a red cat", "a green tree"], ["dog", "a very long and blurry negative prompt"]
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    with negguide.apply(sd3_pipe, "vsf", negative_prompt=negs):
        both = run(sd3_pipe, prompts, latents=latents)
    for i in range(2):
        with negguide.apply(sd3_pipe, "vsf", negative_prompt=negs[i]):
            alone = run(sd3_pipe, prompts[i], latents=latents[i : i + 1])
        np.testing.assert_allclose(both[i : i + 1], alone, atol=2e-5)


def test_images_per_prompt(sd3_pipe):
    """Two prompts x two images: rows 2-3 are the second prompt with its own negative."""
    latents = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(4))
    with negguide.apply(sd3_pipe, "vsf", negative_prompt=["dog", "a cat"]):
        out = run(sd3_pipe, ["a red cat", "a tree"], num_images_per_prompt=2, latents=latents)
    with negguide.apply(sd3_pipe, "vsf", negative_prompt="a cat"):
        alone = run(sd3_pipe, "a tree", num_images_per_prompt=2, latents=latents[2:])
    assert out.shape[0] == 4
    np.testing.assert_allclose(out[2:], alone, atol=2e-5)


def test_shared_negative_with_two_prompts_equals_list(sd3_pipe):
    with negguide.apply(sd3_pipe, "vsf", negative_prompt="dog"):
        shared = run(sd3_pipe, ["a red cat", "a tree"])
    with negguide.apply(sd3_pipe, "vsf", negative_prompt=["dog", "dog"]):
        listed = run(sd3_pipe, ["a red cat", "a tree"])
    np.testing.assert_allclose(shared, listed, atol=1e-6)


def test_layers_selection(sd3_pipe, base):
    """Blocks outside `layers` run unguided (negatives isolated); an empty selection is refused, and the two-block
    model's indices are checked."""
    with pytest.raises(ConfigError, match="at least one block index in `layers`"):
        negguide.apply(sd3_pipe, "vsf", negative_prompt=NEG, layers=[])
    for bad in ([2], [-3], [0, 99]):
        with pytest.raises(ConfigError, match=r"expected `layers` in -2 \.\. 1 \(this sd3 model has 2 blocks"):
            negguide.apply(sd3_pipe, "vsf", negative_prompt=NEG, layers=bad)
    with negguide.apply(sd3_pipe, "vsf", negative_prompt=NEG, layers=[0]):
        first = run(sd3_pipe)
    with negguide.apply(sd3_pipe, "vsf", negative_prompt=NEG, layers=[-1]):
        last = run(sd3_pipe)
    with negguide.apply(sd3_pipe, "vsf", negative_prompt=NEG):
        every = run(sd3_pipe)
    assert np.abs(first - base).max() > 1e-5 and np.abs(first - every).max() > 1e-6
    assert np.abs(last - first).max() > 1e-6


def test_steps_outside_window_are_unguided(sd3_pipe):
    outs = {"base": [], "vsf": []}

    def spy(key):
        return lambda m, a, k, o: outs[key].append(o[0].clone())

    h = sd3_pipe.transformer.register_forward_hook(spy("base"), with_kwargs=True)
    run(sd3_pipe, num_inference_steps=4)
    h.remove()
    with negguide.apply(sd3_pipe, "vsf", negative_prompt=NEG, start=0.5):
        h = sd3_pipe.transformer.register_forward_hook(spy("vsf"), with_kwargs=True)
        run(sd3_pipe, num_inference_steps=4)
        h.remove()
    assert torch.equal(outs["base"][0], outs["vsf"][0]) and torch.equal(outs["base"][1], outs["vsf"][1])
    assert not torch.allclose(outs["base"][2], outs["vsf"][2])


def test_with_pipeline_cfg_only_cond_half_is_guided(sd3_pipe):
    """With guidance_scale > 1 the batch is [uncond, cond]: beta = inf still equals plain CFG, and guidance acts."""
    ref = run(sd3_pipe, guidance_scale=4.0, negative_prompt="ugly")
    with negguide.apply(sd3_pipe, "vsf", negative_prompt=NEG, bias=math.inf):
        same = run(sd3_pipe, guidance_scale=4.0, negative_prompt="ugly")
    np.testing.assert_allclose(same, ref, atol=1e-5)
    rows = []
    with negguide.apply(sd3_pipe, "vsf", negative_prompt=NEG) as handle:
        real = handle.installation.run_method

        def spy(seg, processor):
            rows.append(handle.installation.forward.guided)
            return real(seg, processor)

        handle.installation.run_method = spy
        out = run(sd3_pipe, guidance_scale=4.0, negative_prompt="ugly")
    assert rows and all(r == slice(1, 2) for r in rows)
    assert np.isfinite(out).all() and np.abs(out - ref).max() > 1e-5


def test_negative_prompt_embeds(sd3_pipe, base):
    embeds = torch.randn(1, 5, sd3_pipe.transformer.config.joint_attention_dim)
    with negguide.apply(sd3_pipe, "vsf", negative_prompt_embeds=embeds, bias=math.inf):
        np.testing.assert_allclose(run(sd3_pipe), base, atol=1e-5)
    with negguide.apply(sd3_pipe, "vsf", negative_prompt_embeds=embeds):
        a = run(sd3_pipe)
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(1))
    with negguide.apply(sd3_pipe, "vsf", negative_prompt_embeds=embeds[:, perm]):
        b = run(sd3_pipe)
    np.testing.assert_allclose(a, b, atol=1e-5)  # no text RoPE in SD3: order inside N does not matter


def test_long_negative_is_truncated_with_diffusers_warning(sd3_pipe, caplog):
    long = " ".join(["word"] * 60)
    with caplog.at_level(logging.WARNING):
        with negguide.apply(sd3_pipe, "vsf", negative_prompt=long) as handle:
            out = run(sd3_pipe)
            n = handle.installation.encoded[0].num_tokens
    assert "truncated" in caplog.text
    assert n <= 77 + 32 and np.isfinite(out).all()


def test_list_length_mismatch_is_a_clear_error_and_unpatches(sd3_pipe, base):
    snap = snapshot(sd3_pipe)
    handle = negguide.apply(sd3_pipe, "vsf", negative_prompt=["a", "b", "c"])
    with pytest.raises(NegativePromptError, match="one negative prompt per prompt"):
        run(sd3_pipe, ["x", "y"])
    assert not handle.active
    assert_restored(sd3_pipe, snap)
    assert np.array_equal(run(sd3_pipe), base)


def test_no_adapter_error_lists_installed():
    class Fake:
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(NoAdapterError, match="no adapter matches Linear.*'sd3'"):
        negguide.apply(Fake(), "vsf", negative_prompt="x")


def test_sd35_dual_attention_and_img2img_inpaint():
    """SD3.5 dual-attention blocks keep their image-only attn2; img2img and inpaint pipelines work unchanged."""
    from diffusers import StableDiffusion3Img2ImgPipeline
    from diffusers import StableDiffusion3InpaintPipeline
    from PIL import Image

    from negguide import tiny

    pipe = tiny.sd3(dual_attention_layers=(0,), latent_channels=16)
    attn2 = pipe.transformer.transformer_blocks[0].attn2.processor
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8"))
    mask = Image.fromarray((np.arange(32 * 32).reshape(32, 32) % 2 * 255).astype("uint8"))
    for cls, extra in (
        (None, {}),
        (StableDiffusion3Img2ImgPipeline, {"image": image, "strength": 0.8}),
        (StableDiffusion3InpaintPipeline, {"image": image, "mask_image": mask, "strength": 0.8}),
    ):
        p = pipe if cls is None else cls(**pipe.components)
        p.set_progress_bar_config(disable=True)
        kw = {**extra, "num_inference_steps": 3}
        plain = run(p, **kw)
        with negguide.apply(p, "vsf", negative_prompt=NEG, bias=math.inf):
            assert p.transformer.transformer_blocks[0].attn2.processor is attn2
            same = run(p, **kw)
        with negguide.apply(p, "vsf", negative_prompt=NEG):
            guided = run(p, **kw)
        np.testing.assert_allclose(same, plain, atol=1e-5)
        assert np.abs(guided - plain).max() > 1e-5


@pytest.mark.parametrize("method", ["vsf", "nag", "nasa"])
def test_empty_negative_in_a_list_leaves_its_row_unguided(sd3_pipe, method):
    """negative_prompt=["", "dog"]: the first prompt runs unguided, whatever the method."""
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(5))
    plain = run(sd3_pipe, ["a red cat", "a tree"], latents=latents)
    with negguide.apply(sd3_pipe, method, negative_prompt=["", "dog"]):
        out = run(sd3_pipe, ["a red cat", "a tree"], latents=latents)
    np.testing.assert_allclose(out[0], plain[0], atol=1e-5)
    assert np.abs(out[1] - plain[1]).max() > 1e-5


# ---------------------------------------------------------------------------- the conformance kit

CASE = testing.Case(
    build=tiny.sd3,
    call={**tiny.CALL_KWARGS["sd3"], "guidance_scale": 0.0},
    pipeline_cfg={"guidance_scale": 4.0, "negative_prompt": "ugly"},
)


@pytest.mark.parametrize("check", sorted(testing.CHECKS))
def test_conformance(check):
    """The adapter passes every check of negguide.testing on the tiny pipeline."""
    testing.CHECKS[check](CASE)
