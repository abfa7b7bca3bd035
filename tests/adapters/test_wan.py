"""Wan adapter on tiny offline Wan pipelines: T2V, I2V (image context), VACE, Wan 2.2 two experts."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch

import negguide
from negguide import testing
from negguide import tiny
from negguide.adapters.wan import WanAdapter
from negguide.attention import Block
from negguide.attention import attend_blocks
from negguide.errors import NegativePromptError
from negguide.installation import GuidedProcessor
from negguide.method import Segments

CALL = {"num_inference_steps": 2, "guidance_scale": 1.0, **tiny.CALL_KWARGS["wan"]}
PROMPT = "a cat on a mat"
NEG = "snow"


def run(pipe, prompt=PROMPT, seed=0, **kw):
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **{**CALL, **kw}).frames


def num_tokens(pipe, text):
    return len(pipe.tokenizer(text).input_ids)


class ContextSpy:
    """Records the context length every ``attn2`` of ``transformer`` receives (positional arg 1)."""

    def __init__(self, transformer, block=0):
        self.lengths = []
        self.handle = transformer.blocks[block].attn2.register_forward_pre_hook(
            lambda module, args: self.lengths.append(args[1].shape[1])
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def snapshot(pipe):
    state = [set(pipe.__dict__)]
    for t in (pipe.transformer, getattr(pipe, "transformer_2", None)):
        if t is not None:
            state.append((dict(t.attn_processors), set(t.__dict__), dict(t._forward_pre_hooks), dict(t._forward_hooks)))
    return state


def assert_restored(pipe, snap):
    now = snapshot(pipe)
    assert now[0] == snap[0]
    assert len(now) == len(snap)
    for (procs, keys, pre, post), (procs_now, keys_now, pre_now, post_now) in zip(snap[1:], now[1:]):
        assert procs_now.keys() == procs.keys()
        assert all(procs_now[k] is v for k, v in procs.items())
        assert (keys_now, pre_now, post_now) == (keys, pre, post)


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pipe():
    p = tiny.wan()
    yield p
    negguide.remove(p)


@pytest.fixture(scope="module")
def base(pipe):
    return run(pipe)


@pytest.fixture(scope="module")
def no_ftfy():
    """diffusers' I2V and VACE pipelines call ``ftfy.fix_text`` unconditionally; ftfy is not a dependency."""
    from diffusers.pipelines.wan import pipeline_wan_i2v
    from diffusers.pipelines.wan import pipeline_wan_vace

    with pytest.MonkeyPatch.context() as mp:
        for module in (pipeline_wan_i2v, pipeline_wan_vace):
            if not hasattr(module, "ftfy"):
                mp.setattr(module, "ftfy", types.SimpleNamespace(fix_text=lambda text: text), raising=False)
        yield


def _tiny_transformer(cls, seed, **kw):
    torch.manual_seed(seed)
    return cls(**{**tiny.WAN_TRANSFORMER, **kw}).eval()


@pytest.fixture(scope="module")
def i2v_pipe(pipe, no_ftfy):
    """A tiny Wan 2.1 I2V pipeline: CLIP image context (17 tokens) ahead of the text in every ``attn2``."""
    from diffusers import WanImageToVideoPipeline
    from diffusers import WanTransformer3DModel
    from transformers import CLIPImageProcessorPil
    from transformers import CLIPVisionConfig
    from transformers import CLIPVisionModel

    torch.manual_seed(1)
    encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    ).eval()
    transformer = _tiny_transformer(WanTransformer3DModel, 1, in_channels=36, image_dim=16, added_kv_proj_dim=24)
    p = WanImageToVideoPipeline(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        vae=pipe.vae,
        scheduler=pipe.scheduler,
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        image_encoder=encoder,
        transformer=transformer,
    )
    p.set_progress_bar_config(disable=True)
    yield p
    negguide.remove(p)


# ---------------------------------------------------------------------------- VSF end to end


def test_adapter_resolves(pipe):
    assert negguide.get_adapter(pipe.transformer) is WanAdapter
    assert WanAdapter.family == "wan" and WanAdapter.layout == "cross"
    assert not WanAdapter.matches(torch.nn.Linear(2, 2))


def test_custom_processors_are_refused(pipe):
    """A processor negguide does not know on a guided module is refused, never silently replaced."""
    from negguide.errors import NoAdapterError
    from negguide.runtime import applied

    before = dict(pipe.transformer.attn_processors)
    try:
        pipe.transformer.blocks[0].attn2.set_processor(type("MyProcessor", (), {"__call__": lambda self, *a, **k: 0})())
        with pytest.raises(
            NoAdapterError, match=r"expected WanAttnProcessor on `blocks.0.attn2.processor`, got MyProcessor"
        ):
            negguide.apply(pipe, "vsf", negative_prompt="snow")
    finally:
        pipe.transformer.set_attn_processor(dict(before))
    assert applied(pipe) is None and pipe.transformer.attn_processors == before


@pytest.mark.parametrize("path", ["dense", "split"])
def test_vsf_infinite_bias_equals_unguided(pipe, base, path):
    """With the negative fully masked (beta = inf) VSF is the unguided pipeline, though N is in the context."""
    with negguide.apply(pipe, "vsf", negative_prompt=NEG, bias=math.inf, attention=path):
        with ContextSpy(pipe.transformer) as spy:
            out = run(pipe)
    assert spy.lengths == [32 + num_tokens(pipe, NEG)] * 2
    np.testing.assert_allclose(out, base, atol=1e-5, rtol=0)


def test_vsf_changes_output_and_paths_agree(pipe, base):
    outs = {}
    for path in ("dense", "split"):
        with negguide.apply(pipe, "vsf", negative_prompt=NEG, attention=path):
            outs[path] = run(pipe)
    assert np.abs(outs["dense"] - base).max() > 1e-3
    np.testing.assert_allclose(outs["split"], outs["dense"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["vsf", "nag", "nasa"])
def test_empty_negative_is_bit_identical(pipe, base, method):
    with negguide.apply(pipe, method, negative_prompt="  "):
        out = run(pipe)
    assert np.array_equal(out, base)


@pytest.mark.parametrize("method", ["nag", "nasa"])
def test_nag_and_nasa_run(pipe, base, method):
    with negguide.apply(pipe, method, negative_prompt=NEG):
        out = run(pipe)
    assert out.shape == base.shape and np.isfinite(out).all()
    assert np.abs(out - base).max() > 1e-3


def test_negative_prompt_embeds_equal_text(pipe):
    """Unpadded UMT5 embeddings given by the user act exactly like the same negative given as text."""
    embeds = pipe.encode_prompt(NEG, do_classifier_free_guidance=False, max_sequence_length=32)[0]
    embeds = embeds[:, : num_tokens(pipe, NEG)]
    with negguide.apply(pipe, "vsf", negative_prompt=NEG):
        text = run(pipe)
    with negguide.apply(pipe, "vsf", negative_prompt_embeds=embeds):
        given = run(pipe)
    np.testing.assert_allclose(given, text, atol=1e-6, rtol=0)
    with negguide.apply(pipe, "vsf", negative_prompt_embeds=embeds[..., :8]):
        with pytest.raises(NegativePromptError, match="text_dim|tokens, 32"):
            run(pipe)


# ---------------------------------------------------------------------------- cross-layout math


def _attention64(q, k, v, key_mask=None):
    logits = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], -math.inf)
    return torch.softmax(logits, dim=-1) @ v.double(), torch.logsumexp(logits, dim=-1)


def _cross_inputs(seed=0, batch=2, heads=2, n_q=7, n_pos=5, n_neg=4, dim=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n_q, dim, generator=g)
    kp, vp = torch.randn(batch, heads, n_pos, dim, generator=g), torch.randn(batch, heads, n_pos, dim, generator=g)
    kn, vn = torch.randn(batch, heads, n_neg, dim, generator=g), torch.randn(batch, heads, n_neg, dim, generator=g)
    mask = torch.ones(batch, n_neg, dtype=torch.bool)
    mask[0, 2:] = False  # row 0 has a shorter negative (padding)
    return q, kp, vp, kn, vn, mask


@pytest.mark.parametrize("path", ["dense", "split"])
def test_unbiased_negative_block_is_plain_attention_over_context(path):
    """A negative block with bias 0 and coef 1 is ordinary attention over the concatenated context [P; N]."""
    q, kp, vp, kn, vn, mask = _cross_inputs()
    out = attend_blocks(q, [Block(kp, vp), Block(kn, vn, 0.0, 1.0, mask)], path)
    full_mask = torch.cat([torch.ones(2, kp.shape[2], dtype=torch.bool), mask], dim=1)
    ref, _ = _attention64(q, torch.cat([kp, kn], 2), torch.cat([vp, vn], 2), full_mask)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["dense", "split"])
@pytest.mark.parametrize(("alpha", "beta"), [(1.5, 0.1), (3.0, 0.0), (0.5, 2.0)])
def test_vsf_cross_output_matches_closed_form(path, alpha, beta):
    """VSF on the cross layout: Z = W Z+ - alpha (1 - W) Z-, W = A+ / (A+ + e^-beta A-) (float64 reference)."""
    q, kp, vp, kn, vn, mask = _cross_inputs(seed=1)
    method = negguide.get_method("vsf")
    vsf = method(method.make_config({"scale": alpha, "bias": beta, "attention": path}, family="wan"))
    seg = Segments.one("cross", q, None, None, None, kp, vp, None, kn, vn, neg_mask=mask)
    out = vsf.attend(seg).img
    z_pos, lse_pos = _attention64(q, kp, vp)
    z_neg, lse_neg = _attention64(q, kn, vn, mask)
    w = torch.sigmoid(lse_pos - (lse_neg - beta))[..., None]  # A+ / (A+ + e^-beta A-)
    ref = w * z_pos - alpha * (1 - w) * z_neg
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- install / restore


def test_remove_restores_bit_identically(pipe, base):
    snap = snapshot(pipe)
    attn1 = pipe.transformer.attn_processors["blocks.0.attn1.processor"]
    with negguide.apply(pipe, "vsf", negative_prompt=NEG):
        procs = pipe.transformer.attn_processors
        assert isinstance(procs["blocks.0.attn2.processor"], GuidedProcessor)
        assert isinstance(procs["blocks.1.attn2.processor"], GuidedProcessor)
        assert procs["blocks.0.attn1.processor"] is attn1  # self-attention untouched
        run(pipe)
    assert_restored(pipe, snap)
    assert np.array_equal(run(pipe), base)

    handle = negguide.apply(pipe, "nag", negative_prompt=NEG)
    run(pipe)
    handle.remove()
    assert_restored(pipe, snap)
    assert np.array_equal(run(pipe), base)


def test_restores_after_exception_inside_a_forward(pipe, base):
    snap = snapshot(pipe)

    def boom(*args):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with negguide.apply(pipe, "vsf", negative_prompt=NEG):
            run(pipe, callback_on_step_end=boom)
    assert_restored(pipe, snap)
    assert np.array_equal(run(pipe), base)


# ---------------------------------------------------------------------------- CFG and the pipeline's CFG


@pytest.mark.parametrize("expand_timesteps", [False, True], ids=["t2v", "ti2v-timesteps"])
def test_cfg_equals_pipeline_cfg(pipe, base, expand_timesteps):
    """negguide's CFG (pipeline CFG off) is the pipeline's own CFG with the same negative prompt.

    ``expand_timesteps`` (Wan 2.2 TI2V) passes a ``(batch, tokens)`` timestep: the negative rows get theirs.
    """
    p = pipe
    if expand_timesteps:
        from diffusers import WanPipeline

        p = WanPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                        scheduler=pipe.scheduler, transformer=pipe.transformer, expand_timesteps=True)  # fmt: skip
        p.set_progress_bar_config(disable=True)
    own = run(p, guidance_scale=3.0, negative_prompt=NEG)
    with negguide.apply(p, "cfg", negative_prompt=NEG, scale=3.0):
        ours = run(p)
    assert np.abs(own - base).max() > 1e-3
    np.testing.assert_allclose(ours, own, atol=1e-5, rtol=0)
    with negguide.apply(p, "cfg", negative_prompt=NEG, scale=1.0):
        one = run(p)
    np.testing.assert_allclose(one, base, atol=1e-5, rtol=0)


def test_pipeline_cfg_uncond_branch_is_unguided(pipe):
    """With the pipeline's CFG on, only the "cond" forward carries the negative tokens."""
    kw = {"guidance_scale": 2.0, "negative_prompt": "blurry"}
    unguided = run(pipe, **kw)
    n = num_tokens(pipe, NEG)
    with negguide.apply(pipe, "vsf", negative_prompt=NEG, bias=math.inf):
        with ContextSpy(pipe.transformer) as spy:
            out = run(pipe, **kw)
    assert spy.lengths == [32 + n, 32, 32 + n, 32]
    np.testing.assert_allclose(out, unguided, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- batching and layers


def _latents(rows, seed=3):
    return torch.randn(rows, 16, 2, 4, 4, generator=torch.Generator().manual_seed(seed))


def test_batch_with_per_prompt_negatives_equals_single_runs(pipe):
    """2 prompts x 2 videos, negatives of different lengths (padded, masked): each row is its own run."""
    prompts, negs = ["a cat", "a dog on grass"], ["snow", "a red dog running fast"]
    latents = _latents(4)
    with negguide.apply(pipe, "vsf", negative_prompt=negs):
        batch = run(pipe, prompts, num_videos_per_prompt=2, latents=latents)
    assert batch.shape[0] == 4
    for row in (1, 2):  # second video of prompt 0, first of prompt 1
        with negguide.apply(pipe, "vsf", negative_prompt=negs[row // 2]):
            alone = run(pipe, prompts[row // 2], latents=latents[row : row + 1])
        np.testing.assert_allclose(batch[row : row + 1], alone, atol=1e-5, rtol=0)


def test_empty_negative_in_a_batch_leaves_its_row_unguided(pipe):
    latents = _latents(2, seed=4)
    with negguide.apply(pipe, "vsf", negative_prompt=["", NEG]):
        batch = run(pipe, ["a cat", "a dog"], latents=latents)
    unguided = run(pipe, "a cat", latents=latents[:1])
    np.testing.assert_allclose(batch[:1], unguided, atol=1e-5, rtol=0)
    with negguide.apply(pipe, "vsf", negative_prompt=NEG):
        guided = run(pipe, "a dog", latents=latents[1:])
    np.testing.assert_allclose(batch[1:], guided, atol=1e-5, rtol=0)


def _block_outputs(pipe, **kw):
    outs = {}
    hooks = [
        block.register_forward_hook(lambda m, a, o, i=i: outs.setdefault(i, o.detach().clone()))
        for i, block in enumerate(pipe.transformer.blocks)
    ]
    try:
        run(pipe, **kw)
    finally:
        for h in hooks:
            h.remove()
    return outs  # outputs of the first forward (step 0)


def test_layers_guides_only_the_selected_block(pipe):
    unguided = _block_outputs(pipe)
    with negguide.apply(pipe, "vsf", negative_prompt=NEG):
        every = _block_outputs(pipe)
    assert (every[0] - unguided[0]).abs().max() > 1e-4  # guiding block 0 would change it
    for layers in ([1], [-1]):
        with negguide.apply(pipe, "vsf", negative_prompt=NEG, layers=layers):
            one = _block_outputs(pipe)
        torch.testing.assert_close(one[0], unguided[0], atol=1e-6, rtol=0)  # block 0 isolated
        assert (one[1] - unguided[1]).abs().max() > 1e-4


# ---------------------------------------------------------------------------- image-to-video


def fresh_scheduler(p):
    """Outside a pipeline call the adapter reads the step from the scheduler: make it step 0 of 2."""
    p.scheduler.set_timesteps(2)


@pytest.fixture(scope="module")
def i2v_text(i2v_pipe):
    """The prompt encoded once at 512 tokens (the length `WanAttnProcessor` hard-codes for I2V)."""
    return i2v_pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False, max_sequence_length=512)[0]


def _i2v_inputs(p, text, seed=0):
    fresh_scheduler(p)
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 36, 2, 4, 4, generator=g)
    image = torch.randn(1, 17, 16, generator=g)
    # the adapter encodes the negative when the pipeline encodes its prompt
    p.encode_prompt(None, prompt_embeds=text, do_classifier_free_guidance=False, max_sequence_length=512)
    return {"hidden_states": latents, "timestep": torch.tensor([500.0]), "encoder_hidden_states": text,
            "encoder_hidden_states_image": image, "return_dict": False}  # fmt: skip


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused-kv"])
def test_i2v_image_context_at_transformer_level(i2v_pipe, i2v_text, fused):
    """[image_ctx, P, N]: the image context is split off by P + N (not 512); beta = inf is the original.

    Also with ``fuse_qkv_projections()`` (``to_kv`` and ``to_added_kv`` instead of separate projections).
    """
    tr = i2v_pipe.transformer
    if fused:
        tr.fuse_qkv_projections()
    try:
        assert tr.blocks[0].attn2.fused_projections is fused
        with torch.no_grad():
            unpatched = tr(**_i2v_inputs(i2v_pipe, i2v_text))[0]
            with negguide.apply(i2v_pipe, "vsf", negative_prompt=NEG, bias=math.inf):
                with ContextSpy(tr) as spy:
                    isolated = tr(**_i2v_inputs(i2v_pipe, i2v_text))[0]
            with negguide.apply(i2v_pipe, "vsf", negative_prompt=NEG, scale=3.0):
                guided = tr(**_i2v_inputs(i2v_pipe, i2v_text))[0]
    finally:
        tr.unfuse_qkv_projections()
    assert spy.lengths == [17 + 512 + num_tokens(i2v_pipe, NEG)]
    torch.testing.assert_close(isolated, unpatched, atol=1e-5, rtol=0)
    assert (guided - unpatched).abs().max() > 1e-3


def test_i2v_pipeline_end_to_end(i2v_pipe, i2v_text):
    from PIL import Image

    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    text = i2v_text
    # latents: the tiny random VAE squashes differences ~100x
    kw = {"image": image, "prompt_embeds": text, "max_sequence_length": 512, "output_type": "latent"}

    def go(**extra):
        return i2v_pipe(generator=torch.Generator().manual_seed(0), **{**CALL, **kw, **extra}).frames

    unguided = go()
    with negguide.apply(i2v_pipe, "vsf", negative_prompt=NEG, bias=math.inf):
        isolated = go()
    torch.testing.assert_close(isolated, unguided, atol=1e-5, rtol=0)
    # CFG: the negative branch gets the image context of its rows too
    neg = i2v_pipe.encode_prompt(NEG, do_classifier_free_guidance=False, max_sequence_length=512)[0]
    own = go(guidance_scale=3.0, negative_prompt_embeds=neg)
    with negguide.apply(i2v_pipe, "cfg", negative_prompt_embeds=neg, scale=3.0):
        ours = go()
    torch.testing.assert_close(ours, own, atol=1e-5, rtol=0)
    assert (own - unguided).abs().max() > 1e-3


# ---------------------------------------------------------------------------- VACE and Wan 2.2


def test_vace_control_blocks_are_guided_too(pipe, no_ftfy):
    from diffusers import WanVACEPipeline
    from diffusers import WanVACETransformer3DModel

    tr = _tiny_transformer(WanVACETransformer3DModel, 2, vace_layers=[0, 1], vace_in_channels=8)
    vace = WanVACEPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                           scheduler=pipe.scheduler, transformer=tr)  # fmt: skip
    fresh_scheduler(vace)
    g = torch.Generator().manual_seed(0)
    text = vace.encode_prompt(PROMPT, do_classifier_free_guidance=False, max_sequence_length=32)[0]
    inputs = {"hidden_states": torch.randn(1, 16, 2, 4, 4, generator=g), "timestep": torch.tensor([500.0]),
              "encoder_hidden_states": text, "control_hidden_states": torch.randn(1, 8, 2, 4, 4, generator=g),
              "return_dict": False}  # fmt: skip
    snap = snapshot(vace)
    with torch.no_grad():
        unpatched = tr(**inputs)[0]
        with negguide.apply(vace, "vsf", negative_prompt=NEG, bias=math.inf):
            assert isinstance(tr.attn_processors["vace_blocks.1.attn2.processor"], GuidedProcessor)
            vace.encode_prompt(PROMPT, do_classifier_free_guidance=False, max_sequence_length=32)
            isolated = tr(**inputs)[0]
        with negguide.apply(vace, "vsf", negative_prompt=NEG):
            vace.encode_prompt(PROMPT, do_classifier_free_guidance=False, max_sequence_length=32)
            guided = tr(**inputs)[0]
    assert_restored(vace, snap)
    torch.testing.assert_close(isolated, unpatched, atol=1e-5, rtol=0)
    assert (guided - unpatched).abs().max() > 1e-3


def test_wan22_both_experts_patched_and_restored(pipe):
    """Wan 2.2 A14B: step 0 runs `transformer` (high noise), step 1 `transformer_2`; both are guided."""
    from diffusers import WanPipeline
    from diffusers import WanTransformer3DModel

    two = WanPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae, scheduler=pipe.scheduler,
                      transformer=pipe.transformer, transformer_2=_tiny_transformer(WanTransformer3DModel, 5),
                      boundary_ratio=0.5)  # fmt: skip
    two.set_progress_bar_config(disable=True)
    unguided = run(two)
    snap = snapshot(two)
    n = num_tokens(two, NEG)
    with negguide.apply(two, "vsf", negative_prompt=NEG, bias=math.inf):
        for t in (two.transformer, two.transformer_2):
            assert isinstance(t.attn_processors["blocks.1.attn2.processor"], GuidedProcessor)
        with ContextSpy(two.transformer) as high, ContextSpy(two.transformer_2) as low:
            isolated = run(two)
    assert (high.lengths, low.lengths) == ([32 + n], [32 + n])
    np.testing.assert_allclose(isolated, unguided, atol=1e-5, rtol=0)
    # guiding only step 1 (transformer_2): same input as unguided, different prediction
    low_preds = []
    hook = two.transformer_2.register_forward_hook(lambda m, a, o: low_preds.append(o[0].detach().clone()))
    try:
        run(two)
        with negguide.apply(two, "vsf", negative_prompt=NEG, start=0.5):
            run(two)
    finally:
        hook.remove()
    assert (low_preds[1] - low_preds[0]).abs().max() > 1e-3
    assert_restored(two, snap)
    assert np.array_equal(run(two), unguided)


# ---------------------------------------------------------------------------- the conformance kit

CASE = testing.Case(
    build=tiny.wan,
    call={**tiny.CALL_KWARGS["wan"], "guidance_scale": 1.0},
    output="frames",
    pipeline_cfg={"guidance_scale": 3.0, "negative_prompt": "ugly"},
)


@pytest.mark.parametrize("check", sorted(testing.CHECKS))
def test_conformance(check):
    """The adapter passes every check of negguide.testing on the tiny pipeline."""
    testing.CHECKS[check](CASE)
