"""The HunyuanVideo adapter on tiny offline HunyuanVideo pipelines (1 double- and 1 single-stream block; text-to-video,
image-to-video with latent-concat and token-replace transformers, SkyReels-V1 image-to-video).

Numbers are checked against the unpatched pipeline (unguided runs, its own true CFG), the model's own token refiner
run on each negative alone, and an independent float64 re-implementation of one guided attention call with the
paper's mask table (the image tokens rotated, the text not), also at 32k tokens under a memory cap.
"""

from __future__ import annotations

import copy
import math
import sys

import numpy as np
import pytest
import torch

import negguide
from negguide import testing
from negguide.adapter import TextLayout
from negguide.adapters.hunyuanvideo import HunyuanVideoAdapter
from negguide.errors import NegativePromptError
from negguide.errors import NoAdapterError
from negguide.installation import Forward
from negguide.installation import Installation
from negguide.installation import guided_processor
from negguide.negatives import NegativeSpec
from negguide.registry import adapter_for
from negguide.registry import get_method
from negguide.tiny.families import hunyuanvideo as tiny_hv
from tests.adapters.helpers import differs
from tests.memcap import run_capped

CALL = {"num_inference_steps": 2, **tiny_hv.CALL}
NEG = "snow, a dark and blurry photo"


@pytest.fixture(scope="module")
def pipe():
    return tiny_hv.build()


@pytest.fixture(scope="module")
def image():
    from PIL import Image

    return Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8"))


def run(pipe, prompt="a red cat on a mat", seed=0, **kwargs):
    gen = (
        [torch.Generator().manual_seed(s) for s in seed]
        if isinstance(seed, list)
        else torch.Generator().manual_seed(seed)
    )
    with torch.no_grad():
        return np.asarray(pipe(prompt=prompt, generator=gen, **{**CALL, **kwargs}).frames, dtype=np.float64)


def close(a, b, atol=2e-5):
    np.testing.assert_allclose(a, b, atol=atol, rtol=0)


def real_tokens(pipe, text, template=tiny_hv.T2V_TEMPLATE, max_sequence_length=32):
    """The prompt's tokens the pipeline keeps: its template tokenized without padding, less ``crop_start``, at most
    ``max_sequence_length``."""
    return min(len(pipe.tokenizer(template["template"].format(text)).input_ids) - template["crop_start"],
               max_sequence_length)  # fmt: skip


# ---------------------------------------------------------------------------- facts


@pytest.mark.parametrize("kind", ["text2video", "image2video", "image2video_token_replace", "skyreels"])
def test_adapter_resolves_for_every_pipeline(kind):
    assert adapter_for(tiny_hv.build(kind=kind)) is HunyuanVideoAdapter


def test_framepack_is_refused():
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    class Framepack:  # just what apply needs to reach the adapter
        transformer = HunyuanVideoFramepackTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
            num_single_layers=1, num_refiner_layers=1, text_embed_dim=16, pooled_projection_dim=32,
            rope_axes_dim=(2, 2, 4), image_proj_dim=16,
        )  # fmt: skip

        def encode_prompt(self, prompt):
            raise AssertionError("never reached")

    with pytest.raises(NoAdapterError, match="Framepack"):
        negguide.apply(Framepack(), "vsf", negative_prompt="snow")


def test_the_pipeline_drops_the_templates_first_tokens(pipe):
    """The tiny template counts are right: the kept tokens are the prompt's bytes and its end-of-turn token."""
    embeds, _, mask = pipe.encode_prompt("a cat", prompt_template=tiny_hv.T2V_TEMPLATE, max_sequence_length=32)
    assert int(mask.sum()) == real_tokens(pipe, "a cat") == len("a cat") + 1
    assert embeds.shape[1] == 32


def test_negatives_are_encoded_without_padding(pipe):
    """Each negative is the pipeline's own encoding of it, cut to its real tokens (Llama is causal: no padding)."""
    short, long = "snow", "a dark and blurry photo of heavy rain"
    with negguide.apply(pipe, "vsf", negative_prompt=[short, long]) as handle:
        pipe.encode_prompt(["a red cube", "a tree"], prompt_template=tiny_hv.T2V_TEMPLATE, max_sequence_length=32)
        encoded = handle.installation.encoded[0]
    lengths = [real_tokens(pipe, short), real_tokens(pipe, long)]
    assert encoded.mask.sum(1).tolist() == lengths and encoded.num_tokens == max(lengths)
    for row, text in enumerate([short, long]):
        alone, _, mask = pipe.encode_prompt(text, prompt_template=tiny_hv.T2V_TEMPLATE, max_sequence_length=32)
        assert int(mask.sum()) == lengths[row]
        torch.testing.assert_close(encoded.embeds[row, : lengths[row]], alone[0, : lengths[row]], atol=0, rtol=0)


def test_image_to_video_negatives_drop_the_image_tokens(image):
    """I2V: the text stream starts with the image's LLaVA tokens; a negative keeps only its prompt tokens (encoded
    with the call's image)."""
    i2v = tiny_hv.build(kind="image2video")
    args = {"prompt_template": tiny_hv.I2V_TEMPLATE, "max_sequence_length": 32}
    with negguide.apply(i2v, "vsf", negative_prompt="snow") as handle:
        i2v.encode_prompt(image=image, prompt="a red cube", **args)
        encoded = handle.installation.encoded[0]
    embeds, _, mask = i2v.encode_prompt(image=image, prompt="snow", **args)
    image_tokens = -(-tiny_hv.IMAGE_TOKENS // 2)  # every second image token (image_embed_interleave 2)
    assert encoded.num_tokens == int(mask.sum()) - image_tokens == len("snow") + 2  # the assistant header's "\n\n"
    torch.testing.assert_close(encoded.embeds, embeds[:, image_tokens : int(mask.sum())], atol=0, rtol=0)


def test_the_token_refiner_sees_the_prompt_as_before_and_each_negative_alone(pipe):
    """The refiner mixes text tokens: the prompt is refined exactly as unpatched, each negative alone (its own mean
    and self-attention), so nothing of a negative reaches the prompt's tokens before the attention."""
    calls = []
    hook = pipe.transformer.context_embedder.register_forward_hook(
        lambda m, args, out: calls.append((args[0].clone(), args[1], args[2], out.detach().clone()))
    )
    try:
        run(pipe, num_inference_steps=1)
        with negguide.apply(pipe, "vsf", negative_prompt=["snow", "heavy rain"]):
            run(pipe, prompt=["a red cat on a mat", "a tree"], seed=[0, 0], num_inference_steps=1)
    finally:
        hook.remove()
    (_, _, _, plain_out), (pos_in, _, _, pos_out), (neg_in, timestep, neg_mask, neg_out) = calls
    assert pos_in.shape == (2, 32, 16) and neg_in.shape == (2, real_tokens(pipe, "heavy rain"), 16)
    torch.testing.assert_close(pos_out[:1], plain_out, atol=1e-6, rtol=0)  # the prompt row as unpatched
    for row, text in enumerate(["snow", "heavy rain"]):
        n = real_tokens(pipe, text)
        assert neg_mask[row].sum() == n
        with torch.no_grad():
            alone = pipe.transformer.context_embedder(neg_in[row : row + 1, :n], timestep[row : row + 1], None)
        torch.testing.assert_close(neg_out[row : row + 1, :n], alone, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- one attention call


def _rms(x, norm):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def _rotate(x, angles):
    """Rotate ``x`` (B, L, H, D): each channel pair (x[2i], x[2i+1]) as a complex number times exp(i * angles[:, i])."""
    z = torch.complex(x[..., 0::2], x[..., 1::2]) * torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    return torch.stack([z.real, z.imag], dim=-1).flatten(-2)


def reference_vsf(attn, img, text, angles, p, sizes, alpha, beta, pos_mask, neg_masks):
    """Float64 VSF over queries ``[I, P, N_1..]`` and explicit keys ``[I, P, N_1(0).., N_1(1)..]`` with the paper's mask
    table; the image is rotated by ``angles``, the text is not; a dual-stream module projects the text with its
    ``add_*`` layers, a single-stream one with its own."""

    def lin(layer, x):
        return x @ layer.weight.T + layer.bias

    def heads(x):
        return x.unflatten(-1, (attn.heads, -1))

    double = attn.add_q_proj is not None
    tq_, tk_, tv_ = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj) if double else (attn.to_q, attn.to_k, attn.to_v)
    nq, nk = (attn.norm_added_q, attn.norm_added_k) if double else (attn.norm_q, attn.norm_k)
    q = torch.cat([_rotate(_rms(heads(lin(attn.to_q, img)), attn.norm_q), angles), _rms(heads(lin(tq_, text)), nq)], 1)
    k = torch.cat([_rotate(_rms(heads(lin(attn.to_k, img)), attn.norm_k), angles), _rms(heads(lin(tk_, text)), nk)], 1)
    v = torch.cat([heads(lin(attn.to_v, img)), heads(lin(tv_, text))], dim=1)
    i, length = img.shape[1], q.shape[1]
    starts = [i + p + sum(sizes[:j]) for j in range(len(sizes))]
    negs = [slice(a, a + n) for a, n in zip(starts, sizes)]
    keys = torch.cat([k, *(k[:, s] for s in negs)], dim=1)  # each N_j(1): N_j's keys again
    values = torch.cat([v, *(-alpha * v[:, s] for s in negs)], dim=1)
    flips = [slice(length + a - i - p, length + a - i - p + n) for a, n in zip(starts, sizes)]
    bias = torch.zeros(length, keys.shape[1], dtype=torch.float64)
    image, pos = slice(0, i), slice(i, i + p)
    for s, f in zip(negs, flips):
        bias[image, s], bias[image, f] = -math.inf, -beta  # I sees I, P and each N_j(1) with -beta
        bias[pos, s], bias[pos, f] = -math.inf, -math.inf  # P sees I, P
        bias[s, pos] = -math.inf  # N_j sees I and itself only
        for s2, f2 in zip(negs, flips):
            bias[s, f2] = -math.inf
            if s2 != s:
                bias[s, s2] = -math.inf
    pad = torch.zeros(q.shape[0], keys.shape[1], dtype=torch.bool)
    pad[:, pos] = ~pos_mask
    for s, f, m in zip(negs, flips, neg_masks):
        pad[:, s], pad[:, f] = ~m, ~m
    logits = torch.einsum("bqhd,bkhd->bhqk", q, keys) / math.sqrt(q.shape[-1]) + bias
    out = torch.einsum("bhqk,bkhd->bqhd", logits.masked_fill(pad[:, None, None], -math.inf).softmax(-1), values)
    out = out.flatten(2, 3)
    if not double:
        return out[:, :i], out[:, i:]
    return attn.to_out[0](out[:, :i]), attn.to_add_out(out[:, i:])


def guided_call(pipe, adapter, attn, path, img, text, cos_sin, p, sizes, pos_mask, neg_masks, alpha, beta):
    method_cls = get_method("vsf")
    method = method_cls(method_cls.make_config({"scale": alpha, "bias": beta, "attention": path}))
    installation = Installation(pipe, adapter, method, [NegativeSpec("x")])
    starts = [p + sum(sizes[:j]) for j in range(len(sizes))]
    spans = tuple((a, a + n) for a, n in zip(starts, sizes))
    installation.forward = Forward(slice(0, img.shape[0]), TextLayout(p, p + sum(sizes), spans), spans,
                                   tuple(neg_masks), (1.0,) * len(sizes), pos_mask, None)  # fmt: skip
    proc = guided_processor(installation, attn.processor, 0, 2)
    with torch.no_grad():  # the model's mask is ignored in a guided call: the core's masks are the same keys
        return proc(attn, hidden_states=img, encoder_hidden_states=text, attention_mask=None, image_rotary_emb=cos_sin)


@pytest.mark.parametrize("path", ["dense", "split"])
@pytest.mark.parametrize("block", ["transformer_blocks", "single_transformer_blocks"])
@pytest.mark.parametrize("sizes", [(3,), (3, 2)], ids=["one-negative", "two-negatives"])
def test_processor_matches_float64_reference(pipe, block, path, sizes):
    """One guided call of a dual- or single-stream block equals the mask-table reference, padding and RoPE included."""
    attn = copy.deepcopy(getattr(pipe.transformer, block)[0].attn).double()
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
    got = guided_call(pipe, HunyuanVideoAdapter(pipe), attn, path, img, text, cos_sin, p, sizes, pos_mask, neg_masks,
                      2.5, 0.25)  # fmt: skip
    with torch.no_grad():
        want = reference_vsf(attn, img, text, angles, p, sizes, 2.5, 0.25, pos_mask, neg_masks)
    tol = {"atol": 2e-6 if path == "dense" else 2e-5, "rtol": 0}  # diffusers' RoPE rounds to float32
    torch.testing.assert_close(got[0], want[0], **tol)
    real = torch.cat([pos_mask, *neg_masks], dim=1)[:, :, None].expand_as(want[1])  # padding outputs are never read
    torch.testing.assert_close(got[1][real], want[1][real], **tol)


def test_processor_outside_a_guided_forward_is_the_original_bit_for_bit(pipe):
    attn = pipe.transformer.single_transformer_blocks[0].attn
    installation = Installation(pipe, HunyuanVideoAdapter(pipe), get_method("vsf")(), [NegativeSpec("x")])
    proc = guided_processor(installation, attn.processor, 0, 2)
    gen = torch.Generator().manual_seed(0)
    img, text = torch.randn(1, 6, 16, generator=gen), torch.randn(1, 4, 16, generator=gen)
    rot = (torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen))
    with torch.no_grad():
        got = proc(attn, hidden_states=img, encoder_hidden_states=text, image_rotary_emb=rot)
        want = attn.processor(attn, hidden_states=img, encoder_hidden_states=text, image_rotary_emb=rot)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


# ---------------------------------------------------------------------------- 32k tokens under a memory cap

BUDGET = 2 * 1024**3
MEMORY_SCRIPT = r"""
import json, math, resource, sys
import torch
torch.set_num_threads(1)
from negguide.adapter import TextLayout
from negguide.installation import Forward, Installation, guided_processor
from negguide.negatives import NegativeSpec
from negguide.registry import get_method

family, n_img, n_pos, n_neg, budget = sys.argv[1], *(int(a) for a in sys.argv[2:])
alpha, beta = 3.5, 0.1
if family == "hunyuanvideo":
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoSingleTransformerBlock as Block
    from negguide.adapters.hunyuanvideo import HunyuanVideoAdapter as Adapter
    attn = Block(num_attention_heads=1, attention_head_dim=16).attn
else:
    from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15TransformerBlock as Block
    from negguide.adapters.hunyuanvideo15 import HunyuanVideo15Adapter as Adapter
    attn = Block(num_attention_heads=1, attention_head_dim=16, mlp_ratio=1.0).attn
gen = torch.Generator().manual_seed(0)
img = torch.randn(1, n_img, 16, generator=gen)
text = torch.randn(1, n_pos + n_neg, 16, generator=gen)
angles = 3 * torch.randn(n_img, 8, generator=gen)
rot = (angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1))
method = get_method("vsf")(get_method("vsf").make_config({"scale": alpha, "bias": beta, "attention": "split"}))
installation = Installation(None, Adapter(None), method, [NegativeSpec("x")])
spans = ((n_pos, n_pos + n_neg),)
installation.forward = Forward(slice(0, 1), TextLayout(n_pos, n_pos + n_neg, spans), spans, (None,), (1.0,), None, None)
proc = guided_processor(installation, attn.processor, 0, 1)
with torch.no_grad():
    proc(attn, hidden_states=img[:, :64], encoder_hidden_states=text, image_rotary_emb=(rot[0][:64], rot[1][:64]))


cap_address_space(budget)
rss0 = peak_rss()
with torch.no_grad():
    out_img, out_text = proc(attn, hidden_states=img, encoder_hidden_states=text, image_rotary_emb=rot)
growth = peak_rss() - rss0

# float64 reference for a few image queries: keys [I, P, N(1)], bias -beta on N(1), values flipped; image rotated
rows = torch.tensor([0, 1, n_img // 2, n_img - 1])
double = attn.add_q_proj is not None
def lin(layer, x):
    return x.double() @ layer.weight.double().T + layer.bias.double()
def rms(x, norm):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.double()
def rotate(x, a):
    z = torch.complex(x[..., 0::2], x[..., 1::2]) * torch.polar(torch.ones_like(a), a)
    return torch.stack([z.real, z.imag], -1).flatten(-2)
a = angles.double()
t_q, t_k, t_v = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj) if double else (attn.to_q, attn.to_k, attn.to_v)
n_k = attn.norm_added_k if double else attn.norm_k
q = rotate(rms(lin(attn.to_q, img[0, rows]), attn.norm_q), a[rows])
k_img = rotate(rms(lin(attn.to_k, img[0]), attn.norm_k), a)
k_txt = rms(lin(t_k, text[0]), n_k)
v_img, v_txt = lin(attn.to_v, img[0]), lin(t_v, text[0])
k = torch.cat([k_img, k_txt[:n_pos], k_txt[n_pos:]])
v = torch.cat([v_img, v_txt[:n_pos], -alpha * v_txt[n_pos:]])
logits = q @ k.T / math.sqrt(16)
logits[:, n_img + n_pos:] -= beta
ref = torch.softmax(logits, -1) @ v
if double:
    ref = ref @ attn.to_out[0].weight.double().T + attn.to_out[0].bias.double()
err = (out_img[0, rows].double() - ref).abs().max().item()
print(json.dumps({"growth": growth, "err": err, "shape": list(out_img.shape)}))
"""


def capped_guided_call(family: str) -> dict:
    """One guided VSF call of the family's attention at 32,768 tokens in a subprocess capped at +2 GiB of address
    space, where the dense path's L x L float32 mask alone (~4.3 GB) could not be allocated."""
    n_img, n_pos, n_neg = 32_704, 56, 8
    assert (n_img + n_pos + n_neg) ** 2 * 4 > BUDGET  # the dense mask alone would not fit
    args = [str(a) for a in (family, n_img, n_pos, n_neg, BUDGET)]
    result = run_capped(MEMORY_SCRIPT, *args)
    assert result["shape"] == [1, n_img, 16]
    assert result["growth"] < 256 * 1024**2  # O(L): inputs and outputs are ~2 MB each, an L x L matrix ~4.3 GB
    assert result["err"] < 1e-4
    return result


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs RLIMIT_AS and /proc (Linux)")
def test_a_32k_token_guided_attention_fits_in_linear_memory():
    """A single-stream HunyuanVideo attention (image, prompt and negative in one sequence) at 32k tokens."""
    capped_guided_call("hunyuanvideo")


# ---------------------------------------------------------------------------- pipelines


def test_cfg_equals_the_pipelines_own_true_cfg(pipe):
    own = run(pipe, true_cfg_scale=3.0, negative_prompt="ugly")
    with negguide.apply(pipe, "cfg", negative_prompt="ugly", scale=3.0):
        close(run(pipe), own)


def test_both_block_kinds_are_guided_and_layers_select_them(pipe):
    base = run(pipe)
    with negguide.apply(pipe, "vsf", negative_prompt=NEG) as handle:
        names = {p.index for p in pipe.transformer.attn_processors.values() if hasattr(p, "index")}
        assert names == {0, 1} and handle.installation.adapter.num_layers(pipe.transformer) == 2
        both = run(pipe)
    outs = []
    for layers in ([0], [1]):
        with negguide.apply(pipe, "vsf", negative_prompt=NEG, layers=layers):
            outs.append(run(pipe))
    assert all(differs(o, base) and differs(o, both) for o in outs)


@pytest.mark.parametrize("kind", ["image2video", "image2video_token_replace", "skyreels"])
def test_image_to_video_pipelines_share_the_denoiser(image, kind):
    """VSF with bias=inf is the unguided pipeline, VSF guides, and CFG equals the pipeline's own true CFG (whose
    negative LLaVA encodes with a black image). Beside the pipeline's own CFG (its unconditional call has no
    cache_context name here) only the conditional call is guided: the first step's unconditional prediction is the
    unpatched one, bit for bit."""
    i2v = tiny_hv.build(kind=kind)
    call = {} if kind == "skyreels" else {"prompt_template": tiny_hv.I2V_TEMPLATE}
    base = run(i2v, image=image, **call)
    with negguide.apply(i2v, "vsf", negative_prompt="snow", bias=math.inf):
        close(run(i2v, image=image, **call), base)
    with negguide.apply(i2v, "vsf", negative_prompt="snow"):
        assert differs(run(i2v, image=image, **call), base)
    outputs = []
    hook = i2v.transformer.register_forward_hook(lambda module, args, out: outputs.append(out[0].clone()))
    try:
        own = run(i2v, image=image, true_cfg_scale=3.0, negative_prompt="ugly", **call)
        with negguide.apply(i2v, "vsf", negative_prompt="snow"):
            assert differs(run(i2v, image=image, true_cfg_scale=3.0, negative_prompt="ugly", **call), own)
    finally:
        hook.remove()
    assert len(outputs) == 8  # [cond, uncond] per step, twice
    assert differs(outputs[4].numpy(), outputs[0].numpy()) and torch.equal(outputs[5], outputs[1])
    with negguide.apply(i2v, "cfg", negative_prompt="ugly", scale=3.0):
        close(run(i2v, image=image, **call), own)


def test_negative_prompt_embeds_equal_the_text_path(pipe):
    text = "heavy rain"
    with torch.no_grad():  # as the pipeline encodes
        embeds, pooled, mask = pipe.encode_prompt(text, prompt_template=tiny_hv.T2V_TEMPLATE, max_sequence_length=32)
    with negguide.apply(pipe, "vsf", negative_prompt=text):
        want = run(pipe)
    n = int(mask.sum())
    for given in (embeds[:, :n], {"prompt_embeds": embeds, "prompt_attention_mask": mask}):
        with negguide.apply(pipe, "vsf", negative_prompt_embeds=given):
            close(run(pipe), want)
    with negguide.apply(pipe, "cfg", negative_prompt=text, scale=3.0):
        want = run(pipe)
    given = {"prompt_embeds": embeds, "prompt_attention_mask": mask, "pooled_prompt_embeds": pooled}
    with negguide.apply(pipe, "cfg", negative_prompt_embeds=given, scale=3.0):
        close(run(pipe), want)


def test_bad_negative_prompt_embeds_are_refused(pipe):
    """A 2-D tensor, a mask of the wrong shape, and CFG without the pooled vector: errors naming what to pass."""
    with torch.no_grad():  # as the pipeline encodes
        embeds, _, mask = pipe.encode_prompt("rain", prompt_template=tiny_hv.T2V_TEMPLATE, max_sequence_length=32)
    for method, given, match in [
        ("vsf", embeds[0], "negative_prompt_embeds"),
        ("vsf", {"prompt_embeds": embeds, "prompt_attention_mask": mask[:, :4]}, "prompt_attention_mask"),
        ("cfg", {"prompt_embeds": embeds, "prompt_attention_mask": mask}, "pooled"),
    ]:
        with pytest.raises(NegativePromptError, match=match):
            with negguide.apply(pipe, method, negative_prompt_embeds=given):
                run(pipe, num_inference_steps=1)


# ---------------------------------------------------------------------------- the conformance kit

CASE = testing.Case(
    build=tiny_hv.build,
    call=tiny_hv.CALL,
    output="frames",
    pipeline_cfg={"true_cfg_scale": 3.0, "negative_prompt": "ugly"},
)


@pytest.mark.parametrize("check", sorted(testing.CHECKS))
def test_conformance(check):
    """The adapter passes every check of negguide.testing on the tiny pipeline."""
    testing.CHECKS[check](CASE)
