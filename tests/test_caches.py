"""negguide with the caches of diffusers 0.42.1 (``transformer.enable_cache``), on tiny Flux and Wan pipelines (CPU).

A cache reuses what an earlier forward of the same ``cache_context`` computed. Guided and unguided forwards of a
branch share that context (the steps outside the ``start``/``stop`` window are unguided), so negguide runs every
guided forward under a context of its own (``"cond:negguide"``): FirstBlockCache, TaylorSeerCache and SeaCache,
whose state is keyed by the context, then never hand a guided forward what an unguided one cached, nor the reverse;
MagCache too when every step is guided (it counts a context's forwards as its step). The other caches are refused
at ``apply`` and at the call (see ``negguide.installation.REFUSED_CACHES``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import hooks as diffusers_hooks
from diffusers.hooks.hooks import StateManager

import negguide
from negguide import installation
from negguide import testing
from negguide import tiny
from negguide.errors import NegGuideError

FLUX = testing.Case(build=tiny.flux, call=tiny.CALL_KWARGS["flux"], steps=4)
WAN = testing.Case(build=tiny.wan, call={**tiny.CALL_KWARGS["wan"], "guidance_scale": 1.0}, output="frames", steps=4)
#: Wan with its own CFG on: separate "cond" (guided) and "uncond" (unguided) forwards
WAN_CFG = testing.Case(
    build=tiny.wan,
    call={**tiny.CALL_KWARGS["wan"], "guidance_scale": 3.0, "negative_prompt": "ugly"},
    output="frames",
    steps=4,
)
#: CogVideoX batches its own CFG into one forward, under ``cache_context("cond_uncond")``
COGVIDEOX_CFG = testing.Case(
    build=tiny.cogvideox,
    call={**tiny.CALL_KWARGS["cogvideox"], "guidance_scale": 3.0, "negative_prompt": "ugly"},
    output="frames",
    steps=4,
)
CASES = {"flux": FLUX, "wan": WAN}
PARAMS = {"vsf": {"scale": 3.0, "bias": 0.1}, "nag": {"scale": 5.0}, "nasa": {"scale": 0.5}, "cfg": {"scale": 3.0}}
#: the guidance window of the reuse tests: steps 0 and 1 of 4 unguided, 2 and 3 guided
WINDOW = {"start": 0.5}
ATTENTION_MODULES = r"(single_transformer_blocks|transformer_blocks|blocks)\.\d+\.attn\d?"
#: every method with FirstBlockCache; TaylorSeerCache with one attention-level and the prediction-level method
REUSE = [("first_block", m) for m in testing.METHODS] + [("taylorseer", "vsf"), ("taylorseer", "cfg")]


def _always_reuse() -> Any:
    """FirstBlockCache that skips every block after the first whenever it has a residual of its context."""
    return diffusers_hooks.FirstBlockCacheConfig(threshold=1e9)


def _reusing(kind: str) -> Any:
    """A cache that reuses in a 4-step call: FirstBlockCache whenever it can, TaylorSeerCache computing the first
    forward of a context and predicting every second one after it."""
    if kind == "first_block":
        return _always_reuse()
    if kind == "sea":  # reuse whenever the budget allows, from the second step of a context on
        return diffusers_hooks.SeaCacheConfig(
            threshold=100.0, retention_steps=1, cache_end_steps=0, max_consecutive_cached=0
        )
    return _taylorseer(cache_interval=2, disable_cache_before_step=1)


def _taylorseer(**kwargs: Any) -> Any:
    """TaylorSeerCache on every attention module of the blocks (its default patterns, ``"^blocks.*attn"``, fully
    match Flux's ``attn`` but none of Wan's ``attn1``/``attn2``)."""
    return diffusers_hooks.TaylorSeerCacheConfig(cache_identifiers=[ATTENTION_MODULES], **kwargs)


def _never_reuse(kind: str) -> Any:
    if kind == "first_block":
        return diffusers_hooks.FirstBlockCacheConfig(threshold=0.0)
    return _taylorseer(cache_interval=1, disable_cache_before_step=0)


def _refused(kind: str, pipe: Any) -> Any:
    """A config of each cache negguide refuses, as a user would enable it on the tiny pipeline."""
    step = {"current_timestep_callback": lambda: pipe.current_timestep}
    return {
        "PyramidAttentionBroadcastConfig": lambda: diffusers_hooks.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, **step
        ),
        "FasterCacheConfig": lambda: diffusers_hooks.FasterCacheConfig(spatial_attention_block_skip_range=2, **step),
        "MagCacheConfig": lambda: diffusers_hooks.MagCacheConfig(calibrate=True, num_inference_steps=4),
        "TextKVCacheConfig": lambda: diffusers_hooks.TextKVCacheConfig(),
    }[kind]()


def _with_step_metadata(pipe: Any) -> None:
    """What SeaCache needs and no diffusers pipeline passes: the step index, sigma and step count in every
    ``cache_context`` (a denoising loop of one's own would pass them)."""
    original = pipe.transformer.cache_context

    @contextlib.contextmanager
    def cache_context(name: str, **kwargs: Any) -> Iterator[None]:
        scheduler = pipe.scheduler
        step = scheduler.step_index or 0
        metadata = {"step_index": step, "sigma": float(scheduler.sigmas[step]), "num_inference_steps": 4}
        with original(name, **{**kwargs, **metadata}):
            yield

    pipe.transformer.cache_context = cache_context


def _run(case: testing.Case, cache: Any = None, method: str | None = None, **params: Any) -> np.ndarray:
    pipe = case.build()
    if cache is not None:
        pipe.transformer.enable_cache(cache)
    if isinstance(cache, diffusers_hooks.SeaCacheConfig):
        _with_step_metadata(pipe)
    if method is None:
        return case.run(pipe)
    with case.apply(pipe, method, negative_prompt="snow", **{**PARAMS[method], **params}):
        return case.run(pipe)


_UNGUIDED: dict[tuple[int, str | None], np.ndarray] = {}


def _unguided(case: testing.Case, kind: str | None = None) -> np.ndarray:
    """The unguided output of ``case`` (under the reusing cache ``kind``, if any), computed once."""
    key = (id(case), kind)
    if key not in _UNGUIDED:
        _UNGUIDED[key] = _run(case, None if kind is None else _reusing(kind))
    return _UNGUIDED[key]


@contextlib.contextmanager
def _contexts_seen() -> Iterator[list[str]]:
    """The ``cache_context`` names the cache hooks read their state under, one entry per run of equal names."""
    seen: list[str] = []
    original = StateManager.get_state

    def get_state(self: StateManager) -> Any:
        if not seen or seen[-1] != self.context.name:
            seen.append(self.context.name)
        return original(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StateManager, "get_state", get_state)
        yield seen


# ---------------------------------------------------------------------- refused caches


def _refused_window(kind: str) -> dict[str, float]:
    """MagCache is refused only with a window that leaves steps unguided."""
    return WINDOW if kind in installation.CACHES_COUNTING_STEPS else {}


@pytest.mark.parametrize("kind", sorted(installation.REFUSED_CACHES))
def test_refused_cache_before_apply(kind: str) -> None:
    pipe = FLUX.build()
    pipe.transformer.enable_cache(_refused(kind, pipe))
    before = dict(pipe.transformer.attn_processors)
    with pytest.raises(NegGuideError, match=f"got {kind}.*disable_cache"):
        negguide.apply(pipe, "vsf", negative_prompt="snow", **_refused_window(kind))
    assert all(pipe.transformer.attn_processors[n] is p for n, p in before.items())
    assert negguide.runtime.applied(pipe) is None
    assert "cache_context" not in pipe.transformer.__dict__ and "encode_prompt" not in pipe.__dict__


@pytest.mark.parametrize("kind", sorted(installation.REFUSED_CACHES))
def test_refused_cache_after_apply_is_refused_at_the_call(kind: str) -> None:
    pipe = FLUX.build()
    before = dict(pipe.transformer.attn_processors)
    hooks = dict(pipe.transformer._forward_pre_hooks_with_kwargs)
    negguide.apply(pipe, "vsf", negative_prompt="snow", **_refused_window(kind))
    pipe.transformer.enable_cache(_refused(kind, pipe))
    with pytest.raises(NegGuideError, match=f"got {kind}"):
        FLUX.run(pipe)
    # the installation is removed before the error propagates
    assert all(pipe.transformer.attn_processors[n] is p for n, p in before.items())
    assert dict(pipe.transformer._forward_pre_hooks_with_kwargs) == hooks
    assert "cache_context" not in pipe.transformer.__dict__ and "encode_prompt" not in pipe.__dict__


# ---------------------------------------------------------------------- caches that work


@pytest.mark.parametrize(("kind", "method"), REUSE)
@pytest.mark.parametrize("family", sorted(CASES))
def test_cache_that_never_reuses_equals_no_cache(family: str, kind: str, method: str) -> None:
    """With settings that recompute every step, the guided output under the cache is the guided output without."""
    case = CASES[family]
    want = _run(case, None, method)
    np.testing.assert_allclose(_run(case, _never_reuse(kind), method), want, atol=1e-6, rtol=0)
    assert np.abs(want - _unguided(case)).max() > 1e-4  # the guidance acts


@pytest.mark.parametrize(("kind", "method"), REUSE)
def test_guided_forwards_keep_their_own_cache_state(kind: str, method: str) -> None:
    """Steps 0-1 unguided, 2-3 guided, with the pipeline's own CFG: the guided forwards (only those) read and
    write the state of ``"cond:negguide"``; the unguided ones (the unconditional branch, steps outside the window)
    that of their own context."""
    with _contexts_seen() as seen:
        _run(WAN_CFG, _reusing(kind), method, **WINDOW)
    guided = "cond" + installation.GUIDED_CACHE_SUFFIX
    assert seen == ["cond", "uncond", "cond", "uncond", guided, "uncond", guided, "uncond"]


def _kept_apart_by_the_pipeline(case: testing.Case, kind: str, method: str) -> np.ndarray:
    """The reference: negguide's own context switch off, and the pipeline itself naming the context of the guided
    steps (2 and 3) apart, so that diffusers' cache keeps their state apart by its own keying."""
    pipe = case.build()
    pipe.transformer.enable_cache(_reusing(kind))
    if kind == "sea":
        _with_step_metadata(pipe)
    original = pipe.transformer.cache_context

    entered: dict[str, int] = {}

    @contextlib.contextmanager
    def cache_context(name: str, **kwargs: Any) -> Iterator[None]:
        step = entered[name] = entered.get(name, -1) + 1  # each branch's context is entered once per step
        # the unconditional branch is never guided ("cond_uncond": a batched CFG forward, its conditional rows guided)
        guided = name not in installation.UNCOND_CONTEXTS and step >= 2
        with original(f"{name}/guided-steps" if guided else name, **kwargs):
            yield

    pipe.transformer.cache_context = cache_context
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(installation, "_guided_cache_context", lambda *args: None)
        with case.apply(pipe, method, negative_prompt="snow", **PARAMS[method], **WINDOW):
            return case.run(pipe)


@pytest.mark.parametrize("family", [*sorted(CASES), "wan-cfg", "cogvideox-cfg"])
@pytest.mark.parametrize(("kind", "method"), REUSE)
def test_reuse_across_the_window_equals_contexts_kept_apart(kind: str, method: str, family: str) -> None:
    """A cache that reuses, guidance from step 2 of 4: the guided output is the one of a pipeline that keeps the
    guided steps in a cache context of their own (step 2 recomputes, step 3 reuses what step 2 computed; with the
    pipeline's own CFG its unconditional branch keeps its own state throughout), and differs from the unguided run
    under the same cache."""
    case = {"wan-cfg": WAN_CFG, "cogvideox-cfg": COGVIDEOX_CFG}.get(family) or CASES[family]
    got = _run(case, _reusing(kind), method, **WINDOW)
    np.testing.assert_allclose(got, _kept_apart_by_the_pipeline(case, kind, method), atol=1e-6, rtol=0)
    assert np.abs(got - _unguided(case, kind)).max() > 1e-4


def test_why_guided_forwards_need_their_own_context() -> None:
    """Without negguide's context switch, the first guided step would reuse the residual of an unguided step: on
    Wan (cross-attention) the guidance of every block after the first is silently lost at that step; on Flux the
    text stream of the cached residual lacks the negative tokens and the shapes clash. TaylorSeerCache would
    extrapolate guided outputs from unguided ones, SeaCache reuse or extrapolate unguided residuals."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(installation, "_guided_cache_context", lambda *args: None)
        shared = {kind: _run(WAN, _reusing(kind), "vsf", **WINDOW) for kind in ("first_block", "taylorseer", "sea")}
        with pytest.raises(RuntimeError, match="must match the size"):
            _run(FLUX, _always_reuse(), "vsf", **WINDOW)
    # measured: 3.1e-4 (FirstBlockCache), 1.3e-5 (TaylorSeer: step 3 extrapolates the unguided-to-guided change
    # of its attention outputs), 2.7e-2 (SeaCache); the same run twice gives 0 difference
    for kind, wrong in shared.items():
        assert np.abs(_run(WAN, _reusing(kind), "vsf", **WINDOW) - wrong).max() > 1e-6, kind


def test_cache_enabled_after_apply() -> None:
    """A cache negguide keeps apart works whether it is enabled before or after ``apply``."""
    pipe = WAN.build()
    with WAN.apply(pipe, "vsf", negative_prompt="snow", **PARAMS["vsf"], **WINDOW):
        pipe.transformer.enable_cache(_always_reuse())
        got = WAN.run(pipe)
    np.testing.assert_array_equal(got, _run(WAN, _always_reuse(), "vsf", **WINDOW))


@pytest.mark.parametrize("kind", ["first_block", "taylorseer"])
def test_remove_is_bit_exact_under_a_cache(kind: str) -> None:
    """The kit's check on a pipeline with a cache on: after ``remove()`` (also after an error mid-call) the
    pipeline, its cache included, gives the output of one never guided."""

    def build() -> Any:
        pipe = FLUX.build()
        pipe.transformer.enable_cache(_reusing(kind))
        return pipe

    case = testing.Case(build=build, call=FLUX.call, steps=4)
    case.run()  # a pipeline called once has its per-call attributes, which the kit's snapshot compares by name
    testing.CHECKS["remove_is_bit_exact"](case)


def _magcache(**kwargs: Any) -> Any:
    """MagCache for the 4-step tiny calls: flat ratios, no retention, and a budget that skips whenever it may."""
    settings = {"mag_ratios": [1.0] * 4, "num_inference_steps": 4, "retention_ratio": 0.0, "threshold": 1.0}
    return diffusers_hooks.MagCacheConfig(**{**settings, **kwargs})


@pytest.mark.parametrize("method", ["vsf", "cfg"])
@pytest.mark.parametrize("family", ["flux", "wan-cfg"])
def test_magcache_with_every_step_guided(family: str, method: str) -> None:
    """With every step guided (the default window) MagCache counts every conditional forward in the guided context,
    so it reads the same step's ratios as a pipeline without negguide's context switch: the same output. It skips
    blocks (the output differs from the guided one without a cache), and a MagCache that never skips (calibration)
    equals no cache."""
    case = WAN_CFG if family == "wan-cfg" else CASES[family]
    got = _run(case, _magcache(), method)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(installation, "_guided_cache_context", lambda *args: None)
        want = _run(case, _magcache(), method)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    plain = _run(case, None, method)
    assert np.abs(got - plain).max() > 1e-4
    calibrating = _run(case, diffusers_hooks.MagCacheConfig(calibrate=True, num_inference_steps=4), method)
    np.testing.assert_allclose(calibrating, plain, atol=1e-6, rtol=0)


def test_why_magcache_needs_every_step_guided() -> None:
    """With guidance from step 2 of 4 (refused), the guided context's MagCache state would count the guided
    forwards from 0: steps 2 and 3 would read the ratios of steps 0 and 1."""
    seen: list[tuple[str, int]] = []
    original = StateManager.get_state

    def get_state(self: StateManager) -> Any:
        state = original(self)
        entry = (self.context.name, state.step_index)
        if hasattr(state, "accumulated_ratio") and (not seen or seen[-1] != entry):
            seen.append(entry)
        return state

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(installation, "check_cache", lambda *args: None)
        mp.setattr(StateManager, "get_state", get_state)
        _run(FLUX, _magcache(), "vsf", **WINDOW)
    guided = "cond" + installation.GUIDED_CACHE_SUFFIX
    assert seen[:2] == [("cond", 0), ("cond", 1)]
    assert [step for name, step in seen if name == guided][:2] == [0, 1]  # at scheduler steps 2 and 3


#: Kandinsky 5 runs its own CFG as two forwards per step and enters no ``cache_context``: MagCache names its state
#: "inference" itself
KANDINSKY5_CFG = testing.Case(
    build=tiny.kandinsky5,
    call={**tiny.CALL_KWARGS["kandinsky5"], "guidance_scale": 3.0, "negative_prompt": "ugly"},
    output="frames",
    steps=4,
)


def _magcache_by_forward_order(case: testing.Case, method: str | None, names: tuple[str, ...]) -> np.ndarray:
    """MagCache with negguide's context switch off and each forward's context named by the test, in turn from
    ``names`` (one name: every forward shares it)."""
    from diffusers.hooks.hooks import CacheContext
    from diffusers.hooks.hooks import _set_cache_context

    pipe = case.build()
    pipe.transformer.enable_cache(_magcache())
    count = [0]

    def name_it(module: torch.nn.Module, args: Any) -> None:
        _set_cache_context(module, CacheContext(names[count[0] % len(names)]))
        count[0] += 1

    pipe.transformer.register_forward_pre_hook(name_it)  # before negguide's pre-hook: it runs first
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(installation, "_guided_cache_context", lambda *args: None)
        if method is None:
            return case.run(pipe)
        with case.apply(pipe, method, negative_prompt="snow", **PARAMS[method]):
            return case.run(pipe)


@pytest.mark.parametrize("method", ["vsf", "cfg"])
def test_magcache_without_a_cache_context(method: str) -> None:
    """A pipeline that enters no ``cache_context`` (Kandinsky 5, its own CFG as two forwards per step): the guided
    forwards run under ``"inference:negguide"``, the unconditional ones under MagCache's own ``"inference"``; the
    output equals that of the same pipeline with the two branches' contexts named apart by the test, and differs
    from one where they share MagCache's single context (a guided forward would reuse unguided residuals)."""
    with _contexts_seen() as seen:
        got = _run(KANDINSKY5_CFG, _magcache(), method)
    guided = installation.DEFAULT_CACHE_CONTEXT + installation.GUIDED_CACHE_SUFFIX
    assert seen == [guided, installation.DEFAULT_CACHE_CONTEXT] * 4
    apart = _magcache_by_forward_order(KANDINSKY5_CFG, method, ("cond", "uncond"))
    np.testing.assert_allclose(got, apart, atol=1e-6, rtol=0)
    shared = _magcache_by_forward_order(KANDINSKY5_CFG, method, ("inference",))
    assert np.abs(got - shared).max() > 1e-4


@pytest.mark.parametrize("method", ["vsf", "cfg"])
@pytest.mark.parametrize("family", ["wan", "wan-cfg"])
def test_seacache_with_step_metadata(family: str, method: str) -> None:
    """SeaCache (its state keyed by the context, the step read from it) with the step metadata a loop of one's own
    passes: it skips (the unguided output differs from no cache); with guidance from step 2 of 4 the guided output
    equals that of a pipeline that keeps the guided steps' context apart itself (negguide's renamed context keeps
    the step metadata); one that never skips (``threshold=0``) equals no cache. Wan only: on the tiny Flux
    SeaCache never skipped (the same output as no cache)."""
    case = WAN_CFG if family == "wan-cfg" else WAN
    assert np.abs(_unguided(case, "sea") - _unguided(case)).max() > 1e-4  # it reuses
    got = _run(case, _reusing("sea"), method, **WINDOW)
    np.testing.assert_allclose(got, _kept_apart_by_the_pipeline(case, "sea", method), atol=1e-6, rtol=0)
    assert np.abs(got - _unguided(case, "sea")).max() > 1e-4
    never = diffusers_hooks.SeaCacheConfig(threshold=0.0)
    np.testing.assert_allclose(_run(case, never, method), _run(case, None, method), atol=1e-6, rtol=0)
