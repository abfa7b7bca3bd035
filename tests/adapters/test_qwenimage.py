"""The Qwen-Image adapter on tiny offline Qwen-Image pipelines (2 dual-stream blocks; text-to-image, img2img, inpaint,
Edit, Edit-Plus).

Numbers are checked against the unpatched pipeline (its own true CFG, unguided runs), the unpatched transformer
(CFG's combination), or an independent float64 re-implementation of one guided attention call with the paper's
mask table and the model's rotary positions.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import negguide
from negguide import testing
from negguide import tiny
from negguide.adapter import TextLayout
from negguide.adapters.qwenimage import QwenImageAdapter
from negguide.errors import ConfigError
from negguide.errors import NegativePromptError
from negguide.errors import NoAdapterError
from negguide.installation import Forward
from negguide.installation import Installation
from negguide.installation import guided_processor
from negguide.negatives import NegativeSpec
from negguide.registry import adapter_for
from negguide.registry import get_method
from tests.adapters.helpers import close
from tests.adapters.helpers import differs

CALL = {"num_inference_steps": 2, **tiny.CALL_KWARGS["qwenimage"]}
NEG = "snow, a dark and blurry photo"


@pytest.fixture(scope="module")
def pipe():
    return tiny.qwenimage()


@pytest.fixture(scope="module")
def image():
    from PIL import Image

    pixels = (np.random.RandomState(0).rand(48, 64, 3) * 255).astype("uint8")
    return Image.fromarray(pixels)


def run(pipe, prompt="a red cube on a table", seed=0, **kwargs):
    gen = (
        [torch.Generator().manual_seed(s) for s in seed]
        if isinstance(seed, list)
        else torch.Generator().manual_seed(seed)
    )
    with torch.no_grad():
        out = pipe(prompt=prompt, generator=gen, **{**CALL, **kwargs}).images
    return np.asarray(out.float().numpy() if isinstance(out, torch.Tensor) else out, dtype=np.float64)


def real_tokens(pipe, text, image=None):
    """Tokens the pipeline keeps of ``text``: its chat template, tokenized (with the image's vision tokens), less
    the template's first ``prompt_template_encode_start_idx`` tokens."""
    templated = pipe.prompt_template_encode.format(text)
    if image is None:
        ids = pipe.tokenizer(templated).input_ids
    else:
        ids = pipe.processor(text=[templated], images=image).input_ids[0]
    return len(ids) - pipe.prompt_template_encode_start_idx


# ---------------------------------------------------------------------------- facts


@pytest.mark.parametrize("kind", ["text2image", "img2img", "inpaint", "edit", "edit_plus"])
def test_adapter_resolves_for_every_pipeline(kind):
    assert adapter_for(tiny.qwenimage(kind=kind)) is QwenImageAdapter


def test_negatives_are_encoded_without_padding(pipe):
    """Each negative is the pipeline's own encoding of it alone: the template's first tokens dropped, no padding."""
    short, long = "snow", "a dark and blurry photo of heavy rain"
    with negguide.apply(pipe, "vsf", negative_prompt=short) as handle:
        pipe.encode_prompt("a red cube", max_sequence_length=64)
        encoded = handle.installation.encoded[0]
        assert encoded.num_tokens == real_tokens(pipe, short) and encoded.mask is None
        torch.testing.assert_close(encoded.embeds, pipe.encode_prompt(short, max_sequence_length=64)[0], atol=0, rtol=0)
    with negguide.apply(pipe, "vsf", negative_prompt=[short, long]) as handle:
        pipe.encode_prompt(["a red cube", "a tree"], max_sequence_length=64)
        encoded = handle.installation.encoded[0]
    lengths = [real_tokens(pipe, short), real_tokens(pipe, long)]
    assert encoded.mask.sum(1).tolist() == lengths and encoded.num_tokens == max(lengths)
    # the pipeline's own batch encoding pads the shorter one: its real tokens are the same numbers
    both, mask = pipe.encode_prompt([short, long], max_sequence_length=64)
    assert mask.sum(1).tolist() == lengths
    torch.testing.assert_close(encoded.embeds[0, : lengths[0]], both[0, : lengths[0]], atol=1e-6, rtol=0)


def test_edit_negatives_carry_the_input_images_vision_tokens(image):
    """Edit pipelines encode a prompt with the input image (as their own negative): so does each negative."""
    edit = tiny.qwenimage(kind="edit")
    with negguide.apply(edit, "vsf", negative_prompt="snow") as handle:
        edit.encode_prompt("make it red", image=image)
        encoded = handle.installation.encoded[0]
    assert encoded.num_tokens == real_tokens(edit, "snow", image)
    torch.testing.assert_close(encoded.embeds, edit.encode_prompt("snow", image=image)[0], atol=0, rtol=0)


# ---------------------------------------------------------------------------- one attention call


def _rms(x, norm):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def _rope(x, freqs):
    """Rotate ``x`` (B, L, H, D) by the complex table ``freqs`` (L, D/2): pairs (x[2i], x[2i+1]) as complex numbers."""
    x = x.float().double()  # diffusers' apply_rotary_emb_qwen rounds its input to float32
    z = torch.complex(x[..., 0::2], x[..., 1::2]) * freqs.to(torch.complex128)[None, :, None, :]
    return torch.stack([z.real, z.imag], dim=-1).flatten(-2)


def reference_vsf(attn, img, text, img_freqs, txt_freqs, p, sizes, alpha, beta, pos_mask, neg_masks):
    """Float64 VSF over queries ``[P, N_1.., I]`` and explicit keys ``[P, N_1(0).., I, N_1(1)..]`` with the paper's
    mask table; positive token ``j`` and every negative's token ``j`` sit at row ``j`` of the model's text table."""

    def lin(layer, x):
        return x @ layer.weight.T + layer.bias

    def heads(x):
        return x.unflatten(-1, (attn.heads, -1))

    positions = torch.cat([torch.arange(p), *(torch.arange(n) for n in sizes)])
    t_freqs = txt_freqs[positions]
    q = torch.cat([_rope(_rms(heads(lin(attn.add_q_proj, text)), attn.norm_added_q), t_freqs),
                   _rope(_rms(heads(lin(attn.to_q, img)), attn.norm_q), img_freqs)], dim=1)  # fmt: skip
    k = torch.cat([_rope(_rms(heads(lin(attn.add_k_proj, text)), attn.norm_added_k), t_freqs),
                   _rope(_rms(heads(lin(attn.to_k, img)), attn.norm_k), img_freqs)], dim=1)  # fmt: skip
    v = torch.cat([heads(lin(attn.add_v_proj, text)), heads(lin(attn.to_v, img))], dim=1)
    t, length = p + sum(sizes), q.shape[1]
    starts = [p + sum(sizes[:i]) for i in range(len(sizes))]
    negs = [slice(a, a + n) for a, n in zip(starts, sizes)]
    keys = torch.cat([k, *(k[:, s] for s in negs)], dim=1)  # each N_i(1): N_i's rotated keys again
    values = torch.cat([v, *(-alpha * v[:, s] for s in negs)], dim=1)
    flips = [slice(length + a - p, length + a - p + n) for a, n in zip(starts, sizes)]
    bias = torch.zeros(length, keys.shape[1], dtype=torch.float64)
    pos, image = slice(0, p), slice(t, length)
    for s, f in zip(negs, flips):
        bias[image, s], bias[image, f] = -math.inf, -beta  # I sees I, P and each N_i(1) with -beta
        bias[pos, s], bias[pos, f] = -math.inf, -math.inf  # P sees I, P
        bias[s, pos] = -math.inf  # N_i sees I and itself only
        for s2, f2 in zip(negs, flips):
            bias[s, f2] = -math.inf
            if s2 != s:
                bias[s, s2] = -math.inf
    pad = torch.zeros(q.shape[0], keys.shape[1], dtype=torch.bool)
    pad[:, :p] = ~pos_mask
    for s, f, m in zip(negs, flips, neg_masks):
        pad[:, s], pad[:, f] = ~m, ~m
    logits = torch.einsum("bqhd,bkhd->bhqk", q, keys) / math.sqrt(q.shape[-1]) + bias
    logits = logits.masked_fill(pad[:, None, None, :], -math.inf)
    out = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), values).flatten(2, 3)
    return attn.to_out[0](out[:, t:]), attn.to_add_out(out[:, :t])


@pytest.mark.parametrize("path", ["dense", "split"])
@pytest.mark.parametrize(
    "sizes",
    [(3,), (3, 2)],
    ids=["one-negative", "two-negatives"],
)
def test_processor_matches_float64_reference(pipe, path, sizes):
    """One guided call equals the mask-table reference, padding masks and the negatives' rotary positions included."""
    attn = copy.deepcopy(pipe.transformer.transformer_blocks[0].attn).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in attn.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    batch, p, n_img, dim, half = 2, 5, 7, attn.query_dim, attn.inner_dim // attn.heads // 2
    t = p + sum(sizes)

    def table(rows):
        return torch.polar(torch.ones(rows, half), 3 * torch.randn(rows, half, generator=gen))  # complex64

    img_freqs, txt_freqs = table(n_img), table(t)
    text = torch.randn(batch, t, dim, generator=gen, dtype=torch.float64)
    img = torch.randn(batch, n_img, dim, generator=gen, dtype=torch.float64)
    pos_mask = torch.tensor([[True] * p, [True] * (p - 2) + [False] * 2])
    neg_masks = [torch.tensor([[True] * n, [True] * (n - 1) + [False]]) for n in sizes]
    starts = [p + sum(sizes[:i]) for i in range(len(sizes))]
    spans = tuple((a, a + n) for a, n in zip(starts, sizes))

    method_cls = get_method("vsf")
    method = method_cls(method_cls.make_config({"scale": 2.5, "bias": 0.25, "attention": path}))
    installation = Installation(pipe, QwenImageAdapter(pipe), method, [NegativeSpec("x")])
    layout = TextLayout(p, t, spans)
    installation.forward = Forward(slice(0, batch), layout, spans, tuple(neg_masks), (1.0,) * len(sizes), pos_mask,
                                   None)  # fmt: skip
    proc = guided_processor(installation, attn.processor, 0, 2)
    joined_mask = torch.cat([pos_mask, *neg_masks], dim=1)
    with torch.no_grad():
        got = proc(attn, img, text, encoder_hidden_states_mask=joined_mask, image_rotary_emb=(img_freqs, txt_freqs))
        want = reference_vsf(attn, img, text, img_freqs, txt_freqs, p, sizes, 2.5, 0.25, pos_mask, neg_masks)
    tol = {"atol": 2e-6 if path == "dense" else 2e-5, "rtol": 0}  # diffusers' norms and RoPE round to float32
    torch.testing.assert_close(got[0], want[0], **tol)
    real = joined_mask[:, :, None].expand_as(want[1])  # text outputs of padding tokens are never read
    torch.testing.assert_close(got[1][real], want[1][real], **tol)


def test_processor_without_a_negative_calls_the_original_bit_for_bit(pipe):
    attn = pipe.transformer.transformer_blocks[0].attn
    installation = Installation(pipe, QwenImageAdapter(pipe), get_method("vsf")(), [NegativeSpec("x")])
    proc = guided_processor(installation, attn.processor, 0, 2)
    gen = torch.Generator().manual_seed(0)
    img, text = torch.randn(1, 6, attn.query_dim, generator=gen), torch.randn(1, 4, attn.query_dim, generator=gen)
    mask = torch.tensor([[True, True, True, False]])
    freqs = (
        torch.polar(torch.ones(6, 8), torch.randn(6, 8, generator=gen)),
        torch.polar(torch.ones(4, 8), torch.randn(4, 8, generator=gen)),
    )
    with torch.no_grad():
        got = proc(attn, img, text, encoder_hidden_states_mask=mask, image_rotary_emb=freqs)
        want = attn.processor(attn, img, text, encoder_hidden_states_mask=mask, image_rotary_emb=freqs)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_guided_call_refuses_an_attention_mask(pipe):
    before = dict(pipe.transformer.attn_processors)
    with negguide.apply(pipe, "vsf", negative_prompt="snow"), pytest.raises(ConfigError, match="attention mask"):
        run(pipe, attention_kwargs={"attention_mask": torch.ones(1, 1, 1, 1)})
    assert all(pipe.transformer.attn_processors[k] is v for k, v in before.items())


def test_other_processors_are_refused():
    from diffusers.models.attention_processor import AttnProcessor2_0

    other = tiny.qwenimage()
    other.transformer.transformer_blocks[1].attn.set_processor(AttnProcessor2_0())
    before = dict(other.transformer.attn_processors)
    with pytest.raises(NoAdapterError, match="QwenDoubleStreamAttnProcessor2_0 in block 1"):
        negguide.apply(other, "vsf", negative_prompt="snow")
    assert all(other.transformer.attn_processors[k] is v for k, v in before.items())
    assert "encode_prompt" not in other.__dict__


# ---------------------------------------------------------------------------- end to end, text-to-image


def test_negative_positions_do_not_depend_on_the_prompts_padding(pipe):
    """The negative's rotary positions are a prompt's, whatever the positive's length: a prompt padded (masked) by
    the pipeline guides exactly like the same prompt unpadded."""
    embeds, _ = pipe.encode_prompt("a red cube on a table", max_sequence_length=64)
    padded = torch.cat([embeds, torch.zeros(1, 9, embeds.shape[-1])], dim=1)
    mask = torch.arange(padded.shape[1])[None] < embeds.shape[1]
    with negguide.apply(pipe, "vsf", negative_prompt=NEG):
        plain = run(pipe, None, prompt_embeds=embeds)
        with_padding = run(pipe, None, prompt_embeds=padded, prompt_embeds_mask=mask.long())
    close(with_padding, plain)
    assert differs(plain, run(pipe, None, prompt_embeds=embeds))


@pytest.mark.parametrize("steps", [1, 4])
def test_lightning_style_few_steps_are_guided_every_step(pipe, steps):
    """``true_cfg_scale`` 1 (one transformer call per step) with few steps: every call of every step is guided."""
    base = run(pipe, num_inference_steps=steps)
    with negguide.apply(pipe, "vsf", negative_prompt=NEG, bias=math.inf):
        close(run(pipe, num_inference_steps=steps), base)
    with negguide.apply(pipe, "vsf", negative_prompt=NEG) as handle:
        calls = []
        original = handle.installation.run_method
        handle.installation.run_method = lambda seg, processor: (
            calls.append(processor.index) or original(seg, processor)
        )
        out = run(pipe, num_inference_steps=steps)
    assert calls == [0, 1] * steps
    assert np.isfinite(out).all() and differs(out, base)


def test_negative_prompt_embeds_equal_the_text_path(pipe):
    negatives = ["snow", "a dark and blurry photo of heavy rain"]
    prompts = ["a red cube", "a tree on a hill"]
    with negguide.apply(pipe, "vsf", negative_prompt=negatives):
        from_text = run(pipe, prompts, seed=[0, 1])
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(negatives, max_sequence_length=64)
        single = pipe.encode_prompt("snow", max_sequence_length=64)[0]
    with negguide.apply(pipe, "vsf", negative_prompt_embeds={"prompt_embeds": embeds, "prompt_embeds_mask": mask}):
        close(run(pipe, prompts, seed=[0, 1]), from_text)
    with negguide.apply(pipe, "vsf", negative_prompt_embeds=single):
        one = run(pipe, prompts[0])
    with negguide.apply(pipe, "vsf", negative_prompt="snow"):
        close(one, run(pipe, prompts[0]))


def _cfg_case(pipe, prompts, negative, scale=3.0):
    """One transformer call under negguide's CFG, and ``u + s (c - u)`` from separate unpatched calls."""
    transformer = pipe.transformer
    cond, cond_mask = pipe.encode_prompt(prompts, max_sequence_length=64)
    uncond, uncond_mask = pipe.encode_prompt([negative] * len(prompts), max_sequence_length=64)
    gen = torch.Generator().manual_seed(0)
    rows = len(prompts)
    inputs = {"hidden_states": torch.randn(rows, 4, 16, generator=gen), "timestep": torch.full((rows,), 0.7),
              "img_shapes": [[(1, 2, 2)]] * rows, "return_dict": False}  # fmt: skip
    with torch.no_grad():
        c = transformer(encoder_hidden_states=cond, encoder_hidden_states_mask=cond_mask, **inputs)[0]
        u = transformer(encoder_hidden_states=uncond, encoder_hidden_states_mask=uncond_mask, **inputs)[0]
        with negguide.apply(pipe, "cfg", negative_prompt=negative, scale=scale):
            pipe.encode_prompt(prompts, max_sequence_length=64)
            got = transformer(encoder_hidden_states=cond, encoder_hidden_states_mask=cond_mask, **inputs)[0]
    return got, u + scale * (c - u)


def test_cfg_equals_the_combination_of_separate_calls_same_length(pipe):
    """negguide's CFG = ``u + s (c - u)`` (the pipeline's own true CFG also rescales to the conditional norm)."""
    got, want = _cfg_case(pipe, ["a red cube on a mat"], "a blurry dark photo")  # as many tokens
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("prompts", "negative"),
    [(["a red cube on a mat"], "snow"), (["a red cube"], "a dark and blurry photo of heavy rain"),
     (["a red cube", "a tree on a hill"], "snow, dark")],
    ids=["shorter-negative", "longer-negative", "masked-prompts"],
)  # fmt: skip
def test_cfg_equals_the_combination_of_separate_calls(pipe, prompts, negative):
    got, want = _cfg_case(pipe, prompts, negative)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_vsf_beside_the_pipelines_true_cfg_joins_the_conditional_call_only(pipe):
    """The pipeline names its branches (cache_context "cond" / "uncond"): the negative tokens join "cond" only."""
    seen = []
    with negguide.apply(pipe, "vsf", negative_prompt=NEG):
        # registered after negguide's own pre-hook: it sees the text the transformer gets
        hook = pipe.transformer.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True
        )
        try:
            run(pipe, negative_prompt="ugly", true_cfg_scale=4.0)
        finally:
            hook.remove()
    p, n, u = (real_tokens(pipe, t) for t in ("a red cube on a table", NEG, "ugly"))
    assert seen == [p + n, u] * 2


def test_zero_cond_t_transformer():
    """A transformer with ``zero_cond_t`` (its own modulation of the input image's tokens) is guided at attention
    level; CFG with several prompts, which diffusers' modulation cannot batch, is refused clearly."""
    from diffusers import QwenImageTransformer2DModel

    target = tiny.qwenimage()
    config = {k: v for k, v in target.transformer.config.items() if not k.startswith("_")}
    torch.manual_seed(1)
    target.transformer = QwenImageTransformer2DModel(**{**config, "zero_cond_t": True}).eval()
    prompts, seeds = ["a red cube", "a big tree"], [0, 1]
    base = run(target, prompts, seed=seeds)
    with negguide.apply(target, "vsf", negative_prompt=NEG, bias=math.inf):
        close(run(target, prompts, seed=seeds), base)
    with negguide.apply(target, "vsf", negative_prompt=NEG):
        assert differs(run(target, prompts, seed=seeds), base)
    with negguide.apply(target, "cfg", negative_prompt="dark photo"):
        with pytest.raises(NegativePromptError, match="`zero_cond_t`"):
            run(target, prompts, seed=seeds)
    assert np.array_equal(run(target, prompts, seed=seeds), base)


# ---------------------------------------------------------------------------- the other pipelines


@pytest.mark.parametrize("kind", ["img2img", "inpaint", "edit", "edit_plus"])
def test_other_pipelines(kind, image):
    """img2img, inpaint, Edit and Edit-Plus share the transformer: VSF with bias=inf is unguided, VSF guides."""
    from PIL import Image

    target = tiny.qwenimage(kind=kind)
    mask = Image.fromarray(((np.random.RandomState(1).rand(64, 64) > 0.5) * 255).astype("uint8"))
    extra = {
        "img2img": {"image": image, "strength": 0.9},
        "inpaint": {"image": image, "mask_image": mask, "strength": 0.9},
        "edit": {"image": image},
        "edit_plus": {"image": [image]},
    }[kind]
    base = run(target, **extra)
    with negguide.apply(target, "vsf", negative_prompt=NEG, bias=math.inf):
        close(run(target, **extra), base)
    with negguide.apply(target, "vsf", negative_prompt=NEG):
        out = run(target, **extra)
    assert np.isfinite(out).all() and differs(out, base)
    if kind in ("img2img", "inpaint"):  # their own true CFG (cheap here): the unconditional call stays unguided
        cfg = {**extra, "negative_prompt": "ugly", "true_cfg_scale": 3.0}
        own = run(target, **cfg)
        with negguide.apply(target, "vsf", negative_prompt=NEG, bias=math.inf):
            close(run(target, **cfg), own)


# ---------------------------------------------------------------------------- the conformance kit

CASE = testing.Case(
    build=tiny.qwenimage,
    call=tiny.CALL_KWARGS["qwenimage"],
    pipeline_cfg={"true_cfg_scale": 4.0, "negative_prompt": "ugly"},
)


@pytest.mark.parametrize("check", sorted(testing.CHECKS))
def test_conformance(check):
    """The adapter passes every check of negguide.testing on the tiny pipeline."""
    testing.CHECKS[check](CASE)
