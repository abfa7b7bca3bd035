"""Text encoders and the denoiser on different devices or dtypes.

negguide encodes each negative with the pipeline's own ``encode_prompt`` (so on the text encoders' device, then
moved by the pipeline to its execution device, as the positive is), keeps it in the positive embeddings' device and
dtype (``Installation._on_call_device``), and moves it to the denoiser's text input's device and dtype in every
forward (``_forward_rows`` and ``Adapter.join`` at attention level, ``_conditioning_rows`` for CFG). A different
dtype takes the same code path as a different device, so on a CPU the split is tested with the T5 encoder in
float32 and the transformer in bfloat16 (Wan casts the prompt to the transformer's dtype, as its pipeline does for
UMT5 in float32); the GPU test (skipped without CUDA) puts the text encoder on the CPU and the transformer on CUDA.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import negguide
from negguide import tiny
from tests.adapters.helpers import close

CALL = {"num_inference_steps": 2, **tiny.CALL_KWARGS["wan"], "output_type": "latent", "guidance_scale": 1.0}


def run(pipe, **kwargs):
    with torch.no_grad():
        out = pipe(prompt="a red cube on a table", generator=torch.Generator().manual_seed(0), **{**CALL, **kwargs})
    return out.frames.float().cpu().numpy().astype(np.float64)


def bf16_transformer(pipe):
    """The transformer in bfloat16, its ``_keep_in_fp32_modules`` in float32 (as ``from_pretrained`` loads it)."""
    t = pipe.transformer.to(torch.bfloat16)
    for name, module in t.named_modules():
        if any(k in name.split(".") for k in t._keep_in_fp32_modules):
            module.float()
    return pipe


@pytest.fixture(scope="module")
def mixed():
    """T5 in float32, the transformer in bfloat16."""
    pipe = bf16_transformer(tiny.wan())
    assert pipe.text_encoder.dtype == torch.float32 and pipe.transformer.dtype == torch.bfloat16
    return pipe


@pytest.fixture(scope="module")
def reference(mixed):
    """Everything in float32, with the mixed pipeline's (bfloat16-rounded) transformer weights."""
    pipe = tiny.wan()
    pipe.transformer.load_state_dict({k: v.float() for k, v in mixed.transformer.state_dict().items()})
    return pipe


def test_vsf_with_infinite_bias_equals_unguided_in_bfloat16(mixed):
    base = run(mixed)
    with negguide.apply(mixed, "vsf", negative_prompt="snow, blurry", bias=float("inf")):
        # bfloat16 rounding only: one step of bfloat16 is 1/32 at |x| in [4, 8), where the latents reach (0.031
        # seen under xdist); VSF itself moves them 0.78
        close(run(mixed), base, atol=6.25e-2)


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("vsf", {"scale": 8.0, "bias": 0.0}),
        ("nag", {"scale": 5.0, "alpha": 1.0}),
        ("nasa", {"scale": 2.0}),
        ("cfg", {"scale": 10.0}),
    ],
)
def test_guided_mixed_dtypes_are_close_to_a_float32_reference(mixed, reference, method, params):
    """The guided output of the split pipeline is within bfloat16 rounding of the all-float32 run, and the
    guidance moves the output far more than that rounding."""
    base32 = run(reference)
    with negguide.apply(reference, method, negative_prompt="snow, blurry", **params):
        want = run(reference)
    with negguide.apply(mixed, method, negative_prompt="snow, blurry", **params):
        got = run(mixed)
    assert np.isfinite(got).all()
    effect = float(np.abs(want - base32).max())
    assert effect > 0.4, f"guidance barely moves the output ({effect}); the comparison would prove nothing"
    error = float(np.abs(got - want).max())
    # CFG multiplies the branches' rounding by its scale (its exact check is the next test)
    assert error < (0.2 if method == "cfg" else 0.1) * effect


def test_cfg_with_mixed_dtypes_equals_the_pipelines_own_cfg(mixed):
    """Same weights, same dtypes: negguide's CFG (negative encoded by negguide, cast per forward) equals the
    pipeline's own CFG (its negative encoded and cast by the pipeline)."""
    want = run(mixed, negative_prompt="snow, blurry", guidance_scale=4.0)
    with negguide.apply(mixed, "cfg", negative_prompt="snow, blurry", scale=4.0):
        got = run(mixed, guidance_scale=1.0)
    close(got, want, atol=3e-2)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


@pytest.mark.parametrize("method", ["vsf", "cfg"])
def test_every_tensor_reaching_the_denoisers_text_attention_is_on_its_device_and_dtype(mixed, method):
    """A spy on every cross-attention (the modules that see the text, negatives included) and on the text
    encoder: the negatives are encoded by the pipeline's own float32 encoder, and what reaches the attention is
    on the transformer's device, in its dtype, with the negative tokens appended (attention level)."""
    transformer = mixed.transformer
    device = next(transformer.parameters()).device
    seen, encoded = [], []

    def spy(module, args, kwargs):
        seen.append([*_tensors(args), *_tensors(kwargs)])

    def on_encode(module, args, output):
        encoded.append(output.last_hidden_state.dtype)

    hooks = [block.attn2.register_forward_pre_hook(spy, with_kwargs=True) for block in transformer.blocks]
    hooks.append(mixed.text_encoder.register_forward_hook(on_encode))
    try:
        with negguide.apply(mixed, method, negative_prompt="snow, blurry"):
            run(mixed)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(encoded) == 2 and set(encoded) == {torch.float32}  # the prompt, then the negative
    assert seen and all(t.device == device for call in seen for t in call)
    floats = {t.dtype for call in seen for t in call if t.is_floating_point()}
    assert floats == {torch.bfloat16}, floats
    texts = {call[1].shape[1] for call in seen}  # (hidden_states, encoder_hidden_states, ...)
    positive = CALL["max_sequence_length"]
    if method == "vsf":
        assert texts and all(n > positive for n in texts)  # [P, N] in every guided call
    else:
        assert texts == {positive}  # CFG: the negative branch is batched, at the positive's length


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("method", "params"), [("vsf", {"scale": 3.0, "bias": 0.1}), ("cfg", {"scale": 4.0})])
def test_text_encoder_on_cpu_and_transformer_on_cuda_equal_an_all_cuda_run(method, params):
    together = tiny.wan().to("cuda")
    split = tiny.wan().to("cuda")
    split.text_encoder.to("cpu")
    assert split.text_encoder.device.type == "cpu" and split.transformer.device.type == "cuda"
    with negguide.apply(together, method, negative_prompt="snow, blurry", **params):
        want = run(together)
    with negguide.apply(split, method, negative_prompt="snow, blurry", **params):
        got = run(split)
    close(got, want, atol=1e-3)  # T5 on the CPU vs on CUDA: float32 rounding only
    with negguide.apply(split, "vsf", negative_prompt="snow", bias=float("inf")):
        close(run(split), run(together), atol=1e-3)
