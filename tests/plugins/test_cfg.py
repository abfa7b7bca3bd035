"""CFG combine rule and its end-to-end equivalence with the pipeline's own CFG (SD3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import negguide
from negguide.plugins.cfg import CFGConfig
from negguide.plugins.cfg import ClassifierFreeGuidance


def cfg(w):
    return ClassifierFreeGuidance(CFGConfig(scale=w))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), w=st.floats(0, 10))
def test_combine_rule(seed, w):
    """v = v_neg + w (v_pos - v_neg); w = 1 gives v_pos, w = 0 gives v_neg, equal branches unchanged."""
    g = torch.Generator().manual_seed(seed)
    pos, neg = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ref = neg.double() + w * (pos.double() - neg.double())
    torch.testing.assert_close(cfg(w).combine(pos, [neg], [1.0]).double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cfg(1.0).combine(pos, [neg], [1.0]), pos)
    torch.testing.assert_close(cfg(0.0).combine(pos, [neg], [1.0]), neg)
    torch.testing.assert_close(cfg(w).combine(pos, [pos], [1.0]), pos)


KW = {"height": 32, "width": 32, "max_sequence_length": 32, "output_type": "np", "num_inference_steps": 2}


def run(pipe, prompt="a red cat", seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return pipe(prompt, generator=g, **{**KW, **kw}).images


def test_scale_one_equals_unguided(sd3_pipe):
    base = run(sd3_pipe, guidance_scale=0.0)
    with negguide.apply(sd3_pipe, "cfg", negative_prompt="blurry", scale=1.0):
        out = run(sd3_pipe, guidance_scale=0.0)
    np.testing.assert_allclose(out, base, atol=1e-5)


@pytest.mark.parametrize("w", [2.0, 5.0])
def test_equals_pipeline_cfg(sd3_pipe, w):
    """negguide CFG with w and the pipeline's CFG off equals the pipeline's own CFG (guidance_scale=w)."""
    ref = run(sd3_pipe, guidance_scale=w, negative_prompt="blurry, low quality")
    with negguide.apply(sd3_pipe, "cfg", negative_prompt="blurry, low quality", scale=w):
        out = run(sd3_pipe, guidance_scale=0.0)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_batch_and_images_per_prompt(sd3_pipe):
    """Two prompts, two images each, per-prompt negatives: equals the pipeline's own CFG."""
    prompts = ["a red cat", "a blue dog"]
    negs = ["blurry", "dark"]
    ref = run(sd3_pipe, prompts, guidance_scale=3.0, negative_prompt=negs, num_images_per_prompt=2)
    with negguide.apply(sd3_pipe, "cfg", negative_prompt=negs, scale=3.0):
        out = run(sd3_pipe, prompts, guidance_scale=0.0, num_images_per_prompt=2)
    assert out.shape[0] == 4
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_steps_outside_window_are_unguided(sd3_pipe):
    """With start = 0.5 the first half of the steps equals the unguided steps exactly."""
    outputs = {}

    def spy(name):
        def hook(module, args, kwargs, output):
            outputs.setdefault(name, []).append(output[0].clone())

        return hook

    kw = {"num_inference_steps": 4, "guidance_scale": 0.0}
    h = sd3_pipe.transformer.register_forward_hook(spy("base"), with_kwargs=True)
    run(sd3_pipe, **kw)
    h.remove()
    with negguide.apply(sd3_pipe, "cfg", negative_prompt="blurry", scale=4.0, start=0.5):
        h = sd3_pipe.transformer.register_forward_hook(spy("guided"), with_kwargs=True)
        run(sd3_pipe, **kw)
        h.remove()
    base, guided = outputs["base"], outputs["guided"]
    assert torch.equal(base[0], guided[0]) and torch.equal(base[1], guided[1])
    assert not torch.allclose(base[2], guided[2])


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    w=st.floats(0, 10),
    weights=st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]) | st.floats(0, 3), min_size=1, max_size=3),
)
def test_several_weighted_negatives(seed, w, weights):
    """v = v_pos + (w - 1) sum_i w_i (v_pos - v_neg_i) (float64 reference); all weights 0 give v_pos."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(2, 4, 8, 8, generator=g)
    negs = [torch.randn(2, 4, 8, 8, generator=g) for _ in weights]
    ref = pos.double() + (w - 1) * sum(wi * (pos.double() - n.double()) for wi, n in zip(weights, negs))
    torch.testing.assert_close(cfg(w).combine(pos, negs, weights).double(), ref, rtol=1e-5, atol=1e-4)
