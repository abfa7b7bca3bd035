"""The Chroma adapter on tiny offline Chroma pipelines (text-to-image, img2img, inpaint; 1 double- and 1 single-stream
block).

Numbers are checked against the unpatched pipeline (its own CFG, unguided runs) or against an independent float64
re-implementation of one guided attention call: the paper's mask table over explicit keys, with the rotary
embedding and Chroma's text mask (the float mask diffusers adds to the logits, or a boolean one).
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
from negguide.adapters.chroma import ChromaAdapter
from negguide.errors import NegativePromptError
from negguide.errors import NegGuideWarning
from negguide.installation import Forward
from negguide.installation import GuidedProcessor
from negguide.installation import Installation
from negguide.installation import guided_processor
from negguide.negatives import NegativeSpec
from negguide.registry import adapter_for
from negguide.registry import family_defaults
from negguide.registry import get_method
from tests.adapters.helpers import close
from tests.adapters.helpers import differs

CALL = {"num_inference_steps": 2, **tiny.CALL_KWARGS["chroma"]}
CFG = {"guidance_scale": 3.0, "negative_prompt": "ugly, dark"}


@pytest.fixture(scope="module")
def pipe():
    return tiny.chroma()


@pytest.fixture(scope="module")
def img2img():
    return tiny.chroma(kind="img2img")


@pytest.fixture(scope="module")
def inpaint():
    return tiny.chroma(kind="inpaint")


@pytest.fixture(scope="module")
def image():
    from PIL import Image

    pixels = (np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8")
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def kinds(pipe, img2img, inpaint, image):
    """Each pipeline kind with the extra call arguments it needs."""
    from PIL import Image

    mask = Image.fromarray((np.arange(32 * 32).reshape(32, 32) % 3 == 0).astype("uint8") * 255)
    return {
        "text2image": (pipe, {}),
        "img2img": (img2img, {"image": image, "strength": 1.0}),
        "inpaint": (inpaint, {"image": image, "mask_image": mask, "strength": 1.0}),
    }


def run(pipe, prompt="a red cube on a table", seed=0, **kwargs):
    gen = (
        [torch.Generator().manual_seed(s) for s in seed]
        if isinstance(seed, list)
        else torch.Generator().manual_seed(seed)
    )
    return pipe(prompt=prompt, generator=gen, **{**CALL, **kwargs}).images


def encode(pipe, text):
    """The pipeline's own encoding of ``text`` at the call's 32 tokens: embeddings and Chroma's mask."""
    with torch.no_grad():
        embeds, _, mask, *_ = pipe.encode_prompt(text, do_classifier_free_guidance=False, max_sequence_length=32)
    return embeds, mask


def _spy(obj, name, record):
    """Wrap ``obj.name`` (an instance attribute shadows the method) and return the list of records."""
    seen = []
    original = getattr(obj, name)

    def spy(*args):
        seen.append(record(*args))
        return original(*args)

    setattr(obj, name, spy)
    return seen


# ---------------------------------------------------------------------------- facts


def test_the_adapter_resolves_for_every_chroma_pipeline(kinds):
    for target, _ in kinds.values():
        assert adapter_for(target) is ChromaAdapter
    assert family_defaults(get_method("nag"), "chroma") == {"scale": 5.0, "tau": 2.5, "alpha": 0.25}


def test_diffusers_passes_a_float_text_and_image_mask(pipe):
    """The fact the guided call reproduces: a float (rows, text + image) mask, 1 on the real tokens and the first
    padding token, which the blocks turn into an additive m_i * m_j (diffusers issues #12116, #13619)."""
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True
    )
    try:
        run(pipe, prompt="a cat", num_inference_steps=1)
    finally:
        hook.remove()
    mask = seen[0]
    real = len(pipe.tokenizer("a cat").input_ids)
    assert mask.dtype == torch.float32 and mask.shape == (1, 32 + 16 * 16)
    assert mask[0, : real + 1].eq(1).all() and not mask[0, real + 1 : 32].any() and mask[0, 32:].eq(1).all()


def test_negatives_are_encoded_without_padding(pipe):
    text = "snow, blurry"
    n = len(pipe.tokenizer(text).input_ids)
    with negguide.apply(pipe, "vsf", negative_prompt=text) as handle:
        run(pipe, num_inference_steps=1)
        encoded = handle.installation.encoded[0]
    assert encoded.num_tokens == n and encoded.mask is None
    # T5 masks its padding: the real tokens equal the pipeline's own padded encoding's first n rows
    padded = encode(pipe, text)[0]
    torch.testing.assert_close(encoded.embeds, padded[:, :n], atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_join_puts_the_negatives_between_the_text_and_the_image(pipe, dtype):
    adapter = ChromaAdapter(pipe)
    text, neg = torch.randn(2, 5, 32), torch.randn(2, 3, 32)
    full = torch.tensor([[1, 1, 1, 0, 0] + [1] * 4, [1, 1, 1, 1, 0] + [1] * 4]).to(dtype)
    neg_mask = torch.tensor([[True, True, True], [True, True, False]])
    joined = adapter.join({"encoder_hidden_states": text, "txt_ids": torch.ones(5, 3), "attention_mask": full},
                          neg, neg_mask)  # fmt: skip
    out = joined.kwargs
    assert torch.equal(out["encoder_hidden_states"], torch.cat([text, neg], dim=1)) and joined.num_pos == 5
    assert out["txt_ids"].shape == (8, 3) and not out["txt_ids"][5:].any()
    assert out["attention_mask"].dtype == dtype
    assert torch.equal(out["attention_mask"], torch.cat([full[:, :5], neg_mask.to(dtype), full[:, 5:]], dim=1))
    if dtype == torch.bool:  # the core hides the prompt's padding
        assert torch.equal(joined.pos_mask, full[:, :5])
    else:  # the float mask rides in the logits: no token is hidden
        assert joined.pos_mask is None


# ---------------------------------------------------------------------------- one attention call


def _rms(x, norm):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def _rope(x, cos, sin):
    x = x.float().double()  # diffusers' apply_rotary_emb rounds its input to float32
    rot = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
    return x * cos[None, :, None] + rot * sin[None, :, None]


def reference_vsf(attn, hidden, text, cos, sin, p, n, alpha, beta, m, keep):
    """Float64 VSF over ``[P, N, I]`` with explicit keys ``[P, N(0), I, N(1)]``, the paper's mask table, Chroma's
    additive text mask ``m_i * m_j`` (``m`` ``(batch, L)`` or None) and hidden keys (``keep`` ``(batch, L)``)."""

    def lin(layer, x):
        return x @ layer.weight.T + layer.bias

    def heads(x):
        return x.unflatten(-1, (-1, attn.head_dim))

    q = _rms(heads(lin(attn.to_q, hidden)), attn.norm_q)
    k = _rms(heads(lin(attn.to_k, hidden)), attn.norm_k)
    v = heads(lin(attn.to_v, hidden))
    if text is not None:
        q = torch.cat([_rms(heads(lin(attn.add_q_proj, text)), attn.norm_added_q), q], dim=1)
        k = torch.cat([_rms(heads(lin(attn.add_k_proj, text)), attn.norm_added_k), k], dim=1)
        v = torch.cat([heads(lin(attn.add_v_proj, text)), v], dim=1)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    length, t = q.shape[1], p + n
    keys = torch.cat([k, k[:, p:t]], dim=1)  # N(1): the rotated negative keys again
    values = torch.cat([v, -alpha * v[:, p:t]], dim=1)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, keys) / math.sqrt(q.shape[-1])
    if m is not None:  # the model's own term, also on N(1): it is N's keys
        m_keys = torch.cat([m, m[:, p:t]], dim=1)
        logits = logits + m[:, None, :, None] * m_keys[:, None, None, :]
    bias = torch.zeros(length, length + n, dtype=torch.float64)
    pos, neg, img, flip = slice(0, p), slice(p, t), slice(t, length), slice(length, length + n)
    bias[img, neg], bias[img, flip] = -math.inf, -beta  # I sees I, P and N(1) with -beta
    bias[pos, neg], bias[pos, flip] = -math.inf, -math.inf  # P sees I, P
    bias[neg, pos], bias[neg, flip] = -math.inf, -math.inf  # N sees I, N(0)
    logits = logits + bias
    hidden_keys = ~torch.cat([keep, keep[:, p:t]], dim=1)
    logits = logits.masked_fill(hidden_keys[:, None, None, :], -math.inf)
    out = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), values).flatten(2, 3)
    if text is None:
        return out
    return attn.to_out[0](out[:, t:]), attn.to_add_out(out[:, :t])


@pytest.mark.parametrize("kind", ["double", "single"])
@pytest.mark.parametrize("path", ["dense", "split"])
@pytest.mark.parametrize("mask", ["float", "bool"])
def test_processor_matches_float64_reference(pipe, kind, path, mask):
    """One guided call equals the mask-table reference: RoPE over [P, N, I] (N(1) carries N's rotation), the
    prompt's padding as the model treats it (float: +m_i m_j on the logits; bool: hidden), a padded negative row."""
    block = (
        pipe.transformer.transformer_blocks[0] if kind == "double" else pipe.transformer.single_transformer_blocks[0]
    )
    attn = copy.deepcopy(block.attn).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in attn.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    batch, p, n, n_img, dim = 2, 6, 3, 7, attn.query_dim
    angles = torch.randn(p + n + n_img, attn.head_dim // 2, generator=gen, dtype=torch.float64)
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    text = torch.randn(batch, p + n, dim, generator=gen, dtype=torch.float64)
    img = torch.randn(batch, n_img, dim, generator=gen, dtype=torch.float64)
    pos = torch.tensor([[True] * 4 + [False] * 2, [True] * 5 + [False]])
    neg_mask = torch.tensor([[True] * n, [True] * (n - 1) + [False]])
    keep = torch.cat([pos, neg_mask, torch.ones(batch, n_img, dtype=torch.bool)], dim=1)  # the joined mask
    if mask == "float":
        m = keep.double()
        model_mask, pos_mask, hidden = m[:, None, None, :] * m[:, None, :, None], None, keep.clone()
        hidden[:, :p] = True  # a float mask hides no prompt token
    else:
        m, model_mask, pos_mask, hidden = None, keep[:, None, None, :] & keep[:, None, :, None], pos, keep

    method_cls = get_method("vsf")
    method = method_cls(method_cls.make_config({"scale": 2.5, "bias": 0.25, "attention": path}))
    installation = Installation(pipe, ChromaAdapter(pipe), method, [NegativeSpec("x")])
    layout = TextLayout(p, p + n)
    installation.forward = Forward(slice(0, batch), layout, ((p, p + n),), (neg_mask,), (1.0,), pos_mask, None)
    proc = guided_processor(installation, attn.processor, 0, 2)
    tol = {"atol": 1e-10 if path == "dense" else 1e-5, "rtol": 0}  # the split path merges in float32
    with torch.no_grad():
        if kind == "double":
            got = proc(attn, img, text, model_mask, (cos, sin))
            want = reference_vsf(attn, img, text, cos, sin, p, n, 2.5, 0.25, m, hidden)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, **tol)
        else:
            seq = torch.cat([text, img], dim=1)
            got = proc(attn, seq, None, model_mask, (cos, sin))
            want = reference_vsf(attn, seq, None, cos, sin, p, n, 2.5, 0.25, m, hidden)
            torch.testing.assert_close(got, want, **tol)


def test_processor_outside_a_guided_forward_is_the_original_bit_for_bit(pipe):
    attn = pipe.transformer.transformer_blocks[0].attn
    installation = Installation(pipe, ChromaAdapter(pipe), get_method("vsf")(), [NegativeSpec("x")])
    proc = guided_processor(installation, attn.processor, 0, 2)
    gen = torch.Generator().manual_seed(0)
    img, text = torch.randn(1, 6, attn.query_dim, generator=gen), torch.randn(1, 4, attn.query_dim, generator=gen)
    m = torch.tensor([[1.0, 1.0, 0.0, 0.0] + [1.0] * 6])
    mask = m[:, None, None, :] * m[:, None, :, None]
    with torch.no_grad():
        for g, w in zip(proc(attn, img, text, mask), attn.processor(attn, img, text, mask)):
            assert torch.equal(g, w)


# ---------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("kind", ["text2image", "img2img", "inpaint"])
def test_vsf_with_infinite_bias_is_unguided_and_vsf_guides(kinds, kind):
    target, extra = kinds[kind]
    base = run(target, **extra)
    with negguide.apply(target, "vsf", negative_prompt="snow, blurry", bias=float("inf")):
        close(run(target, **extra), base)
    with negguide.apply(target, "vsf", negative_prompt="snow, blurry"):
        out = run(target, **extra)
    assert np.isfinite(out).all() and differs(out, base)


def test_a_boolean_prompt_mask_uses_the_cores_masks(pipe):
    """Given a boolean prompt_attention_mask the model hides the padding; the guided call hides the same keys."""
    embeds, mask = encode(pipe, "a red cube")
    call = {"prompt": None, "prompt_embeds": embeds, "prompt_attention_mask": mask.bool()}
    base = run(pipe, **call)
    assert differs(base, run(pipe, **{**call, "prompt_attention_mask": mask}))  # float and bool masks differ
    with negguide.apply(pipe, "vsf", negative_prompt="snow, blurry", bias=float("inf")) as handle:
        hidden = _spy(handle.installation, "run_method", lambda seg, processor: seg.pos_mask)
        close(run(pipe, **call), base)
    assert torch.equal(hidden[0], mask.bool())
    with negguide.apply(pipe, "vsf", negative_prompt="snow, blurry"):
        assert differs(run(pipe, **call), base)


@pytest.mark.parametrize("kind", ["text2image", "img2img"])
def test_vsf_guides_only_the_conditional_call_of_the_pipelines_cfg(kinds, kind):
    """Chroma runs its unconditional branch as a second call per step without cache_context."""
    target, extra = kinds[kind]
    cfg = {**CFG, **extra}
    plain = run(target, **cfg)
    with negguide.apply(target, "vsf", negative_prompt="snow", bias=float("inf")):
        close(run(target, **cfg), plain)
    with negguide.apply(target, "vsf", negative_prompt="snow") as handle:
        calls = _spy(handle.installation, "run_method", lambda seg, processor: processor.index)
        texts = []
        hook = target.transformer.register_forward_pre_hook(
            lambda module, args, kwargs: texts.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True
        )
        try:
            out = run(target, **cfg)
        finally:
            hook.remove()
    assert len(texts) == 4 and texts[1] == texts[3] == 32 < texts[0]  # 2 steps x (conditional, unconditional)
    assert calls == [0, 1, 0, 1]  # 2 steps x 2 blocks of the conditional calls only
    assert np.isfinite(out).all() and differs(out, plain)


@pytest.mark.parametrize("kind", ["text2image", "img2img"])
def test_cfg_equals_the_pipelines_own_cfg(kinds, kind):
    target, extra = kinds[kind]
    want = run(target, negative_prompt="snow, blurry", guidance_scale=3.0, **extra)
    with negguide.apply(target, "cfg", negative_prompt="snow, blurry", scale=3.0):
        got = run(target, **extra)
    assert differs(want, run(target, **extra))
    close(got, want)


def test_cfg_with_negative_prompt_embeds_and_their_mask(pipe):
    embeds, mask = encode(pipe, "snow")
    want = run(pipe, negative_prompt="snow", guidance_scale=2.0)
    with negguide.apply(
        pipe, "cfg", scale=2.0, negative_prompt_embeds={"prompt_embeds": embeds, "prompt_attention_mask": mask}
    ):
        close(run(pipe), want)


def test_both_block_kinds_are_patched_and_layers_select_them(pipe):
    base = run(pipe)
    with negguide.apply(pipe, "vsf", negative_prompt="snow") as handle:
        guided = {k: v.index for k, v in pipe.transformer.attn_processors.items() if isinstance(v, GuidedProcessor)}
        assert guided == {"transformer_blocks.0.attn.processor": 0, "single_transformer_blocks.0.attn.processor": 1}
        assert handle.adapter.num_layers(pipe.transformer) == 2
    outs = {}
    for name, layers in {"double": [0], "single": [-1]}.items():
        with negguide.apply(pipe, "vsf", negative_prompt="snow", layers=layers):
            outs[name] = run(pipe)
    assert differs(outs["double"], base) and differs(outs["single"], base)
    assert differs(outs["double"], outs["single"])


def test_negative_prompt_embeds_equal_the_text_path(pipe):
    text = "snow, blurry"
    n = len(pipe.tokenizer(text).input_ids)
    embeds, mask = encode(pipe, text)
    with negguide.apply(pipe, "vsf", negative_prompt=text):
        from_text = run(pipe)
    with negguide.apply(pipe, "vsf", negative_prompt_embeds=embeds[:, :n]):
        close(run(pipe), from_text)
    # the padded encoding with its mask: the first padding token stays (Chroma keeps it), the rest is hidden
    with negguide.apply(pipe, "vsf", negative_prompt_embeds=embeds[:, : n + 1]):
        kept = run(pipe)
    with negguide.apply(pipe, "vsf", negative_prompt_embeds={"prompt_embeds": embeds, "prompt_attention_mask": mask}):
        close(run(pipe), kept)
    wrong = {"prompt_embeds": embeds, "prompt_attention_mask": mask[:, :4]}
    with (
        pytest.raises(NegativePromptError, match="prompt_attention_mask"),
        negguide.apply(pipe, "vsf", negative_prompt_embeds=wrong),
    ):
        run(pipe)


@pytest.mark.parametrize("method", ["vsf", "nag", "nasa"])
def test_bfloat16_keeps_its_dtype(method):
    """The mask channels are made in the model's dtype (the kit's dtype check also runs CFG, which needs the core)."""
    pipe = tiny.chroma().to(torch.bfloat16)
    dtypes = []
    hook = pipe.transformer.register_forward_hook(lambda module, args, output: dtypes.append(output[0].dtype))
    try:
        with negguide.apply(pipe, method, negative_prompt="snow, blurry"):
            out = run(pipe)
    finally:
        hook.remove()
    assert np.isfinite(out).all() and set(dtypes) == {torch.bfloat16}


def test_empty_negative_is_unguided(pipe):
    base = run(pipe)
    with negguide.apply(pipe, "vsf", negative_prompt=""), pytest.warns(NegGuideWarning, match="no token"):
        assert np.array_equal(run(pipe), base)


# ---------------------------------------------------------------------------- the conformance kit

CASE = testing.Case(build=tiny.chroma, call=tiny.CALL_KWARGS["chroma"], pipeline_cfg=CFG)


@pytest.mark.parametrize("check", sorted(testing.CHECKS))
def test_conformance(check):
    """The adapter passes every check of negguide.testing on the tiny pipeline."""
    testing.CHECKS[check](CASE)
