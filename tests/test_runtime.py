"""apply / remove / GuidanceHandle on the tiny SD3 pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import negguide
from negguide.errors import ConfigError
from negguide.errors import NegativePromptError
from negguide.errors import NoAdapterError
from negguide.errors import UnknownMethodError
from negguide.runtime import applied

KW = {"height": 32, "width": 32, "max_sequence_length": 32, "output_type": "np", "num_inference_steps": 2}


def run(pipe):
    return pipe("a red cat", generator=torch.Generator().manual_seed(0), guidance_scale=0.0, **KW).images


def test_apply_again_replaces(sd3_pipe):
    procs = dict(sd3_pipe.transformer.attn_processors)
    first = negguide.apply(sd3_pipe, "vsf", negative_prompt="dog")
    second = negguide.apply(sd3_pipe, "nag", negative_prompt="dog")
    try:
        assert not first.active and second.active and applied(sd3_pipe) is second
        assert len(sd3_pipe.transformer._forward_pre_hooks) == 1
        assert "nag" in repr(second)
    finally:
        negguide.remove(sd3_pipe)
    assert applied(sd3_pipe) is None and not second.active
    assert all(sd3_pipe.transformer.attn_processors[k] is v for k, v in procs.items())
    negguide.remove(sd3_pipe)  # nothing applied: a no-op


def test_errors_leave_the_pipeline_untouched(sd3_pipe):
    base = run(sd3_pipe)
    procs = dict(sd3_pipe.transformer.attn_processors)
    keys = set(sd3_pipe.__dict__)
    cases = [
        (UnknownMethodError, lambda: negguide.apply(sd3_pipe, "nga", negative_prompt="x")),
        (ConfigError, lambda: negguide.apply(sd3_pipe, "vsf", negative_prompt="x", scale=-1)),
        (ConfigError, lambda: negguide.apply(sd3_pipe, "vsf", negative_prompt="x", start=0.6, stop=0.2)),
        (ConfigError, lambda: negguide.apply(sd3_pipe, "vsf", negative_prompt="x", bogus=1)),
        (NegativePromptError, lambda: negguide.apply(sd3_pipe, "vsf")),
        (
            NegativePromptError,
            lambda: negguide.apply(sd3_pipe, "vsf", negative_prompt="x", negative_prompt_embeds=torch.zeros(1, 1, 32)),
        ),
        (NegativePromptError, lambda: negguide.apply(sd3_pipe, "vsf", negative_prompt=["x", 3])),
        (
            ConfigError,
            lambda: negguide.apply(
                sd3_pipe, negguide.load_config({"method": "vsf", "adapter": "wan"}), negative_prompt="x"
            ),
        ),
        (NoAdapterError, lambda: negguide.apply(object(), "vsf", negative_prompt="x")),
    ]
    for error, call in cases:
        with pytest.raises(error):
            call()
        assert all(sd3_pipe.transformer.attn_processors[k] is v for k, v in procs.items())
        assert set(sd3_pipe.__dict__) == keys
    assert np.array_equal(run(sd3_pipe), base)


def test_config_error_message_is_expected_got(sd3_pipe):
    with pytest.raises(ConfigError) as info:
        negguide.apply(sd3_pipe, "nag", negative_prompt="x", tau=0.5)
    assert str(info.value) == "nag: expected `tau` >= 1.0, got 0.5."


def test_spec_applies_method_params_and_negative(sd3_pipe):
    spec = negguide.load_config({"method": "vsf", "negative_prompt": "dog", "params": {"scale": 2.0}})
    with negguide.apply(sd3_pipe, spec, bias=0.3) as handle:
        assert handle.method.config.scale == 2.0 and handle.method.config.bias == 0.3
        assert handle.negatives[0].text == "dog"
        out = run(sd3_pipe)
    assert np.isfinite(out).all()


def test_family_defaults_are_used(sd3_pipe):
    with negguide.apply(sd3_pipe, "nag", negative_prompt="dog") as handle:
        assert handle.method.config.alpha == 0.125  # SD3.5's NAG default


@pytest.mark.parametrize("thing", [5, None, "pipe", 3.0])
def test_remove_and_applied_on_a_non_pipeline_say_what_to_pass(thing):
    with pytest.raises(ConfigError, match=r"negguide.remove: expected a diffusers pipeline, got"):
        negguide.remove(thing)
    with pytest.raises(ConfigError, match=r"negguide.applied: expected a diffusers pipeline, got"):
        applied(thing)


def test_apply_on_an_object_without_weak_references_is_a_clear_error(sd3_pipe):
    class Slotted:
        __slots__ = ("transformer", "encode_prompt", "scheduler")

    pipe = Slotted()
    pipe.transformer, pipe.encode_prompt, pipe.scheduler = sd3_pipe.transformer, sd3_pipe.encode_prompt, None
    procs = dict(sd3_pipe.transformer.attn_processors)
    with pytest.raises(ConfigError, match=r"negguide.apply: expected a diffusers pipeline, got Slotted"):
        negguide.apply(pipe, "vsf", negative_prompt="x")
    assert all(sd3_pipe.transformer.attn_processors[k] is v for k, v in procs.items())


def test_a_nested_apply_inside_a_with_block_is_refused_and_the_outer_stays(sd3_pipe):
    base = run(sd3_pipe)
    with negguide.apply(sd3_pipe, "vsf", negative_prompt="dog") as outer:
        guided = run(sd3_pipe)
        with pytest.raises(ConfigError, match=r"expected no other guidance inside the `with` block of <GuidanceHandle"):
            negguide.apply(sd3_pipe, "nag", negative_prompt="cat")
        assert outer.active and applied(sd3_pipe) is outer
        assert np.array_equal(run(sd3_pipe), guided)  # the outer block still guides
    assert applied(sd3_pipe) is None and np.array_equal(run(sd3_pipe), base)
    with pytest.raises(ConfigError, match="handle was removed"):
        with outer:
            pass


def test_applied_is_none_after_an_error_removed_the_guidance(sd3_pipe):
    handle = negguide.apply(sd3_pipe, "vsf", negative_prompt=["a", "b", "c"])
    with pytest.raises(NegativePromptError):
        run(sd3_pipe)
    assert not handle.active and applied(sd3_pipe) is None
