"""The Sana adapter on tiny offline Sana and Sana-Sprint pipelines (+ Sprint img2img; PAG and ControlNet refused).

Numbers are checked against the unpatched pipeline (its own CFG, unguided runs, a run on the negative as
the prompt), against Gemma run on the unpadded instruction + text, or against an independent float64
closed form of one guided cross-attention call.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math

import numpy as np
import pytest
import torch

import negguide
from negguide import testing
from negguide import tiny
from negguide.adapter import EncodeCall
from negguide.adapters.sana import SanaAdapter
from negguide.errors import NoAdapterError
from negguide.installation import GuidedProcessor
from negguide.registry import adapter_for
from negguide.registry import get_method
from negguide.runtime import applied
from negguide.tiny.families.sana import build
from tests.adapters.helpers import close
from tests.adapters.helpers import differs
from tests.adapters.helpers import guided_one_negative

CALL = {"num_inference_steps": 2, **tiny.CALL_KWARGS["sana"]}
MSL = CALL["max_sequence_length"]
PROMPT, NEG = "a red cube on a table", "snow, blurry"


def pipeline_instruction():
    """The pipelines' own default complex human instruction (``SanaPipeline.__call__``)."""
    from diffusers import SanaPipeline

    return inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default


@pytest.fixture(scope="module")
def sana():
    return build()


@pytest.fixture(scope="module")
def sprint():
    return build(kind="sprint")


def run(pipe, prompt=PROMPT, seed=0, **kwargs):
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), **{**CALL, **kwargs}).images


class ContextSpy:
    """Records the text length and the bias shape every call of block 0's ``attn2`` receives."""

    def __init__(self, transformer):
        self.lengths, self.biases = [], []

        def hook(module, args, kwargs):
            self.lengths.append(kwargs["encoder_hidden_states"].shape[1])
            self.biases.append(tuple(kwargs["attention_mask"].shape))

        self.handle = transformer.transformer_blocks[0].attn2.register_forward_pre_hook(hook, with_kwargs=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def encode_call(pipe, **arguments):
    """An ``EncodeCall`` as the installation makes it for ``encode_prompt(PROMPT, **arguments)``."""
    kw = {"device": torch.device("cpu"), "num_images_per_prompt": 1, "clean_caption": False,
          "max_sequence_length": MSL, **arguments}  # fmt: skip
    if "negative_prompt" in inspect.signature(pipe.encode_prompt).parameters:
        kw.setdefault("do_classifier_free_guidance", False)
    with torch.no_grad():
        output = pipe.encode_prompt(PROMPT, **kw)
    bound = inspect.signature(pipe.encode_prompt).bind(PROMPT, **kw)
    bound.apply_defaults()
    return EncodeCall(dict(bound.arguments), output, 1, 1, torch.device("cpu"), torch.float32, pipe.encode_prompt)


def gemma_alone(pipe, text, instruction):
    """Gemma on the instruction + text WITHOUT padding, then the pipeline's dropping: ``<bos>``, the instruction's
    last token and the text (``select_index`` keeps token 0 and the last ``max_sequence_length - 1`` of the padded
    sequence; with no instruction it keeps everything)."""
    tok = pipe.tokenizer
    prefix = "\n".join(instruction) if instruction else ""
    ids = tok(prefix + text.lower().strip()).input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(torch.tensor([ids])).last_hidden_state
    if not instruction:
        return hidden
    num_chi = len(tok.encode(prefix))
    return torch.cat([hidden[:, :1], hidden[:, num_chi - 1 :]], dim=1)


# ---------------------------------------------------------------------------- facts


def test_adapter_resolves_on_sana_and_sprint(sana, sprint):
    assert adapter_for(sana) is SanaAdapter and adapter_for(sprint) is SanaAdapter
    assert negguide.get_adapter(sana.transformer) is SanaAdapter
    assert SanaAdapter.layout == "cross" and SanaAdapter.pipeline_cfg == "batched"
    assert SanaAdapter.text_mask_input == "encoder_attention_mask"
    assert not SanaAdapter.matches(torch.nn.Linear(2, 2))


def test_only_the_softmax_cross_attention_is_patched(sana):
    """attn2 (SanaAttnProcessor2_0) of every block; the linear self-attention never sees text and stays."""
    from diffusers.models.attention_processor import SanaLinearAttnProcessor2_0

    modules = SanaAdapter(sana).attention_modules(sana.transformer)
    assert modules == {f"transformer_blocks.{i}.attn2.processor": i for i in range(2)}
    before = sana.transformer.attn_processors
    with negguide.apply(sana, "nag", negative_prompt=NEG):
        procs = sana.transformer.attn_processors
        assert {k for k, v in procs.items() if isinstance(v, GuidedProcessor)} == set(modules)
        for i in range(2):
            name = f"transformer_blocks.{i}.attn1.processor"
            assert procs[name] is before[name] and isinstance(procs[name], SanaLinearAttnProcessor2_0)


@pytest.mark.parametrize("instruction", ["pipeline", "short", "none"])
def test_negative_is_encoded_as_a_prompt_without_padding(sana, instruction):
    """The call's complex human instruction and the pipeline's token dropping, only the real tokens: equal to
    Gemma (causal) run on the unpadded instruction + text."""
    chi = {"pipeline": pipeline_instruction(), "short": CALL["complex_human_instruction"], "none": None}[instruction]
    text = "A dark and blurry photo"
    cond = SanaAdapter(sana).encode_negative(text, encode_call(sana, complex_human_instruction=chi), padded=False)
    want = gemma_alone(sana, text, chi)
    n = len(sana.tokenizer(text).input_ids) + (1 if chi else 0)  # <bos> + the text (+ the instruction's last token)
    assert cond.embeds.shape[:2] == (1, n) == want.shape[:2] and cond.mask is None
    torch.testing.assert_close(cond.embeds, want, atol=1e-5, rtol=0)


def test_padded_negative_is_the_pipelines_own(sana, sprint):
    """SanaPipeline's CFG encodes its negative without the instruction; Sana-Sprint has none: the negative as a
    prompt (with the instruction), at the prompt's length."""
    chi = CALL["complex_human_instruction"]
    cond = SanaAdapter(sana).encode_negative(NEG, encode_call(sana, complex_human_instruction=chi), padded=True)
    with torch.no_grad():
        own = sana.encode_prompt(PROMPT, do_classifier_free_guidance=True, negative_prompt=NEG, clean_caption=False,
                                 max_sequence_length=MSL, complex_human_instruction=chi)  # fmt: skip
    assert torch.equal(cond.embeds, own[2]) and torch.equal(cond.mask, own[3].bool()) and own[2].shape[1] == MSL
    cond = SanaAdapter(sprint).encode_negative(NEG, encode_call(sprint, complex_human_instruction=chi), padded=True)
    with torch.no_grad():
        as_prompt = sprint.encode_prompt(NEG, clean_caption=False, max_sequence_length=MSL,
                                         complex_human_instruction=chi)  # fmt: skip
    assert torch.equal(cond.embeds, as_prompt[0]) and torch.equal(cond.mask, as_prompt[1].bool())


# ---------------------------------------------------------------------------- one attention call, float64


def _attention64(q, k, v, key_mask=None):
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], -math.inf)
    return torch.softmax(logits, dim=-1) @ v, torch.logsumexp(logits, dim=-1)


def reference_vsf(attn, hidden, context, p, alpha, beta, pos_mask, neg_mask):
    """Float64 VSF on the cross layout, from the weights: q/k RMS-normed over all heads (Sprint) before the head
    split, Z = W Z+ - alpha (1 - W) Z-, W = A+ / (A+ + e^-beta A-), padding excluded."""

    def lin(layer, x):
        return x @ layer.weight.T + (0 if layer.bias is None else layer.bias)

    def rms(norm, x):
        return x if norm is None else x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight

    def split(x):
        return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

    q, k = split(rms(attn.norm_q, lin(attn.to_q, hidden))), split(rms(attn.norm_k, lin(attn.to_k, context)))
    v = split(lin(attn.to_v, context))
    z_pos, lse_pos = _attention64(q, k[:, :, :p], v[:, :, :p], pos_mask)
    z_neg, lse_neg = _attention64(q, k[:, :, p:], v[:, :, p:], neg_mask)
    w = torch.sigmoid(lse_pos - (lse_neg - beta))[..., None]
    z = (w * z_pos - alpha * (1 - w) * z_neg).transpose(1, 2).flatten(2, 3)
    return lin(attn.to_out[0], z)


def _guided(pipe, attn, p, n, pos_mask, neg_mask, **params):
    return guided_one_negative(pipe, SanaAdapter, attn, p, n, pos_mask, neg_mask, **params)


def _call_inputs(attn, p, n, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 9, attn.query_dim, generator=gen, dtype=dtype)
    context = torch.randn(2, p + n, attn.cross_attention_dim, generator=gen, dtype=dtype)
    pos_mask = torch.tensor([[True] * p, [True] * (p - 3) + [False] * 3])  # row 1: a padded prompt
    neg_mask = torch.tensor([[True] * n, [True] * (n - 2) + [False] * 2])  # row 1: a shorter negative
    bias = ((1 - torch.cat([pos_mask, neg_mask], 1).to(dtype)) * -10000.0)[:, None]  # the transformer's conversion
    return hidden, context, pos_mask, neg_mask, bias


@pytest.mark.parametrize("path", ["dense", "split"])
@pytest.mark.parametrize(("alpha", "beta"), [(3.0, 0.1), (0.5, 2.0)])
@pytest.mark.parametrize("kind", ["sana", "sprint"])
def test_processor_matches_float64_closed_form(request, kind, path, alpha, beta):
    pipe = request.getfixturevalue(kind)
    attn = copy.deepcopy(pipe.transformer.transformer_blocks[0].attn2).double()
    assert (attn.norm_q is not None) == (kind == "sprint")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in attn.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    p, n = 6, 4
    hidden, context, pos_mask, neg_mask, bias = _call_inputs(attn, p, n, seed=2)
    proc = _guided(pipe, attn, p, n, pos_mask, neg_mask, scale=alpha, bias=beta, attention=path)
    with torch.no_grad():
        got = proc(attn, hidden, context, attention_mask=bias)
    want = reference_vsf(attn, hidden, context, p, alpha, beta, pos_mask, neg_mask)
    # the dense oracle builds its bias mask in float32 (beta = 0.1 is rounded), RMSNorm its variance in float32
    torch.testing.assert_close(got, want, atol=1e-6 if path == "dense" else 1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["sana", "sprint"])
def test_infinite_bias_call_equals_the_original_with_the_models_bias(request, kind):
    pipe = request.getfixturevalue(kind)
    attn = copy.deepcopy(pipe.transformer.transformer_blocks[1].attn2)
    p, n = 5, 3
    hidden, context, pos_mask, neg_mask, bias = _call_inputs(attn, p, n, seed=3, dtype=torch.float32)
    proc = _guided(pipe, attn, p, n, pos_mask, neg_mask, bias=math.inf)
    with torch.no_grad():
        got = proc(attn, hidden, context, attention_mask=bias)
        want = attn.processor(attn, hidden, context[:, :p], attention_mask=bias[..., :p])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- refusals


def test_custom_processors_pag_and_controlnet_are_refused(sana):
    from diffusers import SanaControlNetModel
    from diffusers import SanaControlNetPipeline
    from diffusers import SanaPAGPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0

    from negguide.tiny.families.sana import SANA_TRANSFORMER

    before = dict(sana.transformer.attn_processors)
    try:
        sana.transformer.transformer_blocks[1].attn2.set_processor(AttnProcessor2_0())
        with pytest.raises(NoAdapterError, match=r"expected SanaAttnProcessor2_0 in block 1.*got AttnProcessor2_0"):
            negguide.apply(sana, "vsf", negative_prompt=NEG)
    finally:
        sana.transformer.set_attn_processor(dict(before))
    pag = SanaPAGPipeline(**sana.components)
    with pytest.raises(NoAdapterError, match=r"\[uncond, cond, perturbed\].*SanaPipeline\(\*\*pipe.components\)"):
        negguide.apply(pag, "nag", negative_prompt=NEG)
    config = {k: v for k, v in SANA_TRANSFORMER.items() if k != "num_layers"}
    controlnet = SanaControlNetModel(**config, num_layers=1)
    for method in ("vsf", "cfg"):
        with pytest.raises(NoAdapterError, match="ControlNet reads the text"):
            negguide.apply(SanaControlNetPipeline(**sana.components, controlnet=controlnet), method,
                           negative_prompt=NEG)  # fmt: skip
    assert applied(sana) is None and sana.transformer.attn_processors == before


# ---------------------------------------------------------------------------- end to end


def test_attn2_sees_p_then_the_unpadded_negative_and_bias_inf_is_unguided(sana):
    base = run(sana)
    n = SanaAdapter(sana).encode_negative(NEG, encode_call(sana, complex_human_instruction=CALL[
        "complex_human_instruction"]), padded=False).num_tokens  # fmt: skip
    with negguide.apply(sana, "vsf", negative_prompt=NEG, bias=math.inf):
        with ContextSpy(sana.transformer) as spy:
            close(run(sana), base)
    assert spy.lengths == [MSL + n] * 2 and spy.biases == [(1, 1, MSL + n)] * 2  # the model's bias: joined length
    for method in ("vsf", "nag", "nasa"):
        with negguide.apply(sana, method, negative_prompt=NEG):
            assert differs(run(sana), base), method


def test_the_pipelines_default_instruction(sana):
    """The pipeline's own ~1000-token instruction: the negative gets the same prefix handling."""
    kw = {"complex_human_instruction": pipeline_instruction(), "num_inference_steps": 1}
    base = run(sana, **kw)
    with negguide.apply(sana, "vsf", negative_prompt=NEG, bias=math.inf):
        close(run(sana, **kw), base)
    with negguide.apply(sana, "vsf", negative_prompt=NEG):
        assert differs(run(sana, **kw), base)


def test_cfg_equals_the_pipelines_own_cfg_and_scale_zero_is_the_negative_alone(sana):
    """The pipeline's CFG encodes its negative without the instruction; CFG at w = 0 is the negative branch: the
    pipeline run with the negative as its prompt and no instruction."""
    base = run(sana)
    own = run(sana, guidance_scale=3.0, negative_prompt=NEG)
    with negguide.apply(sana, "cfg", negative_prompt=NEG, scale=3.0):
        close(run(sana), own)
    assert differs(own, base)
    with negguide.apply(sana, "cfg", negative_prompt=NEG, scale=0.0):
        close(run(sana), run(sana, prompt=NEG, complex_human_instruction=None))


def test_negative_prompt_embeds_act_like_the_text(sana):
    chi = CALL["complex_human_instruction"]
    with torch.no_grad():
        embeds, mask = sana.encode_prompt(NEG, do_classifier_free_guidance=False, clean_caption=False,
                                          max_sequence_length=MSL, complex_human_instruction=chi)[:2]  # fmt: skip
    with negguide.apply(sana, "vsf", negative_prompt=NEG):
        text = run(sana)
    for given in (embeds[:, : int(mask.sum())], {"prompt_embeds": embeds, "prompt_attention_mask": mask}):
        with negguide.apply(sana, "vsf", negative_prompt_embeds=given):
            close(run(sana), text)


@pytest.mark.parametrize("steps", [1, 2])
def test_sana_sprint_few_steps_without_cfg(sprint, steps):
    """Sana-Sprint (1-2 steps, no CFG of its own, guidance embedding 4.5): one forward per step carries the
    negative; VSF bias=inf is unguided; every method (NAG at the family's published defaults) guides."""
    kw = {"num_inference_steps": steps, "guidance_scale": 4.5}
    if steps == 1:
        kw["intermediate_timesteps"] = None  # the pipeline allows it only for 2 steps
    base = run(sprint, **kw)
    with negguide.apply(sprint, "vsf", negative_prompt=NEG, bias=math.inf):
        with ContextSpy(sprint.transformer) as spy:
            close(run(sprint, **kw), base)
    assert len(spy.lengths) == steps and spy.lengths[0] > MSL
    for method in ("vsf", "nag", "nasa"):
        with negguide.apply(sprint, method, negative_prompt=NEG):
            out = run(sprint, **kw)
        assert np.isfinite(out).all() and differs(out, base), method


def test_cfg_on_sana_sprint_batches_the_guidance_embedding(sprint):
    """Sana-Sprint has no negative prompt: CFG runs the negative (encoded as a prompt) beside the prompt with the
    same guidance embedding, so w = 0 is the pipeline run on the negative, and w = 1 the unguided run."""
    kw = {"num_inference_steps": 2, "guidance_scale": 4.5}
    base = run(sprint, **kw)
    with negguide.apply(sprint, "cfg", negative_prompt=NEG, scale=0.0):
        close(run(sprint, **kw), run(sprint, prompt=NEG, **kw))
    with negguide.apply(sprint, "cfg", negative_prompt=NEG, scale=1.0):
        close(run(sprint, **kw), base)
    with negguide.apply(sprint, "cfg", negative_prompt=NEG, scale=3.0):
        assert differs(run(sprint, **kw), base)


def test_sprint_img2img_shares_the_adapter(sprint):
    from diffusers import SanaSprintImg2ImgPipeline
    from PIL import Image

    img2img = SanaSprintImg2ImgPipeline(**sprint.components)
    img2img.set_progress_bar_config(disable=True)
    assert adapter_for(img2img) is SanaAdapter
    image = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8"))
    kw = {"image": image, "strength": 0.6, "guidance_scale": 4.5}
    base = run(img2img, **kw)
    with negguide.apply(img2img, "vsf", negative_prompt=NEG, bias=math.inf):
        close(run(img2img, **kw), base)
    with negguide.apply(img2img, "vsf", negative_prompt=NEG):
        assert differs(run(img2img, **kw), base)


def test_nag_family_defaults_are_the_published_ones():
    from negguide.registry import family_defaults

    assert family_defaults(get_method("nag"), "sana") == {"scale": 3.0, "tau": 2.5, "alpha": 0.5}
    for name in ("vsf", "nasa", "cfg"):
        assert family_defaults(get_method(name), "sana") == {}


# ---------------------------------------------------------------------------- the conformance kit

CASE = testing.Case(build=build, call=tiny.CALL_KWARGS["sana"],
                    pipeline_cfg={"guidance_scale": 4.0, "negative_prompt": "ugly"})  # fmt: skip
SPRINT_CASE = testing.Case(build=functools.partial(build, kind="sprint"),
                           call={**tiny.CALL_KWARGS["sana"], "guidance_scale": 4.5})  # fmt: skip


@pytest.mark.parametrize("check", sorted(testing.CHECKS))
def test_conformance(check):
    """The adapter passes every check of negguide.testing on the tiny Sana pipeline."""
    testing.CHECKS[check](CASE)


@pytest.mark.parametrize("check", sorted(set(testing.CHECKS) - {"compiles_without_recompiles"}))
def test_conformance_sana_sprint(check):
    """Sana-Sprint too (no CFG of its own; q/k norms; guidance embedding); compiled once above."""
    testing.CHECKS[check](SPRINT_CASE)
