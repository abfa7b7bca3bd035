"""negguide on quantized transformers (issue 18): torchao int8 weight-only, on the tiny Flux and Wan pipelines (CPU).

The negative tokens are projected by the transformer's own (quantized) linear layers, so the guided output of a
quantized model must equal the guided output of a float model whose weights are the dequantized int8 weights, and
``remove()`` must leave the quantized weights exactly as they were. The references are plain float models and
the unguided quantized pipeline, never negguide's own output.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

import negguide
from negguide import testing
from negguide import tiny

torchao_quantization = pytest.importorskip("torchao.quantization")
from diffusers import TorchAoConfig  # noqa: E402

Int8Tensor = torchao_quantization.Int8Tensor
Int8WeightOnlyConfig = torchao_quantization.Int8WeightOnlyConfig

#: torchao's int8 weight-only linear on the CPU gives the float32 linear of the dequantized weights up to rounding
#: (measured: at most 3.6e-7 on these outputs, against guidance effects of 1.4e-3 to 0.13)
DEQUANT_ATOL = 2e-6


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _from_pretrained(pipe: Any) -> Any:
    """The diffusers way: save the transformer, load it back with ``TorchAoConfig`` (int8 weight-only)."""
    cls = type(pipe.transformer)
    with tempfile.TemporaryDirectory() as folder:
        pipe.transformer.save_pretrained(folder)
        quantized = cls.from_pretrained(
            folder, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()), torch_dtype=torch.float32
        )
    pipe.transformer = quantized.eval()
    return pipe


def _quantize_in_place(pipe: Any) -> Any:
    """The torchao way: ``quantize_`` on the loaded module (every ``nn.Linear``)."""
    torchao_quantization.quantize_(pipe.transformer, Int8WeightOnlyConfig())
    return pipe


def _quantized(build: Callable[[], Any], how: Callable[[Any], Any]) -> Callable[[], Any]:
    return lambda: how(build())


def _int8_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in module.named_parameters() if isinstance(p, Int8Tensor)}


def _dequantized(pipe: Any, build: Callable[[], Any]) -> Any:
    """A float pipeline (same seed, same weights elsewhere) whose linear weights are the dequantized int8 ones."""
    plain = build()
    params = dict(plain.transformer.named_parameters())
    with torch.no_grad():
        for name, weight in _int8_weights(pipe.transformer).items():
            params[name].copy_(weight.dequantize(torch.float32))
    return plain


FLUX = {"build": tiny.flux, "call": tiny.CALL_KWARGS["flux"]}
WAN = {"build": tiny.wan, "call": {**tiny.CALL_KWARGS["wan"], "guidance_scale": 1.0}, "output": "frames"}
CASES = {
    "flux-from_pretrained": (FLUX, _from_pretrained),
    "flux-quantize_": (FLUX, _quantize_in_place),
    "wan-from_pretrained": (WAN, _from_pretrained),
    "wan-quantize_": (WAN, _quantize_in_place),
}


def _case(name: str) -> tuple[testing.Case, Callable[[], Any]]:
    spec, how = CASES[name]
    build = spec["build"]
    kit = {k: v for k, v in spec.items() if k != "build"}
    return testing.Case(build=_quantized(build, how), **kit), build


_BUILT: dict[str, tuple[testing.Case, Callable[[], Any]]] = {}


@pytest.fixture(params=sorted(CASES))
def quantized(request: pytest.FixtureRequest) -> tuple[testing.Case, Callable[[], Any]]:
    """One quantized case (built once per module run, shared: every test leaves its pipeline as it found it)."""
    return _BUILT.setdefault(request.param, _case(request.param))


def test_the_transformer_is_int8(quantized: tuple[testing.Case, Callable[[], Any]]) -> None:
    case, _ = quantized
    weights = _int8_weights(case.pipe.transformer)
    assert weights, "expected torchao int8 weights in the transformer"
    # the projections negguide runs the negative tokens through are among them
    assert any(name.endswith(("to_k.weight", "add_k_proj.weight")) for name in weights)
    assert all(w.qdata.dtype == torch.int8 for w in weights.values())


@pytest.mark.parametrize("check", ["vsf_infinite_bias_is_unguided", "nasa_zero_is_unguided", "remove_is_bit_exact",
                                   "batch_equals_separate_calls", "several_negatives"])  # fmt: skip
@pytest.mark.parametrize("name", ["flux-from_pretrained", "wan-quantize_"])
def test_conformance_on_int8(name: str, check: str) -> None:
    """The conformance kit's invariants hold on the quantized pipeline (its unguided output is the reference)."""
    case, _ = _BUILT.setdefault(name, _case(name))
    testing.CHECKS[check](case)


@pytest.mark.parametrize("method", testing.METHODS)
def test_guided_int8_equals_guided_dequantized_float(
    quantized: tuple[testing.Case, Callable[[], Any]], method: str
) -> None:
    """Guided through int8 weights = guided through a float model holding the dequantized weights."""
    case, build = quantized
    params = {"vsf": {"scale": 3.0, "bias": 0.1}, "nag": {"scale": 5.0}, "nasa": {"scale": 0.5}, "cfg": {"scale": 3.0}}
    plain = _dequantized(case.pipe, build)
    reference = testing.Case(build=build, **{k: v for k, v in vars(case).items() if k in ("call", "output")})
    # the reference is valid: it matches the int8 model, and much more closely than the original float model does
    unguided = case.run()
    to_dequantized = np.abs(unguided - reference.run(plain)).max()
    assert to_dequantized <= DEQUANT_ATOL
    assert np.abs(unguided - reference.run(build())).max() > 10 * to_dequantized
    with case.apply(method=method, negative_prompt="snow", **params[method]):
        got = case.run()
    with negguide.apply(plain, method, negative_prompt="snow", **params[method]):
        want = reference.run(plain)
    np.testing.assert_allclose(got, want, atol=DEQUANT_ATOL)
    assert np.abs(got - unguided).max() > 100 * DEQUANT_ATOL  # the guidance acts far above the tolerance


def test_remove_leaves_the_int8_weights(quantized: tuple[testing.Case, Callable[[], Any]]) -> None:
    case, _ = quantized
    denoiser = case.pipe.transformer
    before = {n: (w, w.qdata.clone(), w.scale.clone()) for n, w in _int8_weights(denoiser).items()}
    for method in testing.METHODS:
        with case.apply(method=method, negative_prompt="snow"):
            case.run()
    after = _int8_weights(denoiser)
    assert after.keys() == before.keys()
    for name, (weight, qdata, scale) in before.items():
        assert after[name] is weight and type(after[name]) is Int8Tensor
        assert torch.equal(weight.qdata, qdata) and torch.equal(weight.scale, scale)
