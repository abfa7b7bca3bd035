"""The UNet adapter on tiny offline SD 1.x-like and SDXL pipelines (+ img2img, inpaint, few-step schedulers).

Numbers are checked against the unpatched pipeline (its own CFG, unguided runs), against the text
encoder run on the real tokens alone, or against an independent float64 closed form of one guided
cross-attention call.
"""

from __future__ import annotations

import copy
import functools
import math

import numpy as np
import pytest
import torch

import negguide
from negguide import testing
from negguide import tiny
from negguide.adapter import EncodeCall
from negguide.adapter import TextLayout
from negguide.adapters.unet import UNetAdapter
from negguide.errors import NegativePromptError
from negguide.errors import NoAdapterError
from negguide.installation import Forward
from negguide.installation import GuidedProcessor
from negguide.installation import Installation
from negguide.installation import guided_processor
from negguide.negatives import NegativeSpec
from negguide.registry import adapter_for
from negguide.registry import get_method
from negguide.runtime import applied
from negguide.tiny.families.unet import build
from tests.adapters.helpers import close
from tests.adapters.helpers import differs

CALL = {"num_inference_steps": 2, "guidance_scale": 0.0, **tiny.CALL_KWARGS["unet"]}
PROMPT, NEG = "a red cube on a table", "snow, blurry"


@pytest.fixture(scope="module")
def sd():
    return build()


@pytest.fixture(scope="module")
def xl():
    return build(xl=True)


@pytest.fixture(params=["sd", "xl"])
def pipe(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def image():
    from PIL import Image

    return Image.fromarray((np.random.RandomState(0).rand(16, 16, 3) * 255).astype("uint8"))


def run(pipe, prompt=PROMPT, seed=0, **kwargs):
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), **{**CALL, **kwargs}).images


def real_tokens(pipe, text):
    return len(pipe.tokenizer(text).input_ids)


def cross_attentions(unet):
    return [m for m in unet.modules() if getattr(m, "is_cross_attention", False)]


class ContextSpy:
    """Records the text length every call of the first ``attn2`` of ``unet`` receives."""

    def __init__(self, unet):
        self.lengths = []
        attn = cross_attentions(unet)[0]
        self.handle = attn.register_forward_pre_hook(
            lambda m, a, kw: self.lengths.append(kw["encoder_hidden_states"].shape[1]), with_kwargs=True
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def encode_call(pipe, **arguments):
    """An ``EncodeCall`` as the installation makes it for ``encode_prompt(PROMPT, **arguments)``."""
    import inspect

    output = pipe.encode_prompt(PROMPT, device=torch.device("cpu"), num_images_per_prompt=1,
                                do_classifier_free_guidance=False, **arguments)  # fmt: skip
    bound = inspect.signature(pipe.encode_prompt).bind(PROMPT, device=torch.device("cpu"), num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False, **arguments)  # fmt: skip
    bound.apply_defaults()
    return EncodeCall(dict(bound.arguments), output, 1, 1, torch.device("cpu"), torch.float32, pipe.encode_prompt)


# ---------------------------------------------------------------------------- facts


def test_adapter_resolves_on_sd_and_sdxl(sd, xl):
    assert adapter_for(sd) is UNetAdapter and adapter_for(xl) is UNetAdapter
    assert negguide.get_adapter(sd.unet) is UNetAdapter
    assert UNetAdapter.family == "unet" and UNetAdapter.layout == "cross" and UNetAdapter.pipeline_cfg == "batched"
    assert not UNetAdapter.matches(torch.nn.Linear(2, 2))


def test_attention_modules_are_every_attn2_in_execution_order(sd, xl):
    """Down, mid, up (the attn_processors order is down, up, mid); attn1 never."""
    sd_modules = UNetAdapter(sd).attention_modules(sd.unet)
    assert list(sd_modules.items()) == [
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor", 0),
        ("mid_block.attentions.0.transformer_blocks.0.attn2.processor", 1),
        ("up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor", 2),
        ("up_blocks.0.attentions.1.transformer_blocks.0.attn2.processor", 3),
    ]
    xl_modules = UNetAdapter(xl).attention_modules(xl.unet)
    assert list(xl_modules.values()) == list(range(8))
    assert [n.split(".")[0] for n in xl_modules] == ["down_blocks"] * 2 + ["mid_block"] * 2 + ["up_blocks"] * 4
    assert all(".attn2." in n for n in xl_modules) and set(xl_modules) < set(xl.unet.attn_processors)


@pytest.mark.parametrize(("layers", "guided"), [([0], {0}), ([-1], {7}), ([2, 3], {2, 3})])
def test_layers_index_the_attn2_blocks_in_execution_order(xl, layers, guided):
    """SDXL tiny: down 0-1, mid 2-3, up 4-7; `layers` picks among them (no other processor is replaced)."""
    with negguide.apply(xl, "vsf", negative_prompt=NEG, layers=layers) as handle:
        procs = [p for p in xl.unet.attn_processors.values() if isinstance(p, GuidedProcessor)]
        assert handle.adapter.num_layers(xl.unet) == 8 and len(procs) == 8
        assert {p.index for p in procs if p.layer_guided} == guided
        names = {p.index: n for n, p in xl.unet.attn_processors.items() if isinstance(p, GuidedProcessor)}
    assert names[2].startswith("mid_block.") and names[7].startswith("up_blocks.0.attentions.1.")


# SD 1.x's own clip_skip path reads `text_encoder.text_model`, which transformers 5's CLIPTextModel lacks
CLIP_SKIPS = [("sd", None), ("xl", None), ("xl", 1)]


@pytest.mark.parametrize(("name", "clip_skip"), CLIP_SKIPS)
def test_negative_is_the_real_tokens_encoded_without_padding(request, name, clip_skip):
    """The negative row is the text encoder(s) run on the real tokens alone (CLIP is causal: cutting is exact),
    with the call's ``clip_skip``, whatever the tokenizer pads with (SDXL's second pads with "!")."""
    pipe = request.getfixturevalue(name)
    text = "a dark and blurry photo"
    cond = UNetAdapter(pipe).encode_negative(text, encode_call(pipe, clip_skip=clip_skip), padded=False)
    n = real_tokens(pipe, text)
    assert cond.embeds.shape[:2] == (1, n) and cond.mask is None
    parts = []
    for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (getattr(pipe, "tokenizer_2", None),
                                                           getattr(pipe, "text_encoder_2", None))):  # fmt: skip
        if tok is None:
            continue
        ids = torch.tensor([tok(text).input_ids])  # no padding at all
        assert ids.shape[1] == n
        with torch.no_grad():
            out = enc(ids, output_hidden_states=True)
        # SDXL: the penultimate layer (clip_skip more), no final norm; SD: the last hidden state
        parts.append(out.hidden_states[-((clip_skip or 0) + 2)] if name == "xl" else out.last_hidden_state)
    torch.testing.assert_close(cond.embeds, torch.cat(parts, dim=-1), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("name", "clip_skip"), CLIP_SKIPS)
def test_padded_negative_is_the_pipelines_own(request, name, clip_skip):
    """For CFG: 77 tokens (and SDXL's pooled vector) exactly as the pipeline encodes its negative, which ignores
    ``clip_skip``."""
    pipe = request.getfixturevalue(name)
    cond = UNetAdapter(pipe).encode_negative(NEG, encode_call(pipe, clip_skip=clip_skip), padded=True)
    own = pipe.encode_prompt(PROMPT, device=torch.device("cpu"), num_images_per_prompt=1,
                             do_classifier_free_guidance=True, negative_prompt=NEG, clip_skip=clip_skip)  # fmt: skip
    assert torch.equal(cond.embeds, own[1]) and cond.embeds.shape[1] == 77
    if len(own) == 4:
        assert torch.equal(cond.extras["pooled"], own[3])
    else:
        assert cond.extras == {}


# ---------------------------------------------------------------------------- one attention call, float64


def _attention64(q, k, v, key_mask=None):
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], -math.inf)
    return torch.softmax(logits, dim=-1) @ v, torch.logsumexp(logits, dim=-1)


def reference_vsf(attn, hidden, context, p, alpha, beta, neg_mask=None):
    """Float64 VSF on the cross layout, from the weights: Z = W Z+ - alpha (1 - W) Z-, W = A+ / (A+ + e^-beta A-)."""

    def lin(layer, x):
        return x @ layer.weight.T + (0 if layer.bias is None else layer.bias)

    def split(x):
        return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

    q, k, v = split(lin(attn.to_q, hidden)), split(lin(attn.to_k, context)), split(lin(attn.to_v, context))
    z_pos, lse_pos = _attention64(q, k[:, :, :p], v[:, :, :p])
    z_neg, lse_neg = _attention64(q, k[:, :, p:], v[:, :, p:], neg_mask)
    w = torch.sigmoid(lse_pos - (lse_neg - beta))[..., None]
    z = (w * z_pos - alpha * (1 - w) * z_neg).transpose(1, 2).flatten(2, 3)
    return lin(attn.to_out[0], z)


def _guided(pipe, attn, p, n, mask, **params):
    method_cls = get_method("vsf")
    method = method_cls(method_cls.make_config(params))
    installation = Installation(pipe, UNetAdapter(pipe), method, [NegativeSpec("x")])
    installation.forward = Forward(slice(0, 2), TextLayout(p, p + n), ((p, p + n),), (mask,), (1.0,), None, None)
    return guided_processor(installation, attn.processor, 0, 4)


@pytest.mark.parametrize("path", ["dense", "split"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize(("alpha", "beta"), [(3.0, 0.1), (0.5, 2.0)])
def test_processor_matches_float64_closed_form(sd, path, padded, alpha, beta):
    attn = copy.deepcopy(cross_attentions(sd.unet)[0]).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in attn.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    p, n = 6, 4
    hidden = torch.randn(2, 9, attn.query_dim, generator=gen, dtype=torch.float64)
    context = torch.randn(2, p + n, attn.cross_attention_dim, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[True] * n, [True] * (n - 2) + [False] * 2]) if padded else None
    proc = _guided(sd, attn, p, n, mask, scale=alpha, bias=beta, attention=path)
    with torch.no_grad():
        got = proc(attn, hidden, context)
    want = reference_vsf(attn, hidden, context, p, alpha, beta, mask)
    # the dense oracle builds its bias mask in float32 (beta = 0.1 is rounded); the split path merges in float32
    torch.testing.assert_close(got, want, atol=1e-8 if path == "dense" else 1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["plain", "fused", "residual-rescale-norm-cross-group-norm"])
def test_infinite_bias_call_equals_the_original_processor(sd, variant):
    """The guided call reproduces every step of the original processor (fused k/v, the optional norms, residual,
    rescale): with the negative masked out it is the original call over the positive tokens."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    attn = copy.deepcopy(cross_attentions(sd.unet)[0])
    if variant == "fused":
        attn.fuse_projections()
        attn.set_processor(_fused_processor())
    elif variant != "plain":
        attn.residual_connection, attn.rescale_output_factor = True, 2.0
        attn.norm_cross = torch.nn.LayerNorm(attn.cross_attention_dim)
        attn.group_norm = torch.nn.GroupNorm(4, attn.query_dim)
        attn.set_processor(AttnProcessor2_0())
    gen = torch.Generator().manual_seed(2)
    p, n = 5, 3
    hidden = torch.randn(2, 9, attn.query_dim, generator=gen)
    context = torch.randn(2, p + n, attn.cross_attention_dim, generator=gen)
    proc = _guided(sd, attn, p, n, None, bias=math.inf)
    with torch.no_grad():
        got = proc(attn, hidden, context)
        want = attn.processor(attn, hidden, context[:, :p])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def _fused_processor():
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    return FusedAttnProcessor2_0()


# ---------------------------------------------------------------------------- refusals


def _ip_processor(attn):
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    return IPAdapterAttnProcessor2_0(attn.query_dim, attn.cross_attention_dim, num_tokens=(4,), scale=1.0)


def test_ip_adapter_and_unknown_processors_are_refused(sd):
    before = dict(sd.unet.attn_processors)
    attn = cross_attentions(sd.unet)[1]
    try:
        attn.set_processor(_ip_processor(attn))
        with pytest.raises(NoAdapterError, match=r"IPAdapterAttnProcessor2_0.*unload_ip_adapter"):
            negguide.apply(sd, "vsf", negative_prompt=NEG)
        attn.set_processor(type("MyProcessor", (), {"__call__": lambda self, attn, h, e=None, m=None: h})())
        with pytest.raises(NoAdapterError, match=r"got MyProcessor.*set_default_attn_processor"):
            negguide.apply(sd, "nag", negative_prompt=NEG)
    finally:
        sd.unet.set_attn_processor(dict(before))
    assert sd.unet.attn_processors == before and applied(sd) is None


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("encoder_hid_dim_type", "ip_image_proj", "IP-Adapter is loaded"),
        ("addition_embed_type", "text", "pools the text into its time embedding"),
        ("encoder_hid_dim_type", "image_proj", "context holds image tokens"),
    ],
)
def test_unets_with_text_outside_cross_attention_are_refused_for_every_method(sd, key, value, match):
    saved = sd.unet.config[key]
    sd.unet.register_to_config(**{key: value})
    try:
        for method in ("vsf", "cfg"):
            with pytest.raises(NoAdapterError, match=match):
                negguide.apply(sd, method, negative_prompt=NEG)
    finally:
        sd.unet.register_to_config(**{key: saved})
    assert applied(sd) is None


def test_negative_prompt_embeds_of_the_wrong_kind_are_refused(sd):
    with negguide.apply(sd, "vsf", negative_prompt_embeds={"pooled_prompt_embeds": torch.zeros(1, 32)}):
        with pytest.raises(NegativePromptError, match="cross_attention_dim"):
            sd.encode_prompt(PROMPT, device=torch.device("cpu"), num_images_per_prompt=1,
                             do_classifier_free_guidance=False)  # fmt: skip


# ---------------------------------------------------------------------------- end to end


def test_vsf_sees_p_then_the_unpadded_negative_and_bias_inf_is_unguided(pipe):
    base = run(pipe)
    modules = UNetAdapter(pipe).attention_modules(pipe.unet)
    with negguide.apply(pipe, "vsf", negative_prompt=NEG, bias=math.inf):
        procs = pipe.unet.attn_processors
        assert {k for k, v in procs.items() if isinstance(v, GuidedProcessor)} == set(modules)
        with ContextSpy(pipe.unet) as spy:
            out = run(pipe)
    assert spy.lengths == [77 + real_tokens(pipe, NEG)] * 2
    close(out, base)
    with negguide.apply(pipe, "vsf", negative_prompt=NEG):
        assert differs(run(pipe), base)


def test_cfg_equals_the_pipelines_own_cfg_also_with_clip_skip(pipe):
    base = run(pipe)
    for kw in ({}, {"clip_skip": 1}) if hasattr(pipe, "text_encoder_2") else ({},):
        own = run(pipe, guidance_scale=3.0, negative_prompt=NEG, **kw)
        with negguide.apply(pipe, "cfg", negative_prompt=NEG, scale=3.0):
            ours = run(pipe, **kw)
        assert differs(own, base)
        close(ours, own)


def test_negative_prompt_embeds_act_like_the_text(pipe):
    """Real tokens given as embeddings equal the text; SDXL's CFG takes the pooled vector in a dict."""
    with torch.no_grad():
        out = pipe.encode_prompt(NEG, device=torch.device("cpu"), num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)  # fmt: skip
    with negguide.apply(pipe, "vsf", negative_prompt=NEG):
        text = run(pipe)
    with negguide.apply(pipe, "vsf", negative_prompt_embeds=out[0][:, : real_tokens(pipe, NEG)]):
        close(run(pipe), text)
    embeds = {"prompt_embeds": out[0]}
    if len(out) == 4:
        embeds["pooled_prompt_embeds"] = out[2]
    own = run(pipe, guidance_scale=3.0, negative_prompt_embeds=out[0],
              **({"negative_pooled_prompt_embeds": out[2]} if len(out) == 4 else {}))  # fmt: skip
    with negguide.apply(pipe, "cfg", negative_prompt_embeds=embeds, scale=3.0):
        close(run(pipe), own)
    if len(out) == 4:  # SDXL's CFG without the pooled vector: a clear error
        with pytest.raises(NegativePromptError, match="pooled"):
            with negguide.apply(pipe, "cfg", negative_prompt_embeds=out[0], scale=3.0):
                run(pipe)


def _sibling(pipe, kind):
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from diffusers import StableDiffusionXLInpaintPipeline

    xl = hasattr(pipe, "text_encoder_2")
    classes = {
        (False, "img2img"): StableDiffusionImg2ImgPipeline,
        (False, "inpaint"): StableDiffusionInpaintPipeline,
        (True, "img2img"): StableDiffusionXLImg2ImgPipeline,
        (True, "inpaint"): StableDiffusionXLInpaintPipeline,
    }
    extra = {"add_watermarker": False} if xl else {"requires_safety_checker": False}
    sibling = classes[(xl, kind)](**pipe.components, **extra)
    sibling.set_progress_bar_config(disable=True)
    return sibling


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_img2img_and_inpaint_share_the_adapter(pipe, image, kind):
    from PIL import Image

    sibling = _sibling(pipe, kind)
    assert adapter_for(sibling) is UNetAdapter
    kw = {"image": image, "strength": 0.75, "num_inference_steps": 4}
    if kind == "inpaint":
        mask = np.zeros((16, 16), dtype="uint8")
        mask[4:12, 4:12] = 255
        kw["mask_image"] = Image.fromarray(mask)
    base = run(sibling, **kw)
    with negguide.apply(sibling, "vsf", negative_prompt=NEG, bias=math.inf):
        close(run(sibling, **kw), base)
    with negguide.apply(sibling, "vsf", negative_prompt=NEG):
        assert differs(run(sibling, **kw), base)
    own = run(sibling, guidance_scale=3.0, negative_prompt=NEG, **kw)
    with negguide.apply(sibling, "cfg", negative_prompt=NEG, scale=3.0):
        close(run(sibling, **kw), own)
    assert differs(own, base)


@pytest.mark.parametrize("scheduler", ["euler-trailing", "lcm"])
@pytest.mark.parametrize("steps", [1, 4])
def test_few_step_schedulers_with_guidance_off(xl, scheduler, steps):
    """SDXL-Lightning/Turbo/DMD2/Hyper-SD style: a trailing Euler or an LCM scheduler, guidance_scale=0."""
    from diffusers import EulerDiscreteScheduler
    from diffusers import LCMScheduler
    from diffusers import StableDiffusionXLPipeline

    if scheduler == "lcm":
        sched = LCMScheduler.from_config(xl.scheduler.config)
    else:
        sched = EulerDiscreteScheduler.from_config(xl.scheduler.config, timestep_spacing="trailing")
    fast = StableDiffusionXLPipeline(**{**xl.components, "scheduler": sched}, add_watermarker=False)
    fast.set_progress_bar_config(disable=True)
    kw = {"num_inference_steps": steps, "guidance_scale": 0.0}
    base = run(fast, **kw)
    with negguide.apply(fast, "vsf", negative_prompt=NEG, bias=math.inf):
        with ContextSpy(fast.unet) as spy:
            close(run(fast, **kw), base)
    assert spy.lengths == [77 + real_tokens(fast, NEG)] * steps  # one forward per step, no CFG batch
    for method in ("vsf", "nag"):  # nag at the family's published defaults
        with negguide.apply(fast, method, negative_prompt=NEG):
            out = run(fast, **kw)
        assert np.isfinite(out).all() and differs(out, base)


def test_nag_family_defaults_are_the_published_ones():
    from negguide.registry import family_defaults

    assert family_defaults(get_method("nag"), "unet") == {"scale": 3.0, "tau": 2.5, "alpha": 0.5}
    assert family_defaults(get_method("vsf"), "unet") == {}


# ---------------------------------------------------------------------------- the conformance kit

CASES = {
    "sd": testing.Case(
        build=build,
        call={**tiny.CALL_KWARGS["unet"], "guidance_scale": 0.0},
        pipeline_cfg={"guidance_scale": 4.0, "negative_prompt": "ugly"},
    ),
    "sdxl": testing.Case(
        build=functools.partial(build, xl=True),
        call={**tiny.CALL_KWARGS["unet"], "guidance_scale": 0.0},
        pipeline_cfg={"guidance_scale": 4.0, "negative_prompt": "ugly"},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("check", sorted(testing.CHECKS))
def test_conformance(check, case):
    """The adapter passes every check of negguide.testing on both tiny pipelines."""
    testing.CHECKS[check](CASES[case])
