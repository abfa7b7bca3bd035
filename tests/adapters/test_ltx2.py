"""The LTX-2 adapter on tiny offline LTX-2 pipelines (text-, image- and condition-to-video with audio; the LTX-2.0
and LTX-2.3 layouts; the video stream guided, or both streams through ``LTX2AudioVideoAdapter``).

Numbers are checked against the unpatched pipelines (unguided runs, their own guidances), against the pipeline's own
encoding of the negative (Gemma, then the connectors), or against an independent float64 closed form of one guided
cross-attention call. Prediction-level CFG combines the video and the audio predictions.
"""

from __future__ import annotations

import copy
import functools
import math
import sys

import numpy as np
import PIL.Image
import pytest
import torch

import negguide
from negguide import testing
from negguide.adapter import EncodeCall
from negguide.adapters.ltx2 import LTX2Adapter
from negguide.adapters.ltx2 import LTX2AudioVideoAdapter
from negguide.errors import NegativePromptError
from negguide.errors import NegGuideError
from negguide.errors import NoAdapterError
from negguide.installation import GuidedProcessor
from negguide.registry import adapter_for
from negguide.registry import get_method
from negguide.registry import get_plugin_manager
from negguide.runtime import applied
from negguide.tiny.families.ltx2 import ALL_GUIDANCES
from negguide.tiny.families.ltx2 import CALL as TINY_CALL
from negguide.tiny.families.ltx2 import build
from tests.adapters.helpers import close
from tests.adapters.helpers import differs
from tests.adapters.helpers import guided_one_negative
from tests.memcap import run_capped

CALL = {"num_inference_steps": 2, **TINY_CALL}
MSL = CALL["max_sequence_length"]
PROMPT, NEG = "a red cube on a table", "snow, blurry"


@pytest.fixture(scope="module")
def t2v():
    return build()


@pytest.fixture(scope="module")
def v23():
    """LTX-2.3's layout: per-stream text widths (16 and 8), gated attention, the text modulated by the timestep."""
    return build(version="2.3")


@pytest.fixture(scope="module")
def i2v(t2v):
    from diffusers import LTX2ImageToVideoPipeline

    pipe = LTX2ImageToVideoPipeline(**t2v.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def cond(t2v):
    from diffusers import LTX2ConditionPipeline

    pipe = LTX2ConditionPipeline(**t2v.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def av_pm():
    """A plugin manager whose LTX-2 adapter is ``LTX2AudioVideoAdapter`` (the documented recipe)."""

    class GuideAudioToo:
        @negguide.hookimpl
        def register_adapters(self, register):
            register(LTX2AudioVideoAdapter)

    pm = get_plugin_manager(entry_points=False)
    pm.unregister(name="negguide.adapters.ltx2")
    pm.register(GuideAudioToo(), name="guide-audio-too")
    return pm


def image():
    gen = np.random.default_rng(0)
    return PIL.Image.fromarray((gen.random((32, 32, 3)) * 255).astype("uint8"))


def inputs(pipe):
    """The per-pipeline inputs beside the prompt: the first frame of image-to-video, a first-frame condition (no
    H.264 re-compression: PyAV is not needed)."""
    from diffusers import LTX2ConditionPipeline
    from diffusers import LTX2ImageToVideoPipeline
    from diffusers.pipelines.ltx2.pipeline_ltx2_condition import LTX2VideoCondition

    if isinstance(pipe, LTX2ImageToVideoPipeline):
        return {"image": image(), "image_crf": 0}
    if isinstance(pipe, LTX2ConditionPipeline):
        return {"conditions": [LTX2VideoCondition(frames=image(), index=0, crf=0)]}
    return {}


def run(pipe, prompt=PROMPT, seed=0, **kwargs):
    """Video and audio latents of one call, as one float64 array each."""
    call = {**CALL, **inputs(pipe), **kwargs}
    out = pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), **call)
    return out.frames.double().numpy(), out.audio.double().numpy()


def real_tokens(pipe, text):
    return len(pipe.tokenizer(text).input_ids)  # <bos> included, as Gemma encodes it


class TextSpy:
    """Records the text length (and bias length) each call of block 0's ``attn2`` and ``audio_attn2`` receives."""

    def __init__(self, transformer):
        self.video, self.audio = [], []
        block = transformer.transformer_blocks[0]

        def spy(into):
            def hook(module, args, kwargs):
                bias = kwargs["attention_mask"]
                into.append((kwargs["encoder_hidden_states"].shape[1], None if bias is None else bias.shape[-1]))

            return hook

        self.handles = [block.attn2.register_forward_pre_hook(spy(self.video), with_kwargs=True),
                        block.audio_attn2.register_forward_pre_hook(spy(self.audio), with_kwargs=True)]  # fmt: skip

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def encode_call(pipe, **arguments):
    """An ``EncodeCall`` as the installation makes it for ``encode_prompt(PROMPT, **arguments)``."""
    import inspect

    kw = {"device": torch.device("cpu"), "num_videos_per_prompt": 1, "do_classifier_free_guidance": False,
          "max_sequence_length": MSL, **arguments}  # fmt: skip
    output = pipe.encode_prompt(PROMPT, **kw)
    bound = inspect.signature(pipe.encode_prompt).bind(PROMPT, **kw)
    bound.apply_defaults()
    return EncodeCall(dict(bound.arguments), output, 1, 1, torch.device("cpu"), torch.float32, pipe.encode_prompt)


def own_encoding(pipe, text):
    """The pipeline's own encoding of ``text`` as the transformer receives it: Gemma, then the connectors."""
    with torch.no_grad():
        gemma, mask = pipe.encode_prompt(text, do_classifier_free_guidance=False, max_sequence_length=MSL)[:2]
        video, audio, text_mask = pipe.connectors(gemma, mask, padding_side="left")
    return video, audio, text_mask, mask


# ---------------------------------------------------------------------------- facts


def test_adapter_resolves_on_the_ltx2_pipelines(t2v, i2v, cond, v23):
    for pipe in (t2v, i2v, cond, v23):
        assert adapter_for(pipe) is LTX2Adapter
    assert negguide.get_adapter(t2v.transformer) is LTX2Adapter
    assert LTX2Adapter.layout == "cross" and LTX2Adapter.pipeline_cfg == "batched"
    assert LTX2Adapter.streams == ("video",) and LTX2AudioVideoAdapter.streams == ("video", "audio")
    assert not LTX2Adapter.matches(torch.nn.Linear(2, 2))


def test_only_the_video_text_cross_attention_is_patched(t2v, av_pm):
    modules = LTX2Adapter(t2v).attention_modules(t2v.transformer)
    assert modules == {f"transformer_blocks.{i}.attn2.processor": i for i in range(2)}
    before = t2v.transformer.attn_processors
    with negguide.apply(t2v, "vsf", negative_prompt=NEG):
        procs = t2v.transformer.attn_processors
        assert {k for k, v in procs.items() if isinstance(v, GuidedProcessor)} == set(modules)
        assert all(procs[k] is v for k, v in before.items() if k not in modules)  # self, audio, audio-video
    with negguide.apply(t2v, "vsf", negative_prompt=NEG, pm=av_pm):
        guided = {k for k, v in t2v.transformer.attn_processors.items() if isinstance(v, GuidedProcessor)}
    assert guided == set(modules) | {f"transformer_blocks.{i}.audio_attn2.processor" for i in range(2)}


@pytest.mark.parametrize("registers", [True, False])
def test_negative_is_the_pipelines_own_encoding_cut_to_its_real_tokens(registers):
    """Gemma at max_sequence_length, the connectors (which mix tokens: each negative runs through them alone), then
    the real tokens: first where the learnable registers moved them to the front, else at Gemma's (left-padded)
    positions; the audio text likewise. `positive` states the transformer's text width, with no token."""
    pipe = build(registers=registers)
    text = "a dark and blurry photo"
    n = real_tokens(pipe, text)
    for adapter in (LTX2Adapter(pipe), LTX2AudioVideoAdapter(pipe)):
        call = encode_call(pipe)
        with torch.no_grad():
            got = adapter.encode_negative(text, call, padded=False)
        video, audio, text_mask, mask = own_encoding(pipe, text)
        keep = torch.arange(MSL) < n if registers else mask[0].bool()
        assert int(mask.sum()) == n < MSL and bool(text_mask.all())  # the transformer attends every position
        want = video[:, keep] if adapter.streams == ("video",) else torch.cat([video[:, keep], audio[:, keep]], -1)
        assert got.mask is None and got.embeds.shape == want.shape
        torch.testing.assert_close(got.embeds, want, atol=1e-6, rtol=0)
        assert tuple(adapter.positive(call.output).shape) == (1, 0, want.shape[-1])


# ---------------------------------------------------------------------------- one attention call, float64


def _attention64(q, k, v, scale, key_mask=None):
    logits = (q @ k.transpose(-1, -2)) * scale
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], -math.inf)
    return torch.softmax(logits, dim=-1) @ v, torch.logsumexp(logits, dim=-1)


def reference_vsf(attn, hidden, context, p, alpha, beta, pos_mask, neg_mask):
    """Float64 VSF on the cross layout, from the weights: q/k RMS-normed across all heads, Z = W Z+ - alpha (1 - W)
    Z-, W = A+ / (A+ + e^-beta A-), the paddings excluded, then LTX-2.3's per-head gates 2 sigmoid(gate logits)."""

    def lin(layer, x):
        return x @ layer.weight.T + (0 if layer.bias is None else layer.bias)

    def rms(norm, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight

    def split(x):
        return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

    q = split(rms(attn.norm_q, lin(attn.to_q, hidden)))
    k, v = split(rms(attn.norm_k, lin(attn.to_k, context))), split(lin(attn.to_v, context))
    scale = 1 / math.sqrt(q.shape[-1])
    z_pos, lse_pos = _attention64(q, k[:, :, :p], v[:, :, :p], scale, pos_mask)
    z_neg, lse_neg = _attention64(q, k[:, :, p:], v[:, :, p:], scale, neg_mask)
    w = torch.sigmoid(lse_pos - (lse_neg - beta))[..., None]
    z = w * z_pos - alpha * (1 - w) * z_neg  # (B, H, L, D)
    gates = 2 * torch.sigmoid(lin(attn.to_gate_logits, hidden))  # (B, L, H)
    z = z * gates.transpose(1, 2)[..., None]
    return lin(attn.to_out[0], z.transpose(1, 2).flatten(2, 3))


def _guided(pipe, attn, p, n, pos_mask, neg_mask, **params):
    return guided_one_negative(pipe, LTX2Adapter, attn, p, n, pos_mask, neg_mask, **params)


def _bias(mask, dtype):
    """The transformer's own conversion of a 2-D mask (transformer_ltx2.py): (1 - mask) * -10000, (B, 1, L)."""
    return ((1 - mask.to(dtype)) * -10000.0)[:, None]


def _call_inputs(attn, p, n, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 9, attn.query_dim, generator=gen, dtype=dtype)
    context = torch.randn(2, p + n, attn.cross_attention_dim, generator=gen, dtype=dtype)
    pos_mask = torch.tensor([[True] * p, [True] * (p - 3) + [False] * 3])  # row 1: a padded prompt
    neg_mask = torch.tensor([[True] * n, [True] * (n - 2) + [False] * 2])  # row 1: a shorter negative
    return hidden, context, pos_mask, neg_mask


@pytest.mark.parametrize("path", ["dense", "split"])
@pytest.mark.parametrize(("alpha", "beta"), [(3.0, 0.1), (0.5, 2.0)])
def test_processor_matches_float64_closed_form(v23, path, alpha, beta):
    """The guided attn2 call of LTX-2.3 (gated attention; the model's -10000 bias over [P; N] given) equals the
    closed form with the prompt's and the negative's padding excluded."""
    attn = copy.deepcopy(v23.transformer.transformer_blocks[0].attn2).double()
    assert attn.to_gate_logits is not None
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in attn.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    p, n = 6, 4
    hidden, context, pos_mask, neg_mask = _call_inputs(attn, p, n, seed=2)
    bias = _bias(torch.cat([pos_mask, neg_mask], dim=1), torch.float64)
    proc = _guided(v23, attn, p, n, pos_mask, neg_mask, scale=alpha, bias=beta, attention=path)
    with torch.no_grad():
        got = proc(attn, hidden, context, bias, None, None)  # positional, as LTX2Attention.forward calls it
    want = reference_vsf(attn, hidden, context, p, alpha, beta, pos_mask, neg_mask)
    torch.testing.assert_close(got, want, atol=1e-8 if path == "dense" else 1e-5, rtol=0)


@pytest.mark.parametrize("stream", ["attn2", "audio_attn2"])
def test_infinite_bias_call_equals_the_original_with_the_models_bias(v23, stream):
    attn = copy.deepcopy(getattr(v23.transformer.transformer_blocks[1], stream))
    p, n = 5, 3
    hidden, context, pos_mask, neg_mask = _call_inputs(attn, p, n, seed=3, dtype=torch.float32)
    proc = _guided(v23, attn, p, n, pos_mask, neg_mask, bias=math.inf)
    with torch.no_grad():
        got = proc(attn, hidden, context, _bias(torch.cat([pos_mask, neg_mask], 1), torch.float32))
        want = attn.processor(attn, hidden, context[:, :p], _bias(pos_mask, torch.float32))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_bias_of_another_length_or_rotary_embeddings_are_refused(t2v):
    attn = copy.deepcopy(t2v.transformer.transformer_blocks[0].attn2)
    p, n = 5, 3
    hidden, context, pos_mask, neg_mask = _call_inputs(attn, p, n, seed=4, dtype=torch.float32)
    proc = _guided(t2v, attn, p, n, pos_mask, neg_mask)
    with pytest.raises(NegGuideError, match="bias over the 8 text tokens"):
        proc(attn, hidden, context, _bias(pos_mask, torch.float32))
    proc = _guided(t2v, attn, p, n, pos_mask, neg_mask)  # an error removes the installation: a fresh one
    rope = (torch.ones(2, 9, 16), torch.zeros(2, 9, 16))
    with pytest.raises(NegGuideError, match="without rotary embeddings"):
        proc(attn, hidden, context, None, rope)


# ---------------------------------------------------------------------------- a 32k-token call under a memory cap

MEMORY_SCRIPT = r"""
import json, math, resource, sys
import torch
from negguide.adapter import TextLayout
from negguide.adapters.ltx2 import LTX2Adapter
from negguide.installation import Forward, Installation, guided_processor
from negguide.negatives import NegativeSpec
from negguide.registry import get_method

n_video, p, n, budget = (int(a) for a in sys.argv[1:])
torch.set_num_threads(1)


class Attn(torch.nn.Module):  # LTX2Attention's parts, gated (diffusers' import alone would take longer than the call)
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(dim, dim) for _ in range(3))
        self.norm_q, self.norm_k = torch.nn.RMSNorm(dim, eps=1e-6), torch.nn.RMSNorm(dim, eps=1e-6)
        self.to_gate_logits = torch.nn.Linear(dim, heads)
        self.to_out = torch.nn.ModuleList([torch.nn.Linear(dim, dim), torch.nn.Dropout(0.0)])


class LTX2AudioVideoAttnProcessor:  # the signature the guided processor mirrors
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, query_rotary_emb=None,
                 key_rotary_emb=None):
        raise AssertionError("the original processor must not run in a guided call")


torch.manual_seed(0)
attn = Attn(16, 2).eval()
gen = torch.Generator().manual_seed(1)
hidden = torch.randn(1, n_video, 16, generator=gen)
context = torch.randn(1, p + n, 16, generator=gen)
bias = torch.zeros(1, 1, p + n)  # LTX-2's connectors attend every position
vsf = get_method("vsf")
procs = {}
for path in ("split", "dense"):
    method = vsf(vsf.make_config({"scale": 3.0, "bias": 0.1, "attention": path}))
    inst = Installation(None, LTX2Adapter(None), method, [NegativeSpec("x")])
    inst.forward = Forward(slice(0, 1), TextLayout(p, p + n), ((p, p + n),), (None,), (1.0,), None, None)
    procs[path] = guided_processor(inst, LTX2AudioVideoAttnProcessor(), 0, 1)
with torch.no_grad():
    for proc in procs.values():  # warm up: thread pools and allocator arenas exist before the cap
        proc(attn, hidden[:, :64], context, bias, None, None)


cap_address_space(budget)
result = {}
rows = torch.tensor([0, 1, n_video // 2, n_video - 1])
with torch.no_grad():
    h = hidden[0, rows].double()
    q = attn.norm_q(attn.to_q(hidden[0, rows])).double().unflatten(-1, (2, 8)).transpose(0, 1)
    k = attn.norm_k(attn.to_k(context[0])).double().unflatten(-1, (2, 8)).transpose(0, 1)
    v = attn.to_v(context[0]).double().unflatten(-1, (2, 8)).transpose(0, 1)
    logits = q @ k.transpose(-1, -2) / math.sqrt(8)
    logits[..., p:] -= 0.1
    z = torch.softmax(logits, -1) @ torch.cat([v[:, :p], -3.0 * v[:, p:]], 1)  # (H, rows, D)
    gates = 2 * torch.sigmoid(h @ attn.to_gate_logits.weight.double().T + attn.to_gate_logits.bias.double())
    z = (z * gates.T[..., None]).transpose(0, 1).flatten(1)
    ref = z @ attn.to_out[0].weight.double().T + attn.to_out[0].bias.double()
    for path, proc in procs.items():
        rss0 = peak_rss()
        out = proc(attn, hidden, context, bias, None, None)
        result[path + "_rss_growth"] = peak_rss() - rss0
        result[path + "_shape"] = list(out.shape)
        result[path + "_max_err"] = (out[0, rows].double() - ref).abs().max().item()
        del out
print(json.dumps(result))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs RLIMIT_AS and /proc (Linux)")
def test_a_32k_token_guided_call_fits_in_linear_memory():
    """One guided (gated) attn2 call through the adapter's processor at 32,768 video tokens, in a subprocess capped
    at what it uses plus 2 GiB: an L x L float32 matrix (4.3 GB) could not even be allocated. Both paths stay O(L)
    (the cross layout's mask is L x (P + N)) and sampled rows equal a float64 reference."""
    n_video, p, n, budget = 32_768, 32, 8, 2 * 1024**3
    assert n_video * n_video * 4 > budget
    result = run_capped(MEMORY_SCRIPT, n_video, p, n, budget)
    for path in ("split", "dense"):
        assert result[f"{path}_shape"] == [1, n_video, 16]
        assert result[f"{path}_rss_growth"] < 256 * 1024**2, result
        assert result[f"{path}_max_err"] < 1e-4, result


# ---------------------------------------------------------------------------- refusals


def test_custom_processors_are_refused(t2v):
    before = dict(t2v.transformer.attn_processors)
    attn = t2v.transformer.transformer_blocks[1].attn2
    try:
        mine = type("MyProcessor", (), {"__call__": lambda self, attn, h, e=None, m=None, q=None, k=None: h})
        attn.set_processor(mine())
        with pytest.raises(NoAdapterError, match=r"got MyProcessor.*LTX2AudioVideoAttnProcessor"):
            negguide.apply(t2v, "nag", negative_prompt=NEG)
    finally:
        t2v.transformer.set_attn_processor(dict(before))
    assert applied(t2v) is None and t2v.transformer.attn_processors == before


# ---------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("kind", ["t2v", "i2v", "cond", "v23"])
def test_video_attn2_sees_p_then_the_negative_and_bias_inf_is_unguided(kind, request):
    """The video text cross-attention sees [P, N] (the bias over both), the audio one P only; bias=inf gives the
    unguided video and audio; every attention method changes the video (and, through the audio-video
    cross-attention, the audio)."""
    pipe = request.getfixturevalue(kind)
    base_video, base_audio = run(pipe)
    n = real_tokens(pipe, NEG)
    with negguide.apply(pipe, "vsf", negative_prompt=NEG, bias=math.inf):
        with TextSpy(pipe.transformer) as spy:
            video, audio = run(pipe)
    close(video, base_video)
    close(audio, base_audio)
    assert spy.video == [(MSL + n, MSL + n)] * 2 and spy.audio == [(MSL, MSL)] * 2
    for method in ("vsf", "nag", "nasa"):
        with negguide.apply(pipe, method, negative_prompt=NEG):
            video, audio = run(pipe)
        assert differs(video, base_video) and differs(audio, base_audio, by=1e-7), method


def test_ltx2s_own_guidances_guide_every_forward_with_the_prompt(v23):
    """With LTX-2's CFG, STG (LTX2PerturbedAttnProcessor in block 1's self-attention) and modality isolation on, the
    cond half of the CFG batch and the STG and modality forwards (the positive text only) are guided, the uncond
    half not; bias=inf equals the pipeline's own."""
    t2v = v23
    own_video, own_audio = run(t2v, negative_prompt="ugly", **ALL_GUIDANCES)
    rows = []

    def before(module, args, kwargs):
        rows.append(kwargs["hidden_states"].shape[0])

    hook = t2v.transformer.register_forward_pre_hook(before, with_kwargs=True)
    try:
        with negguide.apply(t2v, "vsf", negative_prompt=NEG, bias=math.inf):
            with TextSpy(t2v.transformer) as spy:
                video, audio = run(t2v, negative_prompt="ugly", **ALL_GUIDANCES)
    finally:
        hook.remove()
    close(video, own_video)
    close(audio, own_audio)
    n = real_tokens(t2v, NEG)
    assert rows == [2, 1, 1] * 2  # per step: [uncond, cond], STG, modality isolation
    assert [length for length, _ in spy.video] == [MSL + n] * 6  # the uncond row joins zeros, isolated
    with negguide.apply(t2v, "vsf", negative_prompt=NEG):
        assert differs(run(t2v, negative_prompt="ugly", **ALL_GUIDANCES)[0], own_video)


def test_audio_video_adapter_guides_both_streams(t2v, av_pm):
    """LTX2AudioVideoAdapter (selected by a plugin manager): audio_attn2 sees [P, N] too, with the negatives'
    audio tokens; bias=inf is unguided; guiding the audio too changes the audio beyond the video-only guidance."""
    assert adapter_for(t2v, av_pm) is LTX2AudioVideoAdapter
    base_video, base_audio = run(t2v)
    n = real_tokens(t2v, NEG)
    with negguide.apply(t2v, "vsf", negative_prompt=NEG, bias=math.inf, pm=av_pm):
        with TextSpy(t2v.transformer) as spy:
            video, audio = run(t2v)
    close(video, base_video)
    close(audio, base_audio)
    assert spy.video == spy.audio == [(MSL + n, MSL + n)] * 2
    with negguide.apply(t2v, "vsf", negative_prompt=NEG):
        video_only = run(t2v)
    with negguide.apply(t2v, "vsf", negative_prompt=NEG, pm=av_pm):
        both = run(t2v)
    assert differs(both[1], video_only[1], by=1e-6) and differs(both[0], base_video)


def test_negative_prompt_embeds_act_like_the_text(t2v, av_pm):
    video, audio, _, mask = own_encoding(t2v, NEG)
    n = int(mask.sum())  # registers: the real tokens are first
    with negguide.apply(t2v, "vsf", negative_prompt=NEG):
        text = run(t2v)
    for given in (video[:, :n], {"prompt_embeds": video, "prompt_attention_mask": torch.arange(MSL)[None] < n}):
        with negguide.apply(t2v, "vsf", negative_prompt_embeds=given):
            got = run(t2v)
        close(got[0], text[0])
        close(got[1], text[1])
    with negguide.apply(t2v, "vsf", negative_prompt=NEG, pm=av_pm):
        both = run(t2v)
    given = {"prompt_embeds": video[:, :n], "audio_prompt_embeds": audio[:, :n]}
    with negguide.apply(t2v, "vsf", negative_prompt_embeds=given, pm=av_pm):
        close(run(t2v)[1], both[1])
    with negguide.apply(t2v, "vsf", negative_prompt_embeds=video[:, :n], pm=av_pm):
        with pytest.raises(NegativePromptError, match="audio text beside its video"):
            run(t2v)
    with negguide.apply(t2v, "vsf", negative_prompt_embeds=torch.zeros(1, 3, 7)):
        with pytest.raises(NegativePromptError, match=r"\(rows, tokens, 32\) tensor"):
            run(t2v)


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_cfg_equals_the_pipelines_own_cfg(kind, request):
    """negguide's CFG combines the video AND audio predictions like LTX-2's own CFG with one scale for both (its own
    runs in x0 space: the same combination, v -> x0 being affine with the branches' common coefficients)."""
    pipe = request.getfixturevalue(kind)
    own = run(pipe, negative_prompt=NEG, guidance_scale=3.0, audio_guidance_scale=3.0)
    with negguide.apply(pipe, "cfg", negative_prompt=NEG, scale=3.0):
        got = run(pipe)
    close(got[0], own[0], atol=1e-4)
    close(got[1], own[1], atol=1e-4)


def test_no_family_defaults():
    """No published LTX-2 values: every method keeps its own defaults (untuned)."""
    from negguide.registry import family_defaults

    for name in ("vsf", "nag", "nasa", "cfg"):
        assert family_defaults(get_method(name), "ltx2") == {}


# ---------------------------------------------------------------------------- the conformance kit

PIPELINE_CFG = {"guidance_scale": 3.0, "audio_guidance_scale": 3.0, "negative_prompt": "ugly"}
CASE = testing.Case(build=build, call=TINY_CALL, output="frames", pipeline_cfg=PIPELINE_CFG)
V23_CASE = testing.Case(build=functools.partial(build, version="2.3"), call=TINY_CALL, output="frames",
                        pipeline_cfg=PIPELINE_CFG)  # fmt: skip


@pytest.mark.parametrize("check", sorted(set(testing.CHECKS) - {"compiles_without_recompiles"}))
def test_conformance(check):
    """The adapter passes every check of negguide.testing on the tiny LTX-2.0 pipeline."""
    testing.CHECKS[check](CASE)


def test_conformance_compiles_without_recompiles():
    """The compile check on a one-block LTX-2.0 (Dynamo's tracing time grows with the blocks, not its coverage)."""
    testing.CHECKS["compiles_without_recompiles"](testing.Case(build=functools.partial(build, num_layers=1),
                                                               call=TINY_CALL, output="frames"))  # fmt: skip


ATTENTION_CHECKS = ["empty_negative_row_is_unguided", "split_equals_dense", "vsf_infinite_bias_is_unguided"]


@pytest.mark.parametrize("check", ATTENTION_CHECKS)
def test_conformance_ltx23(check):
    """LTX-2.3's layout (per-stream widths, gated attention, modulated text) through the attention-level checks."""
    testing.CHECKS[check](V23_CASE)


@pytest.mark.parametrize("check", ATTENTION_CHECKS)
def test_conformance_audio_video(check, av_pm):
    """LTX2AudioVideoAdapter (both streams guided) through the attention-level checks."""
    testing.CHECKS[check](testing.Case(build=build, call=TINY_CALL, output="frames", pm=av_pm))
