"""The AuraFlow adapter on a tiny offline ``AuraFlowPipeline`` (1 joint block, 2 single blocks, 8 register tokens).

Numbers are checked against the unpatched pipeline (unguided runs, its own CFG) and against an independent
float64 re-implementation of one guided attention call (joint and single blocks) with the paper's mask table,
the register tokens counted with the image.
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
from negguide.adapter import EncodeCall
from negguide.adapter import TextLayout
from negguide.adapters.auraflow import AuraFlowAdapter
from negguide.errors import NoAdapterError
from negguide.installation import Forward
from negguide.installation import Installation
from negguide.installation import guided_processor
from negguide.negatives import NegativeSpec
from negguide.registry import adapter_for
from negguide.registry import get_method
from tests.adapters.helpers import differs

CALL = {"num_inference_steps": 2, **tiny.CALL_KWARGS["auraflow"]}
NEG = "a dark and blurry photo of heavy rain"
PROMPT = "a red cat on a mat"
REGISTERS = 8


@pytest.fixture(scope="module")
def pipe():
    return tiny.auraflow()


def run(pipe, prompt=PROMPT, seed=0, **kwargs):
    gen = (
        [torch.Generator().manual_seed(s) for s in seed]
        if isinstance(seed, list)
        else torch.Generator().manual_seed(seed)
    )
    return pipe(prompt=prompt, generator=gen, **{**CALL, **kwargs}).images


def close(a, b, atol=2e-5):
    np.testing.assert_allclose(a, b, atol=atol, rtol=0)


def encode_call(pipe, prompt=PROMPT):
    output = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=32)
    args = {"prompt": prompt, "max_sequence_length": 32, "lora_scale": None}
    return EncodeCall(args, output, 1, 1, torch.device("cpu"), torch.float32, pipe.encode_prompt)


# ---------------------------------------------------------------------------- facts


def test_adapter_resolves(pipe):
    assert adapter_for(pipe) is AuraFlowAdapter
    assert AuraFlowAdapter(pipe).attention_modules(pipe.transformer) == {
        "joint_transformer_blocks.0.attn.processor": 0,
        "single_transformer_blocks.0.attn.processor": 1,
        "single_transformer_blocks.1.attn.processor": 2,
    }


def test_fused_projections_are_refused(pipe):
    model = copy.deepcopy(pipe.transformer)
    model.fuse_qkv_projections()
    with pytest.raises(NoAdapterError, match="unfuse_qkv_projections"):
        AuraFlowAdapter(pipe).attention_modules(model)


def test_the_model_attends_to_the_padding(pipe):
    """No text mask reaches the transformer: the prompt's zero padding changes its output, so the negatives must be
    encoded without padding."""
    embeds, mask, _, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False, max_sequence_length=32)
    n = len(pipe.tokenizer(PROMPT).input_ids)
    assert n < 32 and not embeds[:, n:].any()  # the pipeline zeroes the padding tokens, which it keeps
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0.5])
    with torch.no_grad():
        padded = pipe.transformer(x, encoder_hidden_states=embeds, timestep=t).sample
        real = pipe.transformer(x, encoder_hidden_states=embeds[:, :n], timestep=t).sample
    assert float((padded - real).abs().max()) > 1e-3


def test_negative_is_encoded_without_padding(pipe):
    """Only the real UMT5 tokens (``</s>`` included), exactly the encoder's states without any padding; for CFG
    exactly the pipeline's own negative (zero vectors on its padding)."""
    adapter = AuraFlowAdapter(pipe)
    call = encode_call(pipe)
    ids = pipe.tokenizer(NEG, return_tensors="pt").input_ids  # no padding at all
    with torch.no_grad():
        want = pipe.text_encoder(input_ids=ids).last_hidden_state
    cond = adapter.encode_negative(NEG, call, False)
    assert cond.embeds.shape == (1, ids.shape[1], 32) and cond.mask is None
    torch.testing.assert_close(cond.embeds, want, atol=1e-5, rtol=0)
    padded = adapter.encode_negative(NEG, call, True)
    own = pipe.encode_prompt(PROMPT, negative_prompt=NEG, max_sequence_length=32)[2]
    assert torch.equal(padded.embeds, own) and padded.mask is None


def test_negative_prompt_embeds_formats(pipe):
    adapter = AuraFlowAdapter(pipe)
    call = encode_call(pipe)
    _, _, embeds, mask = pipe.encode_prompt(PROMPT, negative_prompt=NEG, max_sequence_length=32)
    n = len(pipe.tokenizer(NEG).input_ids)
    assert mask.shape == (1, 32 * 32)  # encode_prompt returns the expanded mask flattened
    cond = adapter.negative_from_embeds({"prompt_embeds": embeds, "prompt_attention_mask": mask}, call, False)
    assert cond.mask.tolist() == [[True] * n + [False] * (32 - n)] and torch.equal(cond.embeds, embeds)
    padded = adapter.negative_from_embeds({"prompt_embeds": embeds, "prompt_attention_mask": mask[:, ::32]}, call, True)
    assert torch.equal(padded.embeds, embeds) and padded.mask is None
    assert torch.equal(adapter.negative_from_embeds(embeds, call, False).embeds, embeds)
    with pytest.raises(negguide.NegativePromptError, match="prompt_attention_mask"):
        adapter.negative_from_embeds({"prompt_embeds": embeds, "prompt_attention_mask": mask[:, :5]}, call, False)
    with pytest.raises(negguide.NegativePromptError, match="joint_attention_dim"):
        adapter.negative_from_embeds(torch.randn(5, 32), call, False)


# ---------------------------------------------------------------------------- one attention call


def _ln(x, eps):
    """The per-head LayerNorm without affine parameters; the model runs it in float32."""
    x = x.float().double()
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)


def reference_vsf(stream, alpha, beta, r, p, n, neg_mask):
    """Float64 VSF over the model's order ``[R, P, N, I]`` (``stream``: its q, k, v) with explicit keys
    ``[R, P, N(0), I, N(1)]``; the register tokens ``R`` are in the image group (the paper's ``I``)."""
    q, k, v = stream
    length = q.shape[1]
    reg, pos, neg, img = slice(0, r), slice(r, r + p), slice(r + p, r + p + n), slice(r + p + n, length)
    flip = slice(length, length + n)
    keys = torch.cat([k, k[:, neg]], dim=1)
    values = torch.cat([v, -alpha * v[:, neg]], dim=1)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, keys) / math.sqrt(q.shape[-1])
    bias = torch.zeros(length, length + n, dtype=torch.float64)
    for rows in (reg, img):  # the image group sees R, P, I and N(1) with -beta
        bias[rows, neg], bias[rows, flip] = -math.inf, -beta
    bias[pos, neg], bias[pos, flip] = -math.inf, -math.inf  # P sees R, P, I
    bias[neg, pos], bias[neg, flip] = -math.inf, -math.inf  # N sees R, I, N(0)
    padding = torch.zeros(q.shape[0], length + n, dtype=torch.bool)
    padding[:, neg], padding[:, flip] = ~neg_mask, ~neg_mask
    logits = (logits + bias).masked_fill(padding[:, None, None, :], -math.inf)
    return torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), values).flatten(2, 3)


def _perturbed(module):
    module = copy.deepcopy(module).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    return module


def _processor(pipe, attn, path, p, n, neg_mask, index):
    method_cls = get_method("vsf")
    method = method_cls(method_cls.make_config({"scale": 2.5, "bias": 0.25, "attention": path}))
    installation = Installation(pipe, AuraFlowAdapter(pipe), method, [NegativeSpec("x")])
    installation.forward = Forward(slice(0, 2), TextLayout(p, p + n), ((p, p + n),), (neg_mask,), (1.0,), None, None)
    return guided_processor(installation, attn.processor, index, 3)


@pytest.mark.parametrize("path", ["dense", "split"])
def test_joint_block_matches_float64_reference(pipe, path):
    attn = _perturbed(pipe.transformer.joint_transformer_blocks[0].attn)
    p, n, m, dim, eps = 6, 4, 5, 16, attn.norm_q.eps
    gen = torch.Generator().manual_seed(2)
    context = torch.randn(2, REGISTERS + p + n, dim, generator=gen, dtype=torch.float64)
    image = torch.randn(2, m, dim, generator=gen, dtype=torch.float64)
    neg_mask = torch.tensor([[True] * n, [True] * (n - 1) + [False]])

    def split(x, weight):
        return (x @ weight.T).unflatten(-1, (attn.heads, -1))

    q = torch.cat([_ln(split(context, attn.add_q_proj.weight), eps), _ln(split(image, attn.to_q.weight), eps)], 1)
    k = torch.cat([_ln(split(context, attn.add_k_proj.weight), eps), _ln(split(image, attn.to_k.weight), eps)], 1)
    v = torch.cat([split(context, attn.add_v_proj.weight), split(image, attn.to_v.weight)], 1)
    out = reference_vsf((q, k, v), 2.5, 0.25, REGISTERS, p, n, neg_mask)
    width = REGISTERS + p + n
    with torch.no_grad():
        got_image, got_context = _processor(pipe, attn, path, p, n, neg_mask, 0)(attn, image, context)
    torch.testing.assert_close(got_image, out[:, width:] @ attn.to_out[0].weight.T, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_context, out[:, :width] @ attn.to_add_out.weight.T, atol=1e-5, rtol=0)


@pytest.mark.parametrize("path", ["dense", "split"])
def test_single_block_matches_float64_reference(pipe, path):
    attn = _perturbed(pipe.transformer.single_transformer_blocks[0].attn)
    p, n, m, dim, eps = 6, 4, 5, 16, attn.norm_q.eps
    hidden = torch.randn(2, REGISTERS + p + n + m, dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    neg_mask = torch.tensor([[True] * n, [False] + [True] * (n - 1)])

    def split(weight):
        return (hidden @ weight.T).unflatten(-1, (attn.heads, -1))

    q, k, v = _ln(split(attn.to_q.weight), eps), _ln(split(attn.to_k.weight), eps), split(attn.to_v.weight)
    out = reference_vsf((q, k, v), 2.5, 0.25, REGISTERS, p, n, neg_mask)
    with torch.no_grad():
        got = _processor(pipe, attn, path, p, n, neg_mask, 1)(attn, hidden)
    torch.testing.assert_close(got, out @ attn.to_out[0].weight.T, atol=1e-5, rtol=0)


def test_processor_outside_a_guided_forward_is_the_original(pipe):
    attn = pipe.transformer.joint_transformer_blocks[0].attn
    installation = Installation(pipe, AuraFlowAdapter(pipe), get_method("vsf")(), [NegativeSpec("x")])
    proc = guided_processor(installation, attn.processor, 0, 3)
    gen = torch.Generator().manual_seed(0)
    image, context = torch.randn(1, 5, 16, generator=gen), torch.randn(1, 12, 16, generator=gen)
    with torch.no_grad():
        for got, want in zip(proc(attn, image, context), attn.processor(attn, image, context)):
            assert torch.equal(got, want)


# ---------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("method", ["vsf", "nag", "nasa"])
def test_methods_guide_and_removal_is_bit_exact(pipe, method):
    base = run(pipe)
    params = {"vsf": {"scale": 3.0}, "nag": {"scale": 5.0}, "nasa": {"scale": 0.5}}[method]
    with negguide.apply(pipe, method, negative_prompt=NEG, **params):
        assert differs(run(pipe), base)
    assert np.array_equal(run(pipe), base)


def test_cfg_method_equals_the_pipelines_own_cfg(pipe):
    """negguide's CFG (scale w, the negative zero-padded) is the pipeline's own batched CFG with the same w."""
    own = run(pipe, guidance_scale=3.0, negative_prompt=NEG)
    with negguide.apply(pipe, "cfg", negative_prompt=NEG, scale=3.0):
        close(run(pipe), own)


def test_images_per_prompt_with_per_prompt_negatives_and_pipeline_cfg(pipe):
    prompts, negatives = [PROMPT, "a green tree"], ["snow", NEG]
    own_cfg = {"guidance_scale": 2.0, "negative_prompt": "ugly", "num_images_per_prompt": 2}
    with negguide.apply(pipe, "vsf", negative_prompt=negatives):
        both = run(pipe, prompts, seed=[0, 1, 2, 3], **own_cfg)
    for i in range(2):
        with negguide.apply(pipe, "vsf", negative_prompt=negatives[i]):
            alone = run(pipe, prompts[i], seed=[2 * i, 2 * i + 1], **own_cfg)
        close(both[2 * i : 2 * i + 2], alone)


def test_negative_prompt_embeds_equal_the_text(pipe):
    with torch.no_grad():
        _, _, embeds, mask = pipe.encode_prompt(PROMPT, negative_prompt=NEG, max_sequence_length=32)
    with negguide.apply(pipe, "vsf", negative_prompt=NEG):
        text = run(pipe)
    with negguide.apply(pipe, "vsf", negative_prompt_embeds={"prompt_embeds": embeds, "prompt_attention_mask": mask}):
        close(run(pipe), text, atol=1e-6)


# ---------------------------------------------------------------------------- the conformance kit

CASE = testing.Case(
    build=tiny.auraflow,
    call=tiny.CALL_KWARGS["auraflow"],
    pipeline_cfg={"guidance_scale": 3.0, "negative_prompt": "ugly"},
)


@pytest.mark.parametrize("check", sorted(testing.CHECKS))
def test_conformance(check):
    """The adapter passes every check of negguide.testing on the tiny pipeline."""
    testing.CHECKS[check](CASE)
