"""The HunyuanVideo 1.5 adapter on tiny offline HunyuanVideo 1.5 pipelines (2 dual-stream blocks; text-to-video and
image-to-video; the guider off, as the step-distilled checkpoints run, or a CFG / APG guider).

Numbers are checked against the unpatched pipeline (unguided runs, its guider's own CFG and its unconditional
branch), the model's own token refiner run on each negative alone, and an independent float64 re-implementation of one
guided attention call with the paper's mask table (the image tokens rotated, the text not), also at 32k tokens under a
memory cap.
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
from negguide.adapters.hunyuanvideo15 import HunyuanVideo15Adapter
from negguide.errors import NegGuideWarning
from negguide.registry import adapter_for
from negguide.tiny.families import hunyuanvideo15 as tiny_h15
from tests.adapters.helpers import differs
from tests.adapters.test_hunyuanvideo import capped_guided_call
from tests.adapters.test_hunyuanvideo import guided_call
from tests.adapters.test_hunyuanvideo import reference_vsf

CALL = {"num_inference_steps": 2, **tiny_h15.CALL}
NEG = "snow, a dark and blurry photo"


@pytest.fixture(scope="module")
def pipe():
    return tiny_h15.build()


@pytest.fixture(scope="module")
def image():
    from PIL import Image

    return Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8"))


def run(pipe, prompt="a red cat on a mat", seed=0, **kwargs):
    call = {"num_inference_steps": 2, **tiny_h15.I2V_CALL} if "image" in kwargs else CALL
    with torch.no_grad():
        out = pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), **{**call, **kwargs})
    return np.asarray(out.frames, dtype=np.float64)


def close(a, b, atol=2e-5):
    np.testing.assert_allclose(a, b, atol=atol, rtol=0)


def real_tokens(pipe, text):
    """The prompt's Qwen tokens the pipeline keeps: its chat template tokenized without padding, less the system
    part (``prompt_template_encode_start_idx``), at most ``tokenizer_max_length``."""
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import format_text_input

    ids = pipe.tokenizer.apply_chat_template(format_text_input([text], pipe.system_message), add_generation_prompt=True,
                                             tokenize=True, return_dict=True).input_ids[0]  # fmt: skip
    return min(len(ids) - pipe.prompt_template_encode_start_idx, pipe.tokenizer_max_length)


def apg_guider(scale=3.0):
    from diffusers.guiders import AdaptiveProjectedGuidance

    return AdaptiveProjectedGuidance(guidance_scale=scale)


# ---------------------------------------------------------------------------- facts


@pytest.mark.parametrize("kind", ["text2video", "image2video"])
def test_adapter_resolves_for_every_pipeline(kind):
    assert adapter_for(tiny_h15.build(kind=kind)) is HunyuanVideo15Adapter


def test_negatives_are_encoded_without_padding(pipe):
    """Each negative is the pipeline's own Qwen encoding of it, cut to its real tokens (Qwen is causal)."""
    short, long = "snow", "a dark and blurry photo of heavy rain"
    with negguide.apply(pipe, "vsf", negative_prompt=[short, long]) as handle:
        pipe.encode_prompt(["a red cube", "a tree"], device=torch.device("cpu"), batch_size=2)
        encoded = handle.installation.encoded[0]
    lengths = [real_tokens(pipe, short), real_tokens(pipe, long)]
    assert encoded.mask.sum(1).tolist() == lengths and encoded.num_tokens == max(lengths)
    for row, text in enumerate([short, long]):
        alone, mask, _, _ = pipe.encode_prompt(text, device=torch.device("cpu"))
        assert int(mask.sum()) == lengths[row] and bool(mask[0, : lengths[row]].all())
        torch.testing.assert_close(encoded.embeds[row, : lengths[row]], alone[0, : lengths[row]], atol=0, rtol=0)


def test_a_quoted_negative_warns_that_its_glyphs_are_not_used(pipe):
    """A negative quoting text: its Qwen tokens guide, its ByT5 glyph tokens do not (a warning says so)."""
    with pytest.warns(NegGuideWarning, match="quotes text"):
        with negguide.apply(pipe, "vsf", negative_prompt='a sign saying "SALE"') as handle:
            pipe.encode_prompt("a red cube", device=torch.device("cpu"))
            assert handle.installation.encoded[0].num_tokens == real_tokens(pipe, 'a sign saying "SALE"')


def test_the_token_refiner_sees_the_prompt_as_before_and_each_negative_alone(pipe):
    """The refiner mixes text tokens: the prompt is refined exactly as unpatched, each negative alone."""
    calls = []
    hook = pipe.transformer.context_embedder.register_forward_hook(
        lambda m, args, out: calls.append((args[0].clone(), args[1], args[2], out.detach().clone()))
    )
    try:
        run(pipe, num_inference_steps=1)
        with negguide.apply(pipe, "vsf", negative_prompt=["snow", "heavy rain"]):
            run(pipe, prompt=["a red cat on a mat", "a tree"], num_inference_steps=1)
    finally:
        hook.remove()
    (_, _, _, plain_out), (pos_in, _, _, pos_out), (neg_in, timestep, neg_mask, neg_out) = calls
    assert pos_in.shape[:2] == (2, pipe.tokenizer_max_length) and neg_in.shape[1] == real_tokens(pipe, "heavy rain")
    torch.testing.assert_close(pos_out[:1], plain_out, atol=1e-6, rtol=0)  # the prompt row as unpatched
    for row, text in enumerate(["snow", "heavy rain"]):
        n = real_tokens(pipe, text)
        assert neg_mask[row].sum() == n
        with torch.no_grad():
            alone = pipe.transformer.context_embedder(neg_in[row : row + 1, :n], timestep[row : row + 1], None)
        torch.testing.assert_close(neg_out[row : row + 1, :n], alone, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- one attention call


@pytest.mark.parametrize("path", ["dense", "split"])
@pytest.mark.parametrize("sizes", [(3,), (3, 2)], ids=["one-negative", "two-negatives"])
def test_processor_matches_float64_reference(pipe, path, sizes):
    """One guided call of a dual-stream 1.5 block equals the mask-table reference, padding and RoPE included."""
    attn = copy.deepcopy(pipe.transformer.transformer_blocks[0].attn).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in attn.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    batch, p, n_img, dim, head_dim = 2, 5, 7, attn.query_dim, attn.inner_dim // attn.heads
    text = torch.randn(batch, p + sum(sizes), dim, generator=gen, dtype=torch.float64)
    img = torch.randn(batch, n_img, dim, generator=gen, dtype=torch.float64)
    angles = 3 * torch.randn(n_img, head_dim // 2, generator=gen, dtype=torch.float64)
    cos_sin = (angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1))  # diffusers' real form
    pos_mask = torch.tensor([[True] * p, [True] * (p - 2) + [False] * 2])
    neg_masks = [torch.tensor([[True] * n, [True] * (n - 1) + [False]]) for n in sizes]
    got = guided_call(pipe, HunyuanVideo15Adapter(pipe), attn, path, img, text, cos_sin, p, sizes, pos_mask, neg_masks,
                      2.5, 0.25)  # fmt: skip
    with torch.no_grad():
        want = reference_vsf(attn, img, text, angles, p, sizes, 2.5, 0.25, pos_mask, neg_masks)
    tol = {"atol": 2e-6 if path == "dense" else 2e-5, "rtol": 0}  # diffusers' RoPE rounds to float32
    torch.testing.assert_close(got[0], want[0], **tol)
    real = torch.cat([pos_mask, *neg_masks], dim=1)[:, :, None].expand_as(want[1])  # padding outputs are never read
    torch.testing.assert_close(got[1][real], want[1][real], **tol)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs RLIMIT_AS and /proc (Linux)")
def test_a_32k_token_guided_attention_fits_in_linear_memory():
    """A dual-stream 1.5 attention (image, prompt and negative in one joint sequence) at 32k tokens."""
    capped_guided_call("hunyuanvideo15")


# ---------------------------------------------------------------------------- the guider


def test_cfg_equals_the_guiders_own_cfg():
    """negguide's CFG on the guider-off pipeline (the negative encoded as the pipeline's own, its ByT5 stream
    included) equals the pipeline with a CFG guider and that negative prompt."""
    plain, guided = tiny_h15.build(), tiny_h15.build(guidance_scale=3.0)
    own = run(guided, negative_prompt="ugly")
    with negguide.apply(plain, "cfg", negative_prompt="ugly", scale=3.0):
        close(run(plain), own)


@pytest.mark.parametrize("guider", ["cfg", "apg"])
def test_the_guiders_unconditional_branch_is_left_alone(guider):
    """Under the guider it is given (CFG, APG), VSF guides the pred_cond call and never the pred_uncond one: the
    first step's unconditional prediction is the unpatched one, bit for bit; bias=inf equals the guider's result."""
    target = tiny_h15.build(guidance_scale=3.0)
    if guider == "apg":
        target.guider = apg_guider()
    outputs = []
    hook = target.transformer.register_forward_hook(lambda module, args, out: outputs.append(out[0].clone()))
    try:
        own = run(target, negative_prompt="ugly")
        with negguide.apply(target, "vsf", negative_prompt=NEG, bias=math.inf):
            close(run(target, negative_prompt="ugly"), own)
        del outputs[4:]
        with negguide.apply(target, "vsf", negative_prompt=NEG):
            assert differs(run(target, negative_prompt="ugly"), own)
    finally:
        hook.remove()
    plain, guided = outputs[:4], outputs[4:]
    assert len(guided) == 4  # [cond, uncond] per step
    assert differs(guided[0].numpy(), plain[0].numpy())  # pred_cond of the first step: guided
    assert torch.equal(guided[1], plain[1])  # pred_uncond of the first step: the same inputs, unguided


# ---------------------------------------------------------------------------- image-to-video


def test_image_to_video_shares_the_denoiser(image):
    """HunyuanVideo15ImageToVideoPipeline (SigLIP image tokens valid in the text stream, the image latents on the
    channels): VSF with bias=inf is the unguided pipeline, VSF guides, and CFG equals its guider's own CFG."""
    i2v = tiny_h15.build(kind="image2video")
    base = run(i2v, image=image)
    with negguide.apply(i2v, "vsf", negative_prompt=NEG, bias=math.inf):
        close(run(i2v, image=image), base)
    for method in ("vsf", "nag"):
        with negguide.apply(i2v, method, negative_prompt=NEG):
            assert differs(run(i2v, image=image), base)
    own = run(tiny_h15.build(kind="image2video", guidance_scale=3.0), image=image, negative_prompt="ugly")
    with negguide.apply(i2v, "cfg", negative_prompt="ugly", scale=3.0):
        close(run(i2v, image=image), own)


def test_step_distilled_image_to_video_is_guided_every_step(image):
    """The step-distilled checkpoints (MeanFlow ``timestep_r``, the guider off): one call per step, each guided, the
    negatives isolated (bias=inf is the unguided pipeline)."""
    i2v = tiny_h15.build(kind="image2video", use_meanflow=True)
    seen = []
    hook = i2v.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["timestep_r"] is not None), with_kwargs=True
    )
    try:
        base = run(i2v, image=image)
        with negguide.apply(i2v, "vsf", negative_prompt=NEG, bias=math.inf):
            close(run(i2v, image=image), base)
        with negguide.apply(i2v, "vsf", negative_prompt=NEG) as handle:
            calls = []
            original = handle.installation.run_method
            handle.installation.run_method = lambda seg, processor: (
                calls.append(processor.index) or original(seg, processor)
            )
            assert differs(run(i2v, image=image), base)
    finally:
        hook.remove()
    assert all(seen) and len(seen) == 6 and calls == [0, 1] * 2


def test_negative_prompt_embeds_equal_the_text_path(pipe):
    text = "heavy rain"
    with torch.no_grad():  # as the pipeline encodes
        embeds, mask, embeds_2, mask_2 = pipe.encode_prompt(text, device=torch.device("cpu"))
    with negguide.apply(pipe, "vsf", negative_prompt=text):
        want = run(pipe)
    n = int(mask.sum())
    for given in (embeds[:, :n], {"prompt_embeds": embeds, "prompt_embeds_mask": mask}):
        with negguide.apply(pipe, "vsf", negative_prompt_embeds=given):
            close(run(pipe), want)
    with negguide.apply(pipe, "cfg", negative_prompt=text, scale=3.0):
        want = run(pipe)
    given = {"prompt_embeds": embeds, "prompt_embeds_mask": mask, "prompt_embeds_2": embeds_2,
             "prompt_embeds_mask_2": mask_2}  # fmt: skip
    with negguide.apply(pipe, "cfg", negative_prompt_embeds=given, scale=3.0):
        close(run(pipe), want)


# ---------------------------------------------------------------------------- the conformance kit

CASE = testing.Case(build=tiny_h15.build, call=tiny_h15.CALL, output="frames")
GUIDER_CASE = testing.Case(
    build=functools.partial(tiny_h15.build, guidance_scale=4.0),
    call=tiny_h15.CALL,
    output="frames",
    pipeline_cfg={"negative_prompt": "ugly"},
)


def test_unpatched_transformer_does_not_compile_fullgraph_beside_its_guider():
    """Why the compile check runs with the guider off: the pred_uncond call runs diffusers' own forward, whose
    ``if torch.all(image_embeds == 0):`` (text-to-video or not) is a data-dependent branch under fullgraph=True,
    negguide or not. (A guided call runs the adapter's forward, which computes the same branch-free.)"""
    target = tiny_h15.build()
    torch._dynamo.reset()
    try:
        target.transformer.compile(backend="aot_eager", fullgraph=True)
        with pytest.raises(Exception, match="[Dd]ata-dependent"):
            run(target, num_inference_steps=1)
    finally:
        target.transformer._compiled_call_impl = None
        torch._dynamo.reset()


@pytest.mark.parametrize("check", sorted(testing.CHECKS))
def test_conformance(check):
    """The adapter passes every check of negguide.testing on the tiny pipeline (the guider off, as the step-distilled
    checkpoints run; the pipeline's own CFG: with a CFG guider)."""
    testing.CHECKS[check](GUIDER_CASE if check == "pipeline_cfg_guides_conditional_rows" else CASE)
