"""ControlNets with negguide: Flux's residuals under CFG and attention-level methods; the UNet's ControlNet.

Flux's ControlNet pipeline computes the residuals once, from the positive prompt, and its own true CFG
passes the same residuals to the unconditional call: negguide's CFG (the negative branch batched beside the
positive rows) must repeat them for the negative rows, so it equals that true CFG, also with several images
per prompt. The UNet ControlNet pipeline runs its ControlNet per CFG branch (the residuals depend on the
negative prompt), which a negative branch of the UNet alone cannot reproduce: CFG is refused there (SD3's
ControlNet pipeline runs its ControlNet per branch too; only its attention-level use is tested here).
Attention-level methods keep the batch, so residuals need nothing (VSF with an infinite bias equals the
unguided pipeline). ControlNets are tiny, from a config, with non-zero output layers so the residuals matter.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import negguide
from negguide import tiny
from negguide.errors import NoAdapterError
from negguide.installation import _entries
from negguide.installation import _lookup
from negguide.installation import _store
from tests.adapters.helpers import close
from tests.adapters.helpers import differs


def _wake(controlnet: torch.nn.Module) -> torch.nn.Module:
    """ControlNets start with zero output layers (no effect); random ones make the residuals matter."""
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for param in controlnet.parameters():
            if not param.any():
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))
    return controlnet.eval()


def flux_controlnet():
    from diffusers import FluxControlNetModel
    from diffusers import FluxControlNetPipeline

    base = tiny.flux()
    torch.manual_seed(1)
    t = base.transformer.config
    controlnet = FluxControlNetModel(
        patch_size=1, in_channels=t.in_channels, num_layers=1, num_single_layers=1,
        attention_head_dim=t.attention_head_dim, num_attention_heads=t.num_attention_heads,
        joint_attention_dim=t.joint_attention_dim, pooled_projection_dim=t.pooled_projection_dim,
        axes_dims_rope=list(t.axes_dims_rope),
    )  # fmt: skip
    pipe = FluxControlNetPipeline(**base.components, controlnet=_wake(controlnet))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_controlnet():
    from diffusers import ControlNetModel
    from diffusers import StableDiffusionControlNetPipeline

    from negguide.tiny.families.unet import UNET

    base = tiny.unet()
    torch.manual_seed(1)
    controlnet = ControlNetModel(
        in_channels=4, block_out_channels=UNET["block_out_channels"], layers_per_block=1,
        down_block_types=UNET["down_block_types"], norm_num_groups=4, attention_head_dim=2,
        cross_attention_dim=base.unet.config.cross_attention_dim,
        conditioning_embedding_out_channels=(4,),  # no downsampling: the tiny VAE keeps the image size
    )  # fmt: skip
    c = base.components
    pipe = StableDiffusionControlNetPipeline(
        vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"], unet=c["unet"],
        scheduler=c["scheduler"], controlnet=_wake(controlnet), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_controlnet():
    from diffusers import SD3ControlNetModel
    from diffusers import StableDiffusion3ControlNetPipeline

    base = tiny.sd3()
    torch.manual_seed(1)
    t = base.transformer.config
    controlnet = SD3ControlNetModel(
        sample_size=t.sample_size, patch_size=t.patch_size, in_channels=t.in_channels, num_layers=1,
        attention_head_dim=t.attention_head_dim, num_attention_heads=t.num_attention_heads,
        joint_attention_dim=t.joint_attention_dim, caption_projection_dim=t.caption_projection_dim,
        pooled_projection_dim=t.pooled_projection_dim, out_channels=t.out_channels, qk_norm="rms_norm",
        pos_embed_max_size=t.pos_embed_max_size,
    )  # fmt: skip
    pipe = StableDiffusion3ControlNetPipeline(**base.components, controlnet=_wake(controlnet))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flux():
    return flux_controlnet()


@pytest.fixture(scope="module")
def unet():
    return unet_controlnet()


@pytest.fixture(scope="module")
def control():
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def sd3():
    return sd3_controlnet()


def run_sd3(pipe, control, **kwargs):
    call = {"num_inference_steps": 2, **tiny.CALL_KWARGS["sd3"], "control_image": control, "guidance_scale": 1.0,
            **kwargs}  # fmt: skip
    torch.manual_seed(0)  # the pipeline samples the control image's latents with the global generator
    with torch.no_grad():
        return pipe(prompt="a red cube on a table", generator=torch.Generator().manual_seed(0), **call).images


def run_flux(pipe, control, **kwargs):
    call = {"num_inference_steps": 2, **tiny.CALL_KWARGS["flux"], "control_image": control, **kwargs}
    with torch.no_grad():
        return pipe(prompt="a red cube on a table", generator=torch.Generator().manual_seed(0), **call).images


def run_unet(pipe, control, **kwargs):
    call = {"num_inference_steps": 2, **tiny.CALL_KWARGS["unet"], "image": control[..., :16, :16], **kwargs}
    with torch.no_grad():
        return pipe(prompt="a red cube on a table", generator=torch.Generator().manual_seed(0), **call).images


# ---------------------------------------------------------------------------- Flux


def test_the_flux_residuals_matter(flux, control):
    assert differs(run_flux(flux, control), run_flux(flux, control, controlnet_conditioning_scale=0.0))


@pytest.mark.parametrize("images", [1, 2])
def test_flux_cfg_equals_the_pipelines_true_cfg_with_the_residuals(flux, control, images):
    """Residuals sized for the positive rows are repeated for the negative rows, as the pipeline's true CFG
    reuses them (images=2: a mismatch used to fail; images=1 used to broadcast by luck)."""
    base = run_flux(flux, control, num_images_per_prompt=images)
    want = run_flux(flux, control, negative_prompt="snow, blurry", true_cfg_scale=3.0, num_images_per_prompt=images)
    with negguide.apply(flux, "cfg", negative_prompt="snow, blurry", scale=3.0):
        got = run_flux(flux, control, num_images_per_prompt=images)
    assert differs(want, base)
    close(got, want)


@pytest.mark.parametrize("path", ["dense", "split"])
def test_flux_vsf_with_infinite_bias_equals_unguided(flux, control, path):
    base = run_flux(flux, control, num_images_per_prompt=2)
    with negguide.apply(flux, "vsf", negative_prompt="snow, blurry", bias=float("inf"), attention=path):
        close(run_flux(flux, control, num_images_per_prompt=2), base)


ATTENTION_PARAMS = {"vsf": {"scale": 4.0, "bias": 0.0}, "nag": {"scale": 5.0, "alpha": 1.0}, "nasa": {"scale": 0.5}}


@pytest.mark.parametrize("method", ["vsf", "nag", "nasa"])
def test_flux_attention_methods_guide_with_a_controlnet(flux, control, method):
    base = run_flux(flux, control, num_images_per_prompt=2)
    params = ATTENTION_PARAMS[method]
    with negguide.apply(flux, method, negative_prompt="snow, blurry", **params):
        out = run_flux(flux, control, num_images_per_prompt=2)
    assert differs(out, base)


def test_flux_vsf_guides_only_the_conditional_call_of_the_true_cfg(flux, control):
    cfg = {"negative_prompt": "ugly", "true_cfg_scale": 2.0}
    base = run_flux(flux, control, **cfg)
    with negguide.apply(flux, "vsf", negative_prompt="snow", bias=float("inf")):
        close(run_flux(flux, control, **cfg), base)


def test_list_inputs_are_extended_on_copies_never_the_callers():
    """``"<input>.*"`` names every entry of a list, tuple or dict input; stores copy the containers."""
    a, b = torch.zeros(2, 3), torch.ones(2, 3)
    kwargs = {"res": [a, b], "tup": (a,), "by_index": {0: b}, "nested": {"embeds": [a]}, "none": None}
    names = _entries(kwargs, ("x", "res.*", "tup.*", "by_index.*", "nested.embeds.*", "none.*", "missing.*"))
    assert names == ["x", "res.0", "res.1", "tup.0", "by_index.0", "nested.embeds.0"]
    assert _lookup(kwargs, "res.1") is b and _lookup(kwargs, "by_index.0") is b and _lookup(kwargs, "res.5") is None
    out = dict(kwargs)
    for name in names[1:]:
        _store(out, name, torch.cat([_lookup(kwargs, name)] * 2))
    assert [t.shape[0] for t in out["res"]] == [4, 4] and isinstance(out["tup"], tuple)
    assert out["by_index"][0].shape[0] == 4 and out["nested"]["embeds"][0].shape[0] == 4
    assert kwargs["res"] == [a, b] and kwargs["tup"] == (a,) and kwargs["by_index"][0] is b
    assert kwargs["nested"]["embeds"][0] is a


# ---------------------------------------------------------------------------- UNet (SD) ControlNet


def test_the_unet_residuals_matter(unet, control):
    assert differs(run_unet(unet, control), run_unet(unet, control, controlnet_conditioning_scale=0.0))


def test_unet_vsf_with_infinite_bias_equals_unguided_and_guided_differs(unet, control):
    base = run_unet(unet, control, num_images_per_prompt=2)
    with negguide.apply(unet, "vsf", negative_prompt="snow, blurry", bias=float("inf")):
        close(run_unet(unet, control, num_images_per_prompt=2), base)
    with negguide.apply(unet, "vsf", negative_prompt="snow, blurry", scale=4.0, bias=0.0):
        assert differs(run_unet(unet, control, num_images_per_prompt=2), base)


@pytest.mark.parametrize("method", ["nag", "nasa"])
def test_unet_other_attention_methods_guide_with_a_controlnet(unet, control, method):
    """NAG and NASA with the ControlNet's residuals: they act, and NASA at scale 0 is the unguided pipeline."""
    base = run_unet(unet, control, num_images_per_prompt=2)
    with negguide.apply(unet, method, negative_prompt="snow, blurry", **ATTENTION_PARAMS[method]):
        assert differs(run_unet(unet, control, num_images_per_prompt=2), base)
    if method == "nasa":
        with negguide.apply(unet, "nasa", negative_prompt="snow, blurry", scale=0.0):
            close(run_unet(unet, control, num_images_per_prompt=2), base)


def test_unet_vsf_with_the_pipelines_own_cfg_guides_the_conditional_rows_only(unet, control):
    cfg = {"negative_prompt": "ugly", "guidance_scale": 4.0}
    base = run_unet(unet, control, **cfg)
    with negguide.apply(unet, "vsf", negative_prompt="snow", bias=float("inf")):
        close(run_unet(unet, control, **cfg), base)


def test_unet_cfg_with_a_controlnet_is_refused_and_the_pipeline_is_restored(unet, control):
    base = run_unet(unet, control)
    processors = dict(unet.unet.attn_processors)
    with pytest.raises(NoAdapterError, match=r"ControlNet on the negative prompt.*guidance_scale > 1"):
        with negguide.apply(unet, "cfg", negative_prompt="snow"):
            run_unet(unet, control)
    assert not unet.unet._forward_pre_hooks_with_kwargs and "encode_prompt" not in unet.__dict__
    assert all(unet.unet.attn_processors[k] is v for k, v in processors.items())
    assert np.array_equal(run_unet(unet, control), base)


# ---------------------------------------------------------------------------- SD3 ControlNet (attention level)


def test_the_sd3_residuals_matter(sd3, control):
    assert differs(run_sd3(sd3, control), run_sd3(sd3, control, controlnet_conditioning_scale=0.0))


@pytest.mark.parametrize("path", ["dense", "split"])
def test_sd3_vsf_with_infinite_bias_equals_unguided_and_guided_differs(sd3, control, path):
    base = run_sd3(sd3, control, num_images_per_prompt=2)
    with negguide.apply(sd3, "vsf", negative_prompt="snow, blurry", bias=float("inf"), attention=path):
        close(run_sd3(sd3, control, num_images_per_prompt=2), base)
    with negguide.apply(sd3, "vsf", negative_prompt="snow, blurry", scale=4.0, bias=0.0, attention=path):
        assert differs(run_sd3(sd3, control, num_images_per_prompt=2), base)


def test_sd3_vsf_with_the_pipelines_own_cfg_guides_the_conditional_rows_only(sd3, control):
    cfg = {"negative_prompt": "ugly", "guidance_scale": 3.0}
    base = run_sd3(sd3, control, **cfg)
    with negguide.apply(sd3, "vsf", negative_prompt="snow", bias=float("inf")):
        close(run_sd3(sd3, control, **cfg), base)


def test_sd3_cfg_with_a_controlnet_is_refused_and_the_pipeline_is_restored(sd3, control):
    base = run_sd3(sd3, control)
    with pytest.raises(NoAdapterError, match=r"ControlNet on the negative prompt.*guidance_scale > 1"):
        with negguide.apply(sd3, "cfg", negative_prompt="snow"):
            run_sd3(sd3, control)
    assert not sd3.transformer._forward_pre_hooks_with_kwargs and "encode_prompt" not in sd3.__dict__
    assert np.array_equal(run_sd3(sd3, control), base)
