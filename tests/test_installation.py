"""The installation under hostile and careless input: no crash, no silent no-op, never a pipeline left patched.

Crash-prone cases run in a subprocess, so a dying interpreter fails one test instead of the suite.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import negguide
from negguide import testing
from negguide import tiny
from negguide.errors import ConfigError
from negguide.errors import NegativePromptError
from negguide.errors import NegGuideWarning
from negguide.runtime import applied

FAMILIES = {
    "sd3": testing.Case(build=tiny.sd3, call={**tiny.CALL_KWARGS["sd3"], "guidance_scale": 0.0}),
    "flux": testing.Case(build=tiny.flux, call=tiny.CALL_KWARGS["flux"]),
    "wan": testing.Case(build=tiny.wan, call={**tiny.CALL_KWARGS["wan"], "guidance_scale": 1.0}, output="frames"),
}
WIDTH = {"sd3": 32, "flux": 32, "wan": 32}

ZERO_TOKENS = r"""
import json, sys, warnings
import numpy as np
import torch
import negguide
from negguide import tiny, testing

family = sys.argv[1]
torch.set_num_threads(1)
call = {"sd3": {"guidance_scale": 0.0}, "flux": {}, "wan": {"guidance_scale": 1.0}}[family]
case = testing.Case(build=tiny.BUILDERS[family], call={**tiny.CALL_KWARGS[family], **call},
                    output="frames" if family == "wan" else "images")
base = case.run()
results = {}
for method in ("vsf", "nag", "nasa"):
    for path in ("dense", "split"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with case.apply(method=method, negative_prompt_embeds=torch.zeros(1, 0, 32), attention=path):
                out = case.run()
        results[f"{method}-{path}"] = {
            "equal": bool(np.array_equal(out, base)),
            "warned": any("has no token" in str(w.message) for w in caught),
        }
print(json.dumps(results))
"""


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_zero_token_negative_embeddings_are_no_negative_on_every_path(family):
    """`negative_prompt_embeds=torch.zeros(1, 0, C)` killed the process (SD3, Flux) or raised IndexError (Wan):
    an empty negative is no negative, on every family, method and path, with a warning."""
    proc = subprocess.run([sys.executable, "-c", ZERO_TOKENS, family], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the interpreter died or failed (exit {proc.returncode}): {proc.stderr[-2000:]}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results and all(r == {"equal": True, "warned": True} for r in results.values()), results


def test_an_error_inside_a_guided_attention_call_restores_the_pipeline():
    """Flux refuses an attention mask inside its guided attention: the error leaves the pipeline as before."""
    case = FAMILIES["flux"]
    pipe = case.pipe
    base = case.run()
    before = testing._snapshot(case, pipe)
    handle = negguide.apply(pipe, "vsf", negative_prompt="snow")
    mask = torch.ones(1, 32 + 2 + 16, dtype=torch.bool)
    with pytest.raises(ConfigError, match="expected no attention mask in a guided Flux attention"):
        case.run(joint_attention_kwargs={"attention_mask": mask})
    assert not handle.active and applied(pipe) is None
    testing._assert_restored(case, pipe, before, "after an error inside a processor")
    assert np.array_equal(case.run(), base)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (torch.full((1, 3, 32), math.nan), "finite values"),
        (torch.full((1, 3, 32), math.inf), "finite values"),
        (torch.full((1, 3, 32), -math.inf), "finite values"),
        (torch.full((1, 3, 32), 1e30), r"\|x\| <= 1e\+06"),
        (torch.zeros(1, 3, 32, dtype=torch.int64), "floating point"),
        (torch.zeros(1, 3, 32, dtype=torch.bool), "floating point"),
        (torch.zeros(1, 3, 32, dtype=torch.complex64), "floating point"),
        (torch.zeros(1, 3, 32, device="meta"), "meta device"),
        ([[0.0] * 32], "to be a tensor|to be a string, embeddings"),
    ],
    ids=["nan", "inf", "-inf", "huge", "int", "bool", "complex", "meta", "list"],
)
def test_unusable_embeddings_are_refused_at_apply(family, bad, message):
    case = FAMILIES[family]
    before = testing._snapshot(case, case.pipe)
    for method in ("vsf", "nag"):
        with pytest.raises(NegativePromptError, match=message):
            negguide.apply(case.pipe, method, negative_prompt_embeds=bad)
        with pytest.raises(NegativePromptError, match=message):
            negguide.apply(case.pipe, method, negatives=[(bad, 1.0)] if isinstance(bad, torch.Tensor) else ["x", bad])
    testing._assert_restored(case, case.pipe, before, "after a refused apply")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_embeddings_of_the_wrong_width_are_a_clear_error_that_unpatches(family):
    case = FAMILIES[family]
    case.run()  # a first call adds the pipeline's own per-call attributes
    before = testing._snapshot(case, case.pipe)
    handle = negguide.apply(case.pipe, "vsf", negative_prompt_embeds=torch.randn(1, 3, 7))
    with pytest.raises(NegativePromptError, match=r"expected .*\(rows, tokens, 32\).* got .*7\)"):
        case.run()
    assert not handle.active
    testing._assert_restored(case, case.pipe, before, "after a wrong width")


def test_sd3_cfg_with_a_wrong_pooled_vector_is_a_clear_error():
    case = FAMILIES["sd3"]
    embeds = torch.randn(1, 77 + 32, 32)
    for pooled, message in (
        (torch.randn(1, 5), r"`pooled` of shape \(rows, 64\) like the prompt's `pooled_projections`, got \(1, 5\)"),
        ("pooled", r"expected negative_prompt_embeds\['pooled_prompt_embeds'\] to be a tensor, got str"),
    ):
        with pytest.raises(NegativePromptError, match=message):
            with negguide.apply(
                case.pipe, "cfg", negative_prompt_embeds={"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
            ):
                case.run()
        assert applied(case.pipe) is None


def test_a_window_that_covers_no_step_warns_once_per_call():
    case = FAMILIES["sd3"]
    with pytest.warns(NegGuideWarning, match=r"guides no step of this 2-step call: .*int\(stop \* 2\) = 0") as record:
        with negguide.apply(case.pipe, "vsf", negative_prompt="snow", stop=0.25):
            case.run()
    assert len([w for w in record if issubclass(w.category, NegGuideWarning)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", NegGuideWarning)
        with negguide.apply(case.pipe, "vsf", negative_prompt="snow", stop=0.5):
            case.run()  # step 0 of 2 is guided: no warning


@pytest.mark.parametrize("negative", ["", "   ", ["", " "]])
def test_a_negative_empty_for_every_prompt_warns_and_runs_unguided(negative):
    case = FAMILIES["sd3"]
    prompts = list(case.prompts) if isinstance(negative, list) else case.prompts[0]
    seeds = [0, 1] if isinstance(negative, list) else 0
    base = case.run(prompt=prompts, seed=seeds)
    with pytest.warns(NegGuideWarning, match="has no token for any prompt of this call: the call runs unguided"):
        with negguide.apply(case.pipe, "vsf", negative_prompt=negative):
            out = case.run(prompt=prompts, seed=seeds)
    assert np.array_equal(out, base)
    with pytest.warns(NegGuideWarning, match="has no token for any prompt of this call: it is left out"):
        with negguide.apply(case.pipe, "vsf", negatives={"": 1.0, "snow": 1.0}):
            both = case.run()
    with negguide.apply(case.pipe, "vsf", negative_prompt="snow"):
        np.testing.assert_array_equal(both, case.run())


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"scale": "3"}, "valid number"),
        ({"scale": True}, "valid number"),
        ({"bias": "inf"}, "valid number"),
        ({"enabled": "yes"}, "valid boolean"),
        ({"enabled": 1}, "valid boolean"),
        ({"layers": ["0"]}, "valid integer"),
        ({"layers": [1.0]}, "valid integer"),
        ({"layers": [True]}, "valid integer"),
        ({"layers": []}, "at least one block index"),
        ({"layers": [99]}, r"expected `layers` in -2 \.\. 1"),
        ({"layers": [-99]}, r"expected `layers` in -2 \.\. 1"),
    ],
)
def test_nonsense_parameters_are_refused_not_coerced(params, message):
    case = FAMILIES["sd3"]
    before = testing._snapshot(case, case.pipe)
    with pytest.raises(ConfigError, match=message):
        negguide.apply(case.pipe, "vsf", negative_prompt="snow", **params)
    testing._assert_restored(case, case.pipe, before, "after refused parameters")


def test_layers_out_of_range_in_a_yaml_config_are_refused_at_apply(tmp_path):
    path = tmp_path / "vsf.yaml"
    path.write_text("method: vsf\nnegative_prompt: snow\nparams: {layers: [99]}\n")
    spec = negguide.load_config(path)  # the model is not known yet
    with pytest.raises(ConfigError, match=r"this sd3 model has 2 blocks"):
        negguide.apply(FAMILIES["sd3"].pipe, spec)


def test_the_rows_message_names_the_method_each_choice_once_and_the_next_step():
    case = FAMILIES["sd3"]
    with negguide.apply(case.pipe, "vsf", negative_prompt_embeds=torch.randn(3, 4, 32)):
        with pytest.raises(NegativePromptError) as info:
            case.run()
    assert str(info.value) == (
        "vsf: expected negative embeddings with 1 (shared) rows for this call of 1 prompt(s) x 1 image(s), got 3 "
        "rows in embeddings (3, 4, 32). Pass one row per prompt of the pipeline call, or one shared row."
    )


def test_dotted_input_names_reach_into_dict_inputs_without_touching_the_callers():
    from negguide.installation import _lookup
    from negguide.installation import _store

    kwargs = {"sample": 1, "added_cond_kwargs": {"text_embeds": 2, "time_ids": 3}}
    assert _lookup(kwargs, "added_cond_kwargs.time_ids") == 3 and _lookup(kwargs, "added_cond_kwargs.x") is None
    assert _lookup(kwargs, "sample.x") is None
    out = dict(kwargs)
    _store(out, "added_cond_kwargs.time_ids", 4)
    _store(out, "sample", 5)
    assert out == {"sample": 5, "added_cond_kwargs": {"text_embeds": 2, "time_ids": 4}}
    assert kwargs == {"sample": 1, "added_cond_kwargs": {"text_embeds": 2, "time_ids": 3}}


def test_the_step_of_a_forward_whose_scheduler_never_steps_is_read_from_its_largest_timestep():
    """A pipeline that steps copies of ``pipe.scheduler`` (SkyReels-V2's diffusion forcing) leaves its ``step_index``
    None: the step is the index of the forward's largest (noisiest) per-frame timestep; unknown values count as 0."""
    from types import SimpleNamespace

    from negguide.installation import Installation

    timesteps = torch.tensor([999.0, 750.0, 500.0, 250.0])
    inst = object.__new__(Installation)
    inst.pipe = SimpleNamespace(scheduler=SimpleNamespace(timesteps=timesteps, step_index=None, order=1))
    assert inst.current_step(torch.tensor([[500.0, 750.0, 0.0]])) == (1, 4)
    assert inst.current_step(torch.tensor([250.0, 250.0])) == (3, 4)
    assert inst.current_step(torch.tensor([123.0])) == (0, 4) and inst.current_step(None) == (0, 4)
    inst.pipe.scheduler.step_index = 2  # a scheduler that steps says so itself
    assert inst.current_step(torch.tensor([999.0])) == (2, 4)


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "PNDMScheduler"])
def test_the_step_window_holds_with_schedulers_that_keep_no_step_index(scheduler):
    """DDIM and PNDM (SD 1.5's default) have no `step_index`: the step is found from the forward's timestep, so
    start=0.5 guides the second half of the steps instead of none."""
    import diffusers

    pipe = tiny.unet()
    # SD 1.5's PNDM skips the Runge-Kutta warm-up steps (skip_prk_steps), as its published config says
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config, skip_prk_steps=True)
    guided: list[bool] = []
    with negguide.apply(pipe, "vsf", negative_prompt="snow", start=0.5) as handle:
        # a pre-hook registered after negguide's runs after it: it sees the forward's guidance
        hook = pipe.unet.register_forward_pre_hook(lambda m, a: guided.append(handle.installation.forward is not None))
        try:
            pipe("a cat", num_inference_steps=4, guidance_scale=0.0, **tiny.CALL_KWARGS["unet"])
        finally:
            hook.remove()
    half = len(guided) // 2  # PNDM runs one forward more than the steps (its first timestep twice)
    assert guided == [False] * (len(guided) - half) + [True] * half and half == 2, guided
