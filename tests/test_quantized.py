"""negguide on quantized transformers (issue 18): torchao int8 weight-only and GGUF Q8_0, on the tiny Flux and Wan
pipelines (CPU).

The negative tokens are projected by the transformer's own (quantized) linear layers, so the guided output of a
quantized model must equal the guided output of a float model whose weights are the dequantized quantized weights,
and ``remove()`` must leave the quantized weights exactly as they were. The references are plain float models and
the unguided quantized pipeline, never negguide's own output. bitsandbytes is not tested: diffusers' quantizer
refuses to load without a GPU (``validate_environment``: "No GPU found").
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import negguide
from negguide import testing
from negguide import tiny

#: torchao's int8 weight-only linear and diffusers' GGUF linear (it dequantizes on the CPU) give the float32 linear
#: of the dequantized weights up to rounding (measured: at most 3.6e-7 on these outputs, against guidance effects
#: of 1.4e-3 to 0.13)
DEQUANT_ATOL = 2e-6


def _torchao() -> Any:
    return pytest.importorskip("torchao.quantization")


def _from_pretrained(pipe: Any) -> Any:
    """The diffusers way: save the transformer, load it back with ``TorchAoConfig`` (int8 weight-only)."""
    from diffusers import TorchAoConfig

    config = TorchAoConfig(_torchao().Int8WeightOnlyConfig())
    cls = type(pipe.transformer)
    with tempfile.TemporaryDirectory() as folder:
        pipe.transformer.save_pretrained(folder)
        pipe.transformer = cls.from_pretrained(folder, quantization_config=config, torch_dtype=torch.float32).eval()
    return pipe


def _quantize_in_place(pipe: Any) -> Any:
    """The torchao way: ``quantize_`` on the loaded module (every ``nn.Linear``)."""
    torchao = _torchao()
    torchao.quantize_(pipe.transformer, torchao.Int8WeightOnlyConfig())
    return pipe


def _gguf(pipe: Any) -> Any:
    """A GGUF file written with the ``gguf`` package (Q8_0 for every weight matrix whose rows split into its
    32-value blocks, float32 otherwise), loaded with ``from_single_file`` and ``GGUFQuantizationConfig``."""
    gguf = pytest.importorskip("gguf")
    from diffusers import GGUFQuantizationConfig

    cls = type(pipe.transformer)
    with tempfile.TemporaryDirectory() as folder:
        pipe.transformer.save_pretrained(folder)  # the config
        path = os.path.join(folder, "transformer.gguf")
        writer = gguf.GGUFWriter(path, arch="negguide-tiny")
        q8 = gguf.GGMLQuantizationType.Q8_0
        for name, tensor in pipe.transformer.state_dict().items():
            array = tensor.detach().float().numpy()
            if name.endswith(".weight") and array.ndim == 2 and array.shape[-1] % 32 == 0:
                packed = gguf.quants.quantize(array, q8)
                writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=q8)
            else:
                writer.add_tensor(name, array.astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        config = GGUFQuantizationConfig(compute_dtype=torch.float32)
        pipe.transformer = cls.from_single_file(
            path, quantization_config=config, config=folder, torch_dtype=torch.float32
        ).eval()
    return pipe


def _quantized(build: Callable[[], Any], how: Callable[[Any], Any]) -> Callable[[], Any]:
    return lambda: how(build())


def _quantized_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The quantized parameters: torchao's ``Int8Tensor``s, diffusers' ``GGUFParameter``s."""
    kinds: list[type] = []
    if importlib.util.find_spec("torchao") is not None:
        kinds.append(_torchao().Int8Tensor)
    if importlib.util.find_spec("gguf") is not None:
        from diffusers.quantizers.gguf.utils import GGUFParameter

        kinds.append(GGUFParameter)
    return {name: p for name, p in module.named_parameters() if isinstance(p, tuple(kinds))}


def _dequantize(weight: torch.Tensor) -> torch.Tensor:
    if hasattr(weight, "quant_type"):  # GGUF
        from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

        return dequantize_gguf_tensor(weight).float()
    return weight.dequantize(torch.float32)


def _raw(weight: torch.Tensor) -> list[torch.Tensor]:
    """Copies of the stored data of a quantized weight (int8 values and scales, or GGUF's packed blocks)."""
    if hasattr(weight, "quant_type"):
        return [weight.data.clone()]
    return [weight.qdata.clone(), weight.scale.clone()]


def _dequantized(pipe: Any, build: Callable[[], Any]) -> Any:
    """A float pipeline (same seed, same weights elsewhere) whose linear weights are the dequantized ones."""
    plain = build()
    params = dict(plain.transformer.named_parameters())
    with torch.no_grad():
        for name, weight in _quantized_weights(pipe.transformer).items():
            params[name].copy_(_dequantize(weight))
    return plain


FLUX = {"build": tiny.flux, "call": tiny.CALL_KWARGS["flux"]}
WAN = {"build": tiny.wan, "call": {**tiny.CALL_KWARGS["wan"], "guidance_scale": 1.0}, "output": "frames"}
CASES = {
    "flux-from_pretrained": (FLUX, _from_pretrained),
    "wan-quantize_": (WAN, _quantize_in_place),
    # GGUF on Flux only: the tiny Wan's attention is 24 wide, its projections do not split into Q8_0's 32-value blocks
    "flux-gguf": (FLUX, _gguf),
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


def test_the_transformer_is_quantized(quantized: tuple[testing.Case, Callable[[], Any]]) -> None:
    case, _ = quantized
    weights = _quantized_weights(case.pipe.transformer)
    assert weights, "expected quantized weights in the transformer"
    # the projections negguide runs the negative tokens through are among them
    assert any(name.endswith(("to_k.weight", "add_k_proj.weight")) for name in weights)


@pytest.mark.parametrize("check", ["vsf_infinite_bias_is_unguided", "nasa_zero_is_unguided", "remove_is_bit_exact",
                                   "batch_equals_separate_calls"])  # fmt: skip
@pytest.mark.parametrize("name", sorted(CASES))
def test_conformance_on_quantized(name: str, check: str) -> None:
    """The conformance kit's invariants hold on the quantized pipeline (its unguided output is the reference)."""
    case, _ = _BUILT.setdefault(name, _case(name))
    testing.CHECKS[check](case)


@pytest.mark.parametrize("method", testing.METHODS)
def test_guided_quantized_equals_guided_dequantized_float(
    quantized: tuple[testing.Case, Callable[[], Any]], method: str
) -> None:
    """Guided through quantized weights = guided through a float model holding the dequantized weights."""
    case, build = quantized
    params = {"vsf": {"scale": 3.0, "bias": 0.1}, "nag": {"scale": 5.0}, "nasa": {"scale": 0.5}, "cfg": {"scale": 3.0}}
    plain = _dequantized(case.pipe, build)
    reference = testing.Case(build=build, **{k: v for k, v in vars(case).items() if k in ("call", "output")})
    # the reference is valid: it matches the quantized model, and much more closely than the original float model
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


def test_remove_leaves_the_quantized_weights(quantized: tuple[testing.Case, Callable[[], Any]]) -> None:
    case, _ = quantized
    denoiser = case.pipe.transformer
    before = {n: (w, type(w), _raw(w)) for n, w in _quantized_weights(denoiser).items()}
    for method in testing.METHODS:
        with case.apply(method=method, negative_prompt="snow"):
            case.run()
    after = _quantized_weights(denoiser)
    assert after.keys() == before.keys()
    for name, (weight, kind, raw) in before.items():
        assert after[name] is weight and type(weight) is kind
        assert all(torch.equal(a, b) for a, b in zip(_raw(weight), raw))


def test_bfloat16_int8_flux() -> None:
    """diffusers' recommended setting for int8 (a bfloat16 model): every method runs, keeps bfloat16 and acts, and
    VSF with ``bias=inf`` gives the unguided output (within two bfloat16 steps of the 0-1 image values)."""
    from diffusers import TorchAoConfig

    def build() -> Any:
        pipe = tiny.flux().to(dtype=torch.bfloat16)
        cls = type(pipe.transformer)
        config = TorchAoConfig(_torchao().Int8WeightOnlyConfig())
        with tempfile.TemporaryDirectory() as folder:
            pipe.transformer.save_pretrained(folder)
            pipe.transformer = cls.from_pretrained(
                folder, quantization_config=config, torch_dtype=torch.bfloat16
            ).eval()
        return pipe

    case = testing.Case(build=build, call=tiny.CALL_KWARGS["flux"])
    assert _quantized_weights(case.pipe.transformer) and case.pipe.transformer.dtype == torch.bfloat16
    unguided = case.run()
    with case.apply(method="vsf", negative_prompt="snow", bias=float("inf")):
        # bfloat16 rounding: up to two steps of 2**-8 near 1 (seen under xdist), far below VSF's effect
        np.testing.assert_allclose(case.run(), unguided, atol=2**-7, rtol=0)
    for method in testing.METHODS:
        with case.apply(method=method, negative_prompt="snow", **testing._params(method)):
            guided = case.run()
        assert np.isfinite(guided).all() and np.abs(guided - unguided).max() > 0
    assert case.pipe.transformer.dtype == torch.bfloat16
