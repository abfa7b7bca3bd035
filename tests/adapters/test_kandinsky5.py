"""Kandinsky 5 adapter on tiny offline pipelines: T2V (conformance kit), I2V, T2I; the text blocks' isolation."""

from __future__ import annotations

import copy
import math
import sys

import numpy as np
import pytest
import torch

import negguide
from negguide import testing
from negguide import tiny
from negguide.adapter import EncodeCall
from negguide.adapter import TextLayout
from negguide.adapters.kandinsky5 import Kandinsky5Adapter
from negguide.errors import NegativePromptError
from negguide.installation import Forward
from negguide.installation import GuidedProcessor
from negguide.installation import Installation
from negguide.installation import guided_processor
from negguide.negatives import NegativeSpec
from negguide.registry import adapter_for
from negguide.registry import get_method
from negguide.tiny.families import kandinsky5 as tiny_k5
from tests.memcap import run_capped

CALL = {"num_inference_steps": 2, **tiny.CALL_KWARGS["kandinsky5"]}
PROMPT = "a red cat on a mat"
NEG = "a dark and blurry photo of heavy rain"
SAME_LENGTH_NEG = "a dark rainy photo"  # as many tokens as PROMPT (the byte-level tiny tokenizer: one per character)


@pytest.fixture(scope="module")
def pipe():
    return tiny.kandinsky5()


def run(pipe, prompt=PROMPT, seed=0, **kw):
    gen = (
        [torch.Generator().manual_seed(s) for s in seed]
        if isinstance(seed, list)
        else torch.Generator().manual_seed(seed)
    )
    out = pipe(prompt=prompt, generator=gen, **{**CALL, **kw}).frames
    return out.float().numpy().astype(np.float64)


def close(got, want, atol=2e-5):
    assert got.shape == want.shape
    assert float(np.abs(got - want).max()) <= atol, float(np.abs(got - want).max())


def real_tokens(pipe, text):
    """The tokens the pipeline keeps of ``text``: the templated prompt's, less the template's system part."""
    ids = pipe.tokenizer.tokenizer(pipe.prompt_template.format(text)).input_ids
    return len(ids) - pipe.prompt_template_encode_start_idx


# ---------------------------------------------------------------------------- facts


def test_adapter_resolves_for_every_pipeline():
    for kind, arg in [("text2video", "num_videos_per_prompt"), ("image2video", "num_videos_per_prompt"),
                      ("text2image", "num_images_per_prompt"), ("image2image", "num_images_per_prompt")]:  # fmt: skip
        p = tiny_k5.build(kind=kind)
        adapter = adapter_for(p)(p)
        assert isinstance(adapter, Kandinsky5Adapter) and adapter.layout == "cross"
        assert adapter.num_per_prompt_arg == arg
        assert adapter.patched_methods == ("text_transformer_blocks.0.forward", "text_transformer_blocks.1.forward")
        assert adapter.attention_modules(p.transformer) == {
            f"visual_transformer_blocks.{i}.cross_attention.processor": i for i in range(2)
        }


def test_guided_processor_replaces_the_cross_attention_only(pipe):
    with negguide.apply(pipe, "vsf", negative_prompt=NEG):
        procs = pipe.transformer.attn_processors
        guided = sorted(k for k, v in procs.items() if isinstance(v, GuidedProcessor))
        assert guided == [f"visual_transformer_blocks.{i}.cross_attention.processor" for i in range(2)]


def test_negative_encoded_without_padding(pipe):
    adapter = Kandinsky5Adapter(pipe)
    out = pipe.encode_prompt([PROMPT, NEG], max_sequence_length=64)
    call = types_call(pipe, out)
    for text in ("snow", NEG):
        cond = adapter.encode_negative(text, call, padded=False)
        assert cond.embeds.shape[:2] == (1, real_tokens(pipe, text)) and cond.mask is None
        assert cond.extras["pooled"].shape == (1, 32)
        # the same numbers as the pipeline's own encoding of the negative alone
        own = pipe.encode_prompt([text], max_sequence_length=64)
        torch.testing.assert_close(cond.embeds, own[0], rtol=0, atol=0)
        torch.testing.assert_close(cond.extras["pooled"], own[1], rtol=0, atol=0)


def types_call(pipe, out):
    return EncodeCall({"max_sequence_length": 64}, out, out[0].shape[0], 1, out[0].device, out[0].dtype,
                      pipe.encode_prompt)  # fmt: skip


# ---------------------------------------------------------------------------- one guided cross-attention call


def reference_vsf(attn, img, ctx, p, alpha, beta, mask):
    """Float64 closed form of one VSF cross-attention call: ``Z = W Z+ - alpha (1 - W) Z-`` per head, then
    ``out_layer``; per-head RMS norms written out; padding of the negative is no key."""
    heads, dim = attn.num_heads, attn.to_query.out_features // attn.num_heads

    def rms(x, norm):
        eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm.weight

    def split(x):
        return x.unflatten(-1, (heads, dim)).transpose(1, 2)  # (B, H, L, D)

    q = rms(split(attn.to_query(img)), attn.query_norm)
    k = rms(split(attn.to_key(ctx)), attn.key_norm)
    v = split(attn.to_value(ctx))
    outs = []
    for b in range(img.shape[0]):
        keep = torch.ones(ctx.shape[1] - p, dtype=torch.bool) if mask is None else mask[b]
        kp, vp = k[b, :, :p], v[b, :, :p]
        kn, vn = k[b, :, p:][:, keep], v[b, :, p:][:, keep]
        sp = q[b] @ kp.transpose(-1, -2) / math.sqrt(dim)
        sn = q[b] @ kn.transpose(-1, -2) / math.sqrt(dim)
        a_pos = sp.exp().sum(-1, keepdim=True)
        a_neg = math.exp(-beta) * sn.exp().sum(-1, keepdim=True)
        w = a_pos / (a_pos + a_neg)
        z_pos = torch.softmax(sp, -1) @ vp
        z_neg = torch.softmax(sn, -1) @ vn
        outs.append(w * z_pos - alpha * (1 - w) * z_neg)
    z = torch.stack(outs).transpose(1, 2).flatten(2)
    return attn.out_layer(z)


@pytest.mark.parametrize("path", ["dense", "split"])
@pytest.mark.parametrize("padded", [False, True])
def test_processor_matches_float64_reference(pipe, path, padded):
    attn = copy.deepcopy(pipe.transformer.visual_transformer_blocks[0].cross_attention).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in attn.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    batch, p, n, n_img, width = 2, 5, 4, 9, attn.to_query.in_features
    img = torch.randn(batch, n_img, width, generator=gen, dtype=torch.float64)
    ctx = torch.randn(batch, p + n, width, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[True] * n, [True] * (n - 2) + [False] * 2]) if padded else None
    method_cls = get_method("vsf")
    method = method_cls(method_cls.make_config({"scale": 2.5, "bias": 0.25, "attention": path}))
    installation = Installation(pipe, Kandinsky5Adapter(pipe), method, [NegativeSpec("x")])
    installation.forward = Forward(slice(0, batch), TextLayout(p, p + n), ((p, p + n),), (mask,), (1.0,), None, None)
    proc = guided_processor(installation, attn.processor, 0, 2)
    with torch.no_grad():
        got = proc(attn, img, encoder_hidden_states=ctx)
        want = reference_vsf(attn, img, ctx, p, 2.5, 0.25, mask)
    # the model computes its q/k RMS norms in float32 (``query_norm(query.float())``), the adapter too; the split
    # path also merges in float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_processor_outside_a_guided_forward_is_the_original(pipe):
    attn = pipe.transformer.visual_transformer_blocks[0].cross_attention
    installation = Installation(pipe, Kandinsky5Adapter(pipe), get_method("vsf")(), [NegativeSpec("x")])
    proc = guided_processor(installation, attn.processor, 0, 2)
    gen = torch.Generator().manual_seed(0)
    img, ctx = torch.randn(1, 6, 32, generator=gen), torch.randn(1, 4, 32, generator=gen)
    with torch.no_grad():
        assert torch.equal(proc(attn, img, encoder_hidden_states=ctx), attn.processor(attn, img, ctx))


# ---------------------------------------------------------------------------- the text blocks


class ContextSpy:
    """Records the text stream every visual block's cross-attention receives."""

    def __init__(self, transformer):
        self.seen = []
        self.handles = [
            block.cross_attention.register_forward_pre_hook(self.hook, with_kwargs=True)
            for block in transformer.visual_transformer_blocks
        ]

    def hook(self, module, args, kwargs):
        self.seen.append(kwargs["encoder_hidden_states"].clone())

    def remove(self):
        for h in self.handles:
            h.remove()


def refined(pipe, prompt, seed=0, **apply):
    """The text stream each visual block's cross-attention receives in one step (guided when ``apply`` is given)."""
    spy = ContextSpy(pipe.transformer)
    try:
        if apply:
            with negguide.apply(pipe, "vsf", **apply):
                run(pipe, prompt=prompt, seed=seed, num_inference_steps=1)
        else:
            run(pipe, prompt=prompt, seed=seed, num_inference_steps=1)
    finally:
        spy.remove()
    return spy.seen


def test_text_blocks_refine_the_prompt_and_each_negative_alone(pipe):
    """Under guidance the cross-attention sees ``[P ; N_1 ; ...]``: ``P`` exactly the unpatched model's refined
    prompt, each ``N_i`` what the model makes of that negative run as a prompt of its own (its own positions 0..n-1
    and its own pooled CLIP vector in the time embedding): two negatives after one prompt, and two rows with
    negatives of different lengths (the shorter padded, refined on its real tokens only)."""
    alone = {text: refined(pipe, text)[0][0] for text in ("snow", NEG)}
    n_snow, n_neg = real_tokens(pipe, "snow"), real_tokens(pipe, NEG)
    plain = refined(pipe, PROMPT)
    guided = refined(pipe, PROMPT, negatives={NEG: 1.0, "snow": 0.5})
    p = plain[0].shape[1]
    assert guided[0].shape[1] == p + n_neg + n_snow
    for block in range(2):
        torch.testing.assert_close(guided[block][:, :p], plain[block], rtol=0, atol=1e-6)
    by_span = {NEG: guided[0][0, p : p + n_neg], "snow": guided[0][0, p + n_neg :]}
    if not torch.allclose(by_span[NEG], alone[NEG], rtol=0, atol=1e-5):  # the core may order negatives otherwise
        by_span = {"snow": guided[0][0, p : p + n_snow], NEG: guided[0][0, p + n_snow :]}
    for text in ("snow", NEG):
        torch.testing.assert_close(by_span[text], alone[text], rtol=0, atol=1e-5)

    prompts, negs = ["a red cat on a mat", "a green tree"], ["snow", NEG]
    plain = refined(pipe, prompts, seed=[0, 1])
    guided = refined(pipe, prompts, seed=[0, 1], negative_prompt=negs)
    p = plain[0].shape[1]
    assert guided[0].shape[1] == p + n_neg
    torch.testing.assert_close(guided[0][:, :p], plain[0], rtol=0, atol=1e-6)
    for row, text in enumerate(negs):
        torch.testing.assert_close(guided[0][row, p : p + real_tokens(pipe, text)], alone[text], rtol=0, atol=1e-5)


def test_join_extends_text_positions_per_negative(pipe):
    adapter = Kandinsky5Adapter(pipe)
    from negguide.adapter import Conditioning

    kwargs = {
        "encoder_hidden_states": torch.randn(1, 5, 16),
        "text_rope_pos": torch.arange(5),
        "timestep": torch.tensor([500.0]),
        "pooled_projections": torch.randn(1, 32),
    }
    negs = [
        Conditioning(torch.randn(1, 3, 16), extras={"pooled": torch.randn(1, 32)}),
        Conditioning(torch.randn(1, 2, 16)),
    ]
    joined = adapter.join_negatives(kwargs, negs)
    assert joined.kwargs["text_rope_pos"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1]
    assert joined.kwargs["encoder_hidden_states"].shape == (1, 10, 16) and joined.num_pos == 5
    own, none = joined.carry
    with torch.no_grad():
        want = pipe.transformer.time_embeddings(kwargs["timestep"]) + pipe.transformer.pooled_text_embeddings(
            negs[0].extras["pooled"]
        )
    torch.testing.assert_close(own, want, rtol=0, atol=0)
    assert none is None  # no pooled vector given: the negative is refined under the prompt's time embedding


def test_negative_prompt_embeds_equal_the_text(pipe):
    qwen, clip, _ = pipe.encode_prompt([NEG], max_sequence_length=64)
    with negguide.apply(pipe, "vsf", negative_prompt=NEG):
        want = run(pipe)
    with negguide.apply(pipe, "vsf", negative_prompt_embeds={"prompt_embeds_qwen": qwen, "prompt_embeds_clip": clip}):
        close(run(pipe), want)
    with pytest.raises(NegativePromptError, match="prompt_embeds_qwen"):
        with negguide.apply(pipe, "vsf", negative_prompt_embeds=torch.zeros(1, 3, 7)):
            run(pipe)


def test_several_videos_per_prompt(pipe):
    """Kandinsky5T2VPipeline does not repeat the prompt per video (its text has one row per prompt, broadcast):
    the guided forward repeats it per video, and each video equals the call with one video."""
    base = run(pipe, num_videos_per_prompt=2)
    with negguide.apply(pipe, "vsf", negative_prompt="snow", bias=math.inf):
        close(run(pipe, num_videos_per_prompt=2), base)
    with negguide.apply(pipe, "vsf", negative_prompt="snow"):
        two = run(pipe, num_videos_per_prompt=2)
        one = run(pipe)
    close(two[:1], one)
    assert float(np.abs(two - base).max()) > 1e-2


# ---------------------------------------------------------------------------- CFG


def test_cfg_equals_the_pipelines_own_for_a_negative_of_the_prompts_length(pipe):
    assert real_tokens(pipe, SAME_LENGTH_NEG) == real_tokens(pipe, PROMPT)
    own = run(pipe, guidance_scale=3.0, negative_prompt=SAME_LENGTH_NEG)
    with negguide.apply(pipe, "cfg", negative_prompt=SAME_LENGTH_NEG, scale=3.0):
        close(run(pipe), own, atol=1e-5)


def test_cfg_refuses_a_negative_longer_than_the_prompt(pipe):
    with pytest.raises(NegativePromptError, match="no text mask"):
        with negguide.apply(pipe, "cfg", negative_prompt=NEG):
            run(pipe)


# ---------------------------------------------------------------------------- other pipelines


@pytest.mark.parametrize("kind", ["image2video", "text2image", "image2image"])
def test_other_pipelines(kind):
    """The pipelines sharing the transformer: VSF bias=inf is unguided, VSF guides, CFG is the pipeline's own (a
    negative of the prompt's length), VSF bias=inf beside the pipeline's own CFG is that CFG. Image-to-image puts
    the input image into the Qwen prompt (vision tokens): each negative is encoded with it, as the pipeline does."""
    from PIL import Image

    p = tiny_k5.build(kind=kind)
    kw = {"num_inference_steps": 2, "max_sequence_length": 64, "output_type": "latent", "height": 32, "width": 32}
    if kind == "image2image":
        kw["image"] = Image.new("RGB", (32, 32), (200, 40, 90))
    if kind == "image2video":
        # 6 latent frames: the pipeline renormalises the first 4 against the following ones
        kw.update(num_frames=21, image=Image.new("RGB", (32, 32), (200, 40, 90)))

    def go(**extra):
        out = p(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **{**kw, "guidance_scale": 1.0, **extra})
        return (out.frames if kind == "image2video" else out.image).float().numpy().astype(np.float64)

    if kind == "image2image":  # the negative carries the input image's vision tokens, like the prompt
        adapter = Kandinsky5Adapter(p)
        out = p.encode_prompt([PROMPT], image=kw["image"], max_sequence_length=64)
        call = EncodeCall({"image": kw["image"], "max_sequence_length": 64}, out, 1, 1, out[0].device, out[0].dtype,
                          p.encode_prompt)  # fmt: skip
        own = p.encode_prompt(["snow"], image=kw["image"], max_sequence_length=64)[0]
        assert torch.equal(adapter.encode_negative("snow", call, padded=False).embeds, own)
        assert own.shape[1] == real_tokens(p, "snow") + 3  # the template's one image pad becomes 4 vision tokens

    base = go()
    with negguide.apply(p, "vsf", negative_prompt=NEG, bias=math.inf):
        close(go(), base)
    with negguide.apply(p, "vsf", negative_prompt=NEG):
        assert float(np.abs(go() - base).max()) > 1e-4
    own = go(guidance_scale=3.0, negative_prompt=SAME_LENGTH_NEG)
    with negguide.apply(p, "cfg", negative_prompt=SAME_LENGTH_NEG, scale=3.0):
        # negguide's branches run in one batched forward, the pipeline's as two: float32 rounding differs (seen
        # up to 4e-5 on latents of magnitude ~3 under xdist), far below CFG's own effect
        close(go(), own, atol=1e-4)
    with negguide.apply(p, "vsf", negative_prompt=NEG, bias=math.inf):  # beside the pipeline's own CFG
        close(go(guidance_scale=3.0, negative_prompt="ugly"), go(guidance_scale=3.0, negative_prompt="ugly"))


# ---------------------------------------------------------------------------- memory at video length

BUDGET = 2 * 1024**3
N_VIDEO, N_POS, N_NEG, WIDTH = 32_768, 64, 8, 32

MEMORY_SCRIPT = r"""
import json, math, resource, sys
import torch
from diffusers.models.transformers.transformer_kandinsky import Kandinsky5Attention, Kandinsky5AttnProcessor
from negguide.adapter import EncodeCall
from negguide.adapter import TextLayout
from negguide.adapters.kandinsky5 import Kandinsky5Adapter
from negguide.installation import Forward, Installation, guided_processor
from negguide.negatives import NegativeSpec
from negguide.plugins.vsf import ValueSignFlip, VSFConfig

n_video, n_pos, n_neg, width, budget = (int(a) for a in sys.argv[1:])
alpha, beta = 3.5, 0.1
torch.set_num_threads(1)
torch.manual_seed(0)
attn = Kandinsky5Attention(width, width).eval()  # one head of `width`, the model's own module
gen = torch.Generator().manual_seed(0)
hidden = torch.randn(1, n_video, width, generator=gen)
context = torch.randn(1, n_pos + n_neg, width, generator=gen)
adapter = Kandinsky5Adapter.__new__(Kandinsky5Adapter)


def processor(path):
    method = ValueSignFlip(VSFConfig(scale=alpha, bias=beta, attention=path))
    inst = Installation(None, adapter, method, [NegativeSpec("x")])
    inst.forward = Forward(slice(0, 1), TextLayout(n_pos, n_pos + n_neg), ((n_pos, n_pos + n_neg),), (None,), (1.0,),
                           None, None)
    return guided_processor(inst, Kandinsky5AttnProcessor(), 0, 1)


procs = {path: processor(path) for path in ("split", "dense")}
with torch.no_grad():
    for proc in procs.values():  # thread pools and allocator arenas exist before the cap
        proc(attn, hidden[:, :64], encoder_hidden_states=context)


cap_address_space(budget)
rows = torch.tensor([0, 1, n_video // 2, n_video - 1])
with torch.no_grad():
    # float64 closed form for a few video queries: Z = W Z+ - alpha (1 - W) Z-, then out_layer
    a = copy = None
    import copy as _copy
    a = _copy.deepcopy(attn).double()
    eps = torch.finfo(torch.float64).eps
    rms = lambda x, n: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * n.weight
    q = rms(a.to_query(hidden[0, rows].double()), a.query_norm)
    k, v = rms(a.to_key(context[0].double()), a.key_norm), a.to_value(context[0].double())
    s = q @ k.T / math.sqrt(width)
    a_pos, a_neg = s[:, :n_pos].exp().sum(-1, keepdim=True), math.exp(-beta) * s[:, n_pos:].exp().sum(-1, keepdim=True)
    w = a_pos / (a_pos + a_neg)
    z = w * torch.softmax(s[:, :n_pos], -1) @ v[:n_pos] - alpha * (1 - w) * torch.softmax(s[:, n_pos:], -1) @ v[n_pos:]
    ref = a.out_layer(z)
    del a
    result = {}
    for path, proc in procs.items():
        rss0 = peak_rss()
        out = proc(attn, hidden, encoder_hidden_states=context)
        result[path] = {
            "rss_growth": peak_rss() - rss0,
            "shape": list(out.shape),
            "max_err": (out[0, rows].double() - ref).abs().max().item(),
        }
        del out
try:  # the cap is real: an L x L float32 matrix does not fit under it
    torch.empty(n_video, n_video).fill_(0.0)
    result["square"] = "allocated"
except (RuntimeError, MemoryError):
    result["square"] = "refused"
print(json.dumps(result))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs RLIMIT_AS and /proc (Linux)")
def test_guided_call_at_video_length_is_linear_in_memory():
    """One guided cross-attention call at 32k video tokens through the adapter's processor (``project``, the method,
    ``finish``) under a cap of 2 GiB above the baseline, where an L x L float32 matrix (4 GiB) cannot be allocated:
    in the cross layout neither path builds one (the dense mask is L x context), so both run, grow memory by O(L),
    and sampled rows match a float64 reference."""
    args = [str(a) for a in (N_VIDEO, N_POS, N_NEG, WIDTH, BUDGET)]
    result = run_capped(MEMORY_SCRIPT, *args)
    assert N_VIDEO * N_VIDEO * 4 >= 2 * BUDGET and result["square"] == "refused"
    for path in ("split", "dense"):
        assert result[path]["shape"] == [1, N_VIDEO, WIDTH]
        assert result[path]["rss_growth"] < 256 * 1024**2, result
        assert result[path]["max_err"] < 1e-4, result


# ---------------------------------------------------------------------------- the conformance kit

CASE = testing.Case(
    build=tiny.kandinsky5,
    call=tiny.CALL_KWARGS["kandinsky5"],
    # Kandinsky 5 attends its prompt's batch padding (no text mask): a prompt padded in a batch is not the prompt
    # alone, in the pipeline itself. Two prompts of one token length, long enough for CFG's negatives.
    prompts=("a red cat sitting on a small woven mat", "a tall green tree beside a calm river!"),
    output="frames",
    pipeline_cfg={"guidance_scale": 3.0, "negative_prompt": "ugly"},
    # Kandinsky5AttnProcessor rounds q and k to bfloat16 after its rotary embedding (``apply_rotary``), so float32
    # rounding differences of a batched or masked path (1e-7) can flip a bfloat16 rounding in the self-attention
    # and reach 1e-4 at the output; without that cast the batch check agrees to 2e-6. Leaks move outputs by O(1).
    atol=2e-4,
    # a plain .to(bfloat16) breaks Kandinsky 5 itself (its time embedding feeds a float32 sinusoid to a bfloat16
    # layer): the bfloat16 check loads it as from_pretrained(..., torch_dtype=bfloat16) does
    keep_fp32=True,
)


@pytest.mark.parametrize("check", sorted(testing.CHECKS))
def test_conformance(check):
    """The adapter passes every check of negguide.testing on the tiny pipeline."""
    testing.CHECKS[check](CASE)
