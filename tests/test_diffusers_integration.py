"""negguide with the rest of diffusers (issue 18): attention backends, offloading, LoRA, on tiny pipelines (CPU).

Each feature either gives exactly the guided output of a plain pipeline or is refused with a clear error.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models._modeling_parallel import ContextParallelConfig
from diffusers.models._modeling_parallel import ParallelConfig
from diffusers.models.attention_dispatch import AttentionBackendName
from diffusers.models.attention_dispatch import _AttentionBackendRegistry

import negguide
from negguide import testing
from negguide import tiny
from negguide.errors import NegGuideError
from negguide.installation import GuidedProcessor

FLUX = testing.Case(build=tiny.flux, call=tiny.CALL_KWARGS["flux"])
WAN = testing.Case(build=tiny.wan, call={**tiny.CALL_KWARGS["wan"], "guidance_scale": 1.0}, output="frames")
GUIDE = {"negative_prompt": "snow", "scale": 3.0}


def _guided(processors: dict[str, object]) -> dict[str, GuidedProcessor]:
    return {name: p for name, p in processors.items() if isinstance(p, GuidedProcessor)}


@pytest.fixture
def count_backend(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the calls of diffusers' ``_native_math`` attention backend."""
    calls = {"n": 0}
    original = _AttentionBackendRegistry._backends[AttentionBackendName._NATIVE_MATH]

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setitem(_AttentionBackendRegistry._backends, AttentionBackendName._NATIVE_MATH, counted)
    return calls


# ---------------------------------------------------------------------- attention backends


@pytest.mark.parametrize("case", [FLUX, WAN], ids=["flux", "wan"])
def test_backend_set_before_apply_is_kept(case: testing.Case) -> None:
    """A backend set before ``apply`` is the guided processors' backend (read through from the originals)."""
    pipe = case.build()
    denoiser = pipe.transformer
    denoiser.set_attention_backend("_native_math")
    try:
        with case.apply(pipe, **GUIDE):
            guided = _guided(denoiser.attn_processors)
            assert guided
            for proc in guided.values():
                assert proc._attention_backend == AttentionBackendName._NATIVE_MATH
                assert proc._parallel_config is None
    finally:
        denoiser.reset_attention_backend()


@pytest.mark.parametrize("case", [FLUX, WAN], ids=["flux", "wan"])
def test_backend_set_after_apply_reaches_the_originals(case: testing.Case) -> None:
    """``set_attention_backend`` after ``apply`` reaches the guided processors, and ``remove`` keeps it."""
    pipe = case.build()
    denoiser = pipe.transformer
    before = dict(denoiser.attn_processors)
    try:
        with case.apply(pipe, **GUIDE):
            denoiser.set_attention_backend("_native_math")
            for proc in _guided(denoiser.attn_processors).values():
                assert proc._attention_backend == AttentionBackendName._NATIVE_MATH
                assert proc.original._attention_backend == AttentionBackendName._NATIVE_MATH
        after = denoiser.attn_processors
        assert all(after[name] is proc for name, proc in before.items())  # the very same processors back
        assert all(p._attention_backend == AttentionBackendName._NATIVE_MATH for p in after.values())
        with case.apply(pipe, **GUIDE):
            denoiser.reset_attention_backend()
            assert all(p._attention_backend is None for p in _guided(denoiser.attn_processors).values())
        assert all(p._attention_backend is None for p in denoiser.attn_processors.values())
    finally:
        denoiser.reset_attention_backend()


def test_processor_without_backend_attribute_has_none() -> None:
    """A guided processor has the backend attributes exactly where its original has them (diffusers checks
    ``hasattr``), so ``set_attention_backend`` skips the processors it skipped before."""
    pipe = tiny.unet()
    with negguide.apply(pipe, "vsf", **GUIDE):
        guided = _guided(pipe.unet.attn_processors)
        assert guided
        for proc in guided.values():
            assert hasattr(proc, "_attention_backend") == hasattr(proc.original, "_attention_backend")
            assert hasattr(proc, "_parallel_config") == hasattr(proc.original, "_parallel_config")


@pytest.mark.parametrize("case", [FLUX, WAN], ids=["flux", "wan"])
def test_unguided_calls_go_through_the_backend(case: testing.Case, count_backend: dict[str, int]) -> None:
    """Outside the step window every attention call is the original processor's, through the model's backend;
    the first step of two, unguided, makes as many backend calls as a plain step."""
    pipe = case.build()
    pipe.transformer.set_attention_backend("_native_math")
    try:
        case.run(pipe, num_inference_steps=2)
        per_step = count_backend["n"] // 2
        assert per_step > 0
        count_backend["n"] = 0
        with case.apply(pipe, start=0.5, **GUIDE):  # step 0 unguided, step 1 guided
            case.run(pipe, num_inference_steps=2)
        assert count_backend["n"] >= per_step
    finally:
        pipe.transformer.reset_attention_backend()


@pytest.mark.parametrize("method", ["vsf", "nag", "nasa"])
def test_guided_output_under_a_backend(method: str) -> None:
    """Guided outputs under a CPU backend (``_native_math``) equal the default backend's guided outputs: the
    guided attention of guided blocks is negguide's own kernels, every other call the backend's."""
    pipe = FLUX.build()
    with FLUX.apply(pipe, method, **GUIDE):
        want = FLUX.run(pipe)
        pipe.transformer.set_attention_backend("_native_math")
        try:
            got = FLUX.run(pipe)
        finally:
            pipe.transformer.reset_attention_backend()
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_wan_self_attention_uses_the_backend_in_guided_steps(count_backend: dict[str, int]) -> None:
    """Wan's self-attention sees no text: in a guided step it stays the original processor, on the backend."""
    pipe = WAN.build()
    pipe.transformer.set_attention_backend("_native_math")
    try:
        with WAN.apply(pipe, **GUIDE):
            WAN.run(pipe)
        assert count_backend["n"] > 0
    finally:
        pipe.transformer.reset_attention_backend()


def test_attention_backend_context_manager() -> None:
    """diffusers' ``attention_backend`` context manager (the active backend of processors without their own)
    works around a guided call: the guided output is the default backend's."""
    from diffusers.models.attention_dispatch import attention_backend

    pipe = FLUX.build()
    with FLUX.apply(pipe, **GUIDE):
        want = FLUX.run(pipe)
        with attention_backend("_native_math"):
            got = FLUX.run(pipe)
    np.testing.assert_allclose(got, want, atol=2e-5)


# ---------------------------------------------------------------------- context parallelism (unchecked families)
# Flux and Wan run under context parallelism: tests/test_context_parallel.py (two processes). A family whose adapter
# does not say how its text is sharded (LTX, which ships a `_cp_plan`) is refused.

LTX = testing.Case(build=tiny.BUILDERS["ltx"], call=tiny.CALL_KWARGS["ltx"])


def _context_parallel(pipe: object) -> None:
    """What ``enable_parallelism`` records on each processor (the process group itself needs several ranks)."""
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))
    for proc in pipe.transformer.attn_processors.values():  # type: ignore[attr-defined]
        if hasattr(proc, "_parallel_config"):
            proc._parallel_config = config


def test_context_parallelism_before_apply_is_refused_on_an_unchecked_family() -> None:
    pipe = LTX.build()
    before = dict(pipe.transformer.attn_processors)
    _context_parallel(pipe)
    with pytest.raises(NegGuideError, match="context parallelism on ltx.*enable_parallelism.*Flux and Wan"):
        negguide.apply(pipe, "vsf", **GUIDE)
    assert all(pipe.transformer.attn_processors[n] is p for n, p in before.items())
    assert negguide.runtime.applied(pipe) is None


def test_context_parallelism_after_apply_is_refused_at_the_call_on_an_unchecked_family() -> None:
    pipe = LTX.build()
    before = dict(pipe.transformer.attn_processors)
    negguide.apply(pipe, "vsf", **GUIDE)
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))
    guided = [p for p in pipe.transformer.attn_processors.values() if isinstance(p, GuidedProcessor)]
    for proc in guided:  # the text-seeing ones (a fake config without a mesh would break the others' own calls)
        proc._parallel_config = config  # reaches the original through the guided processor
    assert guided and all(p.original._parallel_config is config for p in guided)
    with pytest.raises(NegGuideError, match="context parallelism on ltx"):
        LTX.run(pipe)
    assert all(pipe.transformer.attn_processors[n] is p for n, p in before.items())  # removed on the error


def test_a_context_parallel_config_without_its_mesh_is_refused_on_flux() -> None:
    """A config ``enable_parallelism`` did not set up (no device mesh): refused, naming the call to make."""
    pipe = FLUX.build()
    _context_parallel(pipe)
    with pytest.raises(NegGuideError, match="set up by `enable_parallelism`.*init_process_group"):
        negguide.apply(pipe, "vsf", **GUIDE)
    assert negguide.runtime.applied(pipe) is None


def test_uneven_shards_are_refused() -> None:
    pipe = FLUX.build()
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2, ulysses_anything=True))
    for proc in pipe.transformer.attn_processors.values():
        proc._parallel_config = config
    with pytest.raises(NegGuideError, match="expected equal shards.*ulysses_anything"):
        negguide.apply(pipe, "vsf", **GUIDE)


# ---------------------------------------------------------------------- offloading


def _offload(pipe: object, mode: str) -> None:
    """Turn on one of diffusers' offload modes, onloading to the device the test runs on (the CPU here)."""
    device = torch.device("cpu")
    if mode == "model":
        pipe.enable_model_cpu_offload(device=device)  # type: ignore[attr-defined]
    elif mode == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)  # type: ignore[attr-defined]
    else:
        pipe.transformer.enable_group_offload(  # type: ignore[attr-defined]
            onload_device=device, offload_device=device, offload_type="block_level", num_blocks_per_group=1
        )


def _offload_hooks(pipe: object) -> list[tuple[str, object, bool, object]]:
    """The offload hooks of every module of the pipeline, by kind (a pipeline call ends by re-making model
    offload's hooks, so not by identity): accelerate's ``_hf_hook`` (type, execution device) and wrapped
    ``forward``, the names of the hooks in diffusers' hook registry (group offloading)."""
    state = []
    for key, component in pipe.components.items():  # type: ignore[attr-defined]
        if not isinstance(component, torch.nn.Module):
            continue
        for name, module in component.named_modules():
            hf = module.__dict__.get("_hf_hook")
            hf_kind = None if hf is None else (type(hf).__name__, str(getattr(hf, "execution_device", None)))
            registry = module.__dict__.get("_diffusers_hook")
            hooks = tuple(registry.hooks) if registry is not None else ()  # a call may leave an empty registry
            state.append((f"{key}.{name}", hf_kind, "forward" in module.__dict__, hooks))
    return state


@pytest.fixture(scope="module")
def guided_flux() -> np.ndarray:
    """The guided output of the tiny Flux pipeline without offloading."""
    pipe = FLUX.build()
    with FLUX.apply(pipe, **GUIDE):
        return FLUX.run(pipe)


def _skip_unless_plain_offload_runs(mode: str) -> None:
    """Skip where the offload mode does not run at all, negguide or not (accelerate's sequential offload onto
    the CPU itself fails in ``set_module_tensor_to_device`` with torch 2.13)."""
    pipe = FLUX.build()
    _offload(pipe, mode)
    try:
        FLUX.run(pipe, num_inference_steps=1)
    except Exception as exc:  # noqa: BLE001 - any failure of the plain pipeline: nothing of negguide's to test
        first = str(exc).splitlines()[0]
        pytest.skip(f"{mode} offload does not run on this machine without negguide: {type(exc).__name__}: {first}")


@pytest.mark.parametrize("mode", ["model", "sequential", "group"])
@pytest.mark.parametrize("order", ["offload_then_apply", "apply_then_offload"])
def test_offloaded_guided_output(mode: str, order: str, guided_flux: np.ndarray) -> None:
    """Offloading before or after ``apply``: the guided output equals the guided output without offloading,
    the negatives are on the pipeline's execution device, and ``remove`` leaves the offload hooks as they were."""
    pytest.importorskip("accelerate")
    if mode == "sequential":
        _skip_unless_plain_offload_runs(mode)
    pipe = FLUX.build()
    if order == "offload_then_apply":
        _offload(pipe, mode)
        hooks = _offload_hooks(pipe)
        handle = FLUX.apply(pipe, **GUIDE)
    else:
        handle = FLUX.apply(pipe, **GUIDE)
        _offload(pipe, mode)
        hooks = _offload_hooks(pipe)
    with handle:
        got = FLUX.run(pipe)
        installation = negguide.runtime.applied(pipe).installation
        assert installation.encoded
        for negative in installation.encoded:
            assert negative.embeds.device.type == torch.device(pipe._execution_device).type
    np.testing.assert_allclose(got, guided_flux, atol=1e-6)
    assert _offload_hooks(pipe) == hooks


@pytest.mark.parametrize("mode", ["model", "group"])
@pytest.mark.parametrize("method", ["nag", "nasa", "cfg"])
def test_offloaded_guided_output_of_the_other_methods(mode: str, method: str) -> None:
    """The other methods under offloading (applied after it): the guided output of the pipeline without it."""
    pytest.importorskip("accelerate")
    params = {"negative_prompt": "snow", "scale": 0.5 if method == "nasa" else 3.0}
    with FLUX.apply(FLUX.build(), method, **params) as handle:
        want = FLUX.run(handle.pipe)
    pipe = FLUX.build()
    _offload(pipe, mode)
    with FLUX.apply(pipe, method, **params):
        got = FLUX.run(pipe)
    np.testing.assert_allclose(got, want, atol=1e-6)


# ---------------------------------------------------------------------- LoRA

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "context_embedder"]  # fmt: skip


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random rank-4 LoRA of the tiny Flux transformer's attention and text projections, saved as
    diffusers saves one (``FluxPipeline.save_lora_weights``)."""
    pytest.importorskip("peft")
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = FLUX.build().transformer
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    path = str(tmp_path_factory.mktemp("lora"))
    FluxPipeline.save_lora_weights(path, transformer_lora_layers=get_peft_model_state_dict(transformer))
    return path


def _merged(lora_dir: str, scale: float = 1.0) -> object:
    """A tiny Flux pipeline whose weights have the LoRA merged in (fused, then the LoRA layers unloaded)."""
    pipe = FLUX.build()
    pipe.load_lora_weights(lora_dir, adapter_name="style")
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()
    return pipe


def _guided_run(pipe: object, method: str = "vsf") -> np.ndarray:
    with FLUX.apply(pipe, method, **GUIDE):
        return FLUX.run(pipe)


@pytest.mark.parametrize("method", ["vsf", "nag"])
@pytest.mark.parametrize("order", ["load_then_apply", "apply_then_load"])
def test_lora_guided_output_uses_the_lora(lora_dir: str, method: str, order: str, guided_flux: np.ndarray) -> None:
    """A loaded LoRA, before or after ``apply``: the guided output is the guided output of the model with the
    LoRA merged into its weights (the negatives go through the LoRA'd projections too); ``remove`` keeps it."""
    want = _guided_run(_merged(lora_dir), method)
    assert method != "vsf" or np.abs(want - guided_flux).max() > 1e-3  # the LoRA changes the output
    pipe = FLUX.build()
    if order == "load_then_apply":
        pipe.load_lora_weights(lora_dir, adapter_name="style")
        handle = FLUX.apply(pipe, method, **GUIDE)
    else:
        handle = FLUX.apply(pipe, method, **GUIDE)
        pipe.load_lora_weights(lora_dir, adapter_name="style")
    with handle:
        got = FLUX.run(pipe)
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert pipe.get_active_adapters() == ["style"]  # remove kept the LoRA
    np.testing.assert_allclose(FLUX.run(pipe), FLUX.run(_merged(lora_dir)), atol=2e-5)


@pytest.mark.parametrize("method", ["nasa", "cfg"])
def test_lora_guided_output_of_the_other_methods(lora_dir: str, method: str) -> None:
    """NASA and CFG with a LoRA loaded before ``apply``: the guided output of the LoRA-merged model."""
    params = {"negative_prompt": "snow", "scale": 0.5 if method == "nasa" else 3.0}
    with FLUX.apply(_merged(lora_dir), method, **params) as handle:
        want = FLUX.run(handle.pipe)
    pipe = FLUX.build()
    pipe.load_lora_weights(lora_dir, adapter_name="style")
    with FLUX.apply(pipe, method, **params):
        got = FLUX.run(pipe)
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert pipe.get_active_adapters() == ["style"]


def test_lora_fuse_set_adapters_unload_while_applied(lora_dir: str, guided_flux: np.ndarray) -> None:
    """``set_adapters``, ``fuse_lora`` and ``unload_lora_weights`` while negguide is applied: each guided output
    is the guided output of the matching merged model."""
    pipe = FLUX.build()
    pipe.load_lora_weights(lora_dir, adapter_name="style")
    with FLUX.apply(pipe, **GUIDE):
        pipe.set_adapters(["style"], adapter_weights=[0.5])
        np.testing.assert_allclose(FLUX.run(pipe), _guided_run(_merged(lora_dir, 0.5)), atol=2e-5)
        pipe.set_adapters(["style"], adapter_weights=[1.0])
        pipe.fuse_lora()
        fused = FLUX.run(pipe)
        np.testing.assert_allclose(fused, _guided_run(_merged(lora_dir)), atol=2e-5)
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
        np.testing.assert_allclose(FLUX.run(pipe), guided_flux, atol=2e-5)
    assert not pipe.get_active_adapters()


def test_lora_fused_before_apply_and_kept_by_remove(lora_dir: str) -> None:
    """A LoRA fused before ``apply`` stays fused (and loaded) after ``remove``; the guided output uses it."""
    pipe = FLUX.build()
    pipe.load_lora_weights(lora_dir, adapter_name="style")
    pipe.fuse_lora()
    plain = FLUX.run(pipe)
    weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    np.testing.assert_allclose(_guided_run(pipe), _guided_run(_merged(lora_dir)), atol=2e-5)
    after = pipe.transformer.state_dict()
    assert weights.keys() == after.keys() and all(torch.equal(weights[k], after[k]) for k in weights)
    np.testing.assert_array_equal(FLUX.run(pipe), plain)
