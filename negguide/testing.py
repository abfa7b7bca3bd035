"""The adapter conformance kit: the invariants every adapter must pass, callable from any test suite.

A ``Case`` says how to build a family's tiny offline pipeline and call it; each check applies
negguide's built-in methods through the public API and asserts one invariant, raising
``AssertionError`` with what was expected and what was got. The built-in adapters' tests run
every check, and a third-party adapter runs them the same way:

```python
import pytest
from negguide import testing

CASE = testing.Case(build=build_tiny_pipeline, call={"height": 32, "width": 32, "output_type": "np"})

@pytest.mark.parametrize("check", sorted(testing.CHECKS))
def test_conformance(check):
    testing.CHECKS[check](CASE)
```

The checks (``CHECKS``, by name):

* ``remove_is_bit_exact``: after ``remove()`` the pipeline's processors, hooks and attributes
  are the originals and its output is bit-identical to a pipeline never patched, for every
  method; also after an exception raised in the middle of a call;
* ``vsf_infinite_bias_is_unguided`` / ``nasa_zero_is_unguided``: the no-op parameters give the
  unguided output (the negative tokens are perfectly isolated);
* ``batch_equals_separate_calls``: two prompts with negatives of different lengths in one call
  equal each prompt called alone, for every method;
* ``empty_negative_row_is_unguided``: ``negative_prompt=["", "..."]`` leaves the first prompt
  unguided;
* ``pipeline_cfg_guides_conditional_rows``: with the pipeline's own CFG on, only its
  conditional rows are guided, and VSF with ``bias=inf`` equals the pipeline's own CFG;
* ``dtype_and_device_kept``: a bfloat16 pipeline stays bfloat16 under every method;
* ``compiles_without_recompiles``: ``denoiser.compile(fullgraph=True)`` under guidance gives one
  set of graphs that a second call does not recompile, equal to eager;
* ``split_equals_dense``: the mask-free split path equals the dense-mask oracle;
* ``several_negatives``: ``negatives={n: 1.0}`` is ``negative_prompt=n`` (the same numbers), a
  weight-0 entry equals its absence, the order of negatives does not matter, a VSF weight 2
  equals the same negative twice, and two negatives guide differently from one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

import negguide
from negguide.installation import attention_processors
from negguide.installation import positional_names

#: the built-in methods every adapter must carry
METHODS: tuple[str, ...] = ("vsf", "nag", "nasa", "cfg")
ATTENTION_METHODS: tuple[str, ...] = ("vsf", "nag", "nasa")


@dataclasses.dataclass
class Case:
    """How the kit builds and calls one family's tiny pipeline.

    Args:
        build: returns a fresh tiny pipeline (random weights, offline, seconds on the CPU); called
            once per case (the checks share that pipeline, which every check leaves as it found it)
            and again where a check needs a copy (bfloat16).
        call: keyword arguments of a quick call (size, ``max_sequence_length``, ``output_type``
            ``"np"`` or ``"latent"``...); ``num_inference_steps`` defaults to ``steps``.
        prompts: two prompts for batch checks (the first is used alone elsewhere).
        negatives: two negative prompts of different token lengths.
        output: the attribute of the pipeline's output that holds the result (``"images"``,
            ``"frames"``).
        pipeline_cfg: keyword arguments that turn the pipeline's own CFG on (e.g.
            ``{"guidance_scale": 4.0, "negative_prompt": "ugly"}``), or ``None`` if it has none.
        steps: denoising steps of a call.
        atol: tolerance of "equal" outputs (float32 rounding across paths and batches).
        pm: a plugin manager holding the adapter (tests of an unregistered adapter); ``None``:
            the process-wide one (entry points).
        keep_fp32: the bfloat16 check keeps each denoiser's ``_keep_in_fp32_modules`` in float32, as
            ``from_pretrained(..., torch_dtype=torch.bfloat16)`` loads it (for models a plain ``.to(dtype)``
            breaks, e.g. Kandinsky 5's time embedding).
    """

    build: Callable[[], Any]
    call: Mapping[str, Any]
    prompts: tuple[str, str] = ("a red cat on a mat", "a green tree")
    negatives: tuple[str, str] = ("snow", "a dark and blurry photo of heavy rain")
    output: str = "images"
    pipeline_cfg: Mapping[str, Any] | None = None
    steps: int = 2
    atol: float = 2e-5
    pm: Any = None
    keep_fp32: bool = False
    _pipe: Any = dataclasses.field(default=None, init=False, repr=False)

    @property
    def pipe(self) -> Any:
        """The case's shared tiny pipeline (built on first use)."""
        if self._pipe is None:
            self._pipe = self.build()
        return self._pipe

    def run(self, pipe: Any | None = None, prompt: str | list[str] | None = None, seed: int | list[int] = 0,
            **kwargs: Any) -> np.ndarray:  # fmt: skip
        """One call of ``pipe`` (default: the case's) as a float64 array; a list of seeds: one generator per image."""
        pipe = self.pipe if pipe is None else pipe
        # a copy: some pipelines rewrite the prompts of a list in place (Z-Image applies its chat template)
        prompt = self.prompts[0] if prompt is None else list(prompt) if isinstance(prompt, list) else prompt
        if isinstance(seed, list):
            generator: Any = [torch.Generator().manual_seed(s) for s in seed]
        else:
            generator = torch.Generator().manual_seed(seed)
        call = {"num_inference_steps": self.steps, **self.call, **kwargs}
        with torch.no_grad():
            result = getattr(pipe(prompt=prompt, generator=generator, **call), self.output)
        if isinstance(result, torch.Tensor):
            result = result.float().cpu().numpy()
        return np.asarray(result, dtype=np.float64)

    def apply(self, pipe: Any | None = None, method: str = "vsf", **kwargs: Any) -> negguide.GuidanceHandle:
        """``negguide.apply`` on ``pipe`` (default: the case's) with the case's plugin manager."""
        return negguide.apply(self.pipe if pipe is None else pipe, method, pm=self.pm, **kwargs)

    def adapter(self, pipe: Any | None = None) -> negguide.Adapter:
        """The adapter the registry picks for ``pipe``."""
        from negguide.registry import adapter_for

        pipe = self.pipe if pipe is None else pipe
        return adapter_for(pipe, self.pm)(pipe)


# ---------------------------------------------------------------------- helpers


def _close(got: np.ndarray, want: np.ndarray, atol: float, what: str) -> None:
    if got.shape != want.shape:
        raise AssertionError(f"{what}: expected shape {want.shape}, got {got.shape}")
    err = float(np.abs(got - want).max()) if got.size else 0.0
    if not err <= atol:
        raise AssertionError(f"{what}: expected equal outputs (max |difference| <= {atol:g}), got {err:.3g}")


def _differs(got: np.ndarray, want: np.ndarray, what: str, by: float = 1e-6) -> None:
    err = float(np.abs(got - want).max())
    if not err > by:
        raise AssertionError(f"{what}: expected the guidance to change the output, got a difference of {err:.3g}")


def _snapshot(case: Case, pipe: Any) -> dict[str, Any]:
    denoisers = case.adapter(pipe).find_denoisers()
    return {
        "pipe": dict(pipe.__dict__),
        "denoisers": [
            (
                attention_processors(d),
                dict(d.__dict__),
                [dict(h) for h in (d._forward_pre_hooks, d._forward_hooks)],
                [dict(h) for h in (d._forward_pre_hooks_with_kwargs, d._forward_hooks_with_kwargs)],
            )
            for d in denoisers
        ],
    }


def _public(attrs: dict[str, Any]) -> dict[str, Any]:
    # a pipeline call rewrites its private per-call attributes (``_guidance_scale``...): compare those by name only
    return {k: v for k, v in attrs.items() if not k.startswith("_")}


def _assert_restored(case: Case, pipe: Any, before: dict[str, Any], what: str) -> None:
    after = _snapshot(case, pipe)
    for label, old, new in [("pipeline", before["pipe"], after["pipe"])] + [
        ("denoiser", b[1], a[1]) for b, a in zip(before["denoisers"], after["denoisers"])
    ]:
        changed = sorted(set(old) ^ set(new)) + sorted(k for k, v in _public(old).items() if new.get(k) is not v)
        if changed:
            raise AssertionError(f"{what}: expected the {label}'s attributes as before, got changes in {changed}")
    for (procs, _, hooks, hooks_kw), (procs2, _, hooks2, hooks_kw2) in zip(before["denoisers"], after["denoisers"]):
        moved = sorted(k for k in procs if procs2.get(k) is not procs[k])
        if moved or procs.keys() != procs2.keys():
            raise AssertionError(f"{what}: expected the original attention processors back, got others in {moved[:3]}")
        if hooks != hooks2 or hooks_kw != hooks_kw2:
            raise AssertionError(f"{what}: expected the denoiser's forward hooks as before, got others")


def _params(method: str, **extra: Any) -> dict[str, Any]:
    """Parameters that make each method act visibly on a random tiny model."""
    base = {"vsf": {"scale": 3.0, "bias": 0.1}, "nag": {"scale": 5.0}, "nasa": {"scale": 0.5}, "cfg": {"scale": 3.0}}
    return {**base[method], **extra}


@contextlib.contextmanager
def _fail_on_forward(denoiser: torch.nn.Module, number: int) -> Iterator[None]:
    """A denoiser forward pre-hook that raises on its ``number``-th call (1-based)."""
    count = [0]

    def hook(module: torch.nn.Module, args: Any) -> None:
        count[0] += 1
        if count[0] == number:
            raise RuntimeError("negguide.testing: an error in the middle of a call")

    handle = denoiser.register_forward_pre_hook(hook, prepend=True)
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------------- the checks


def check_remove_is_bit_exact(case: Case) -> None:
    """After ``remove()`` (also after an exception mid-call) the pipeline is exactly what it was."""
    pipe = case.pipe
    never = case.run(case.build())  # same seed, same weights, never patched
    case.run()  # a first call makes the pipeline's private per-call attributes (``_guidance_scale``...)
    before = _snapshot(case, pipe)
    for method in METHODS:
        handle = case.apply(method=method, negative_prompt=case.negatives[0], **_params(method))
        case.run()
        handle.remove()
        _assert_restored(case, pipe, before, f"{method}: after remove()")
        got = case.run()
        if not np.array_equal(got, never):
            raise AssertionError(f"{method}: expected a bit-identical output after remove(), got a difference of "
                                 f"{float(np.abs(got - never).max()):.3g}")  # fmt: skip
    denoiser = case.adapter().find_denoisers()[0]
    for method in ("vsf", "cfg"):
        try:
            with _fail_on_forward(denoiser, 2), case.apply(method=method, negative_prompt=case.negatives[0]):
                case.run()
        except RuntimeError as exc:
            if "in the middle of a call" not in str(exc):
                raise
        else:
            raise AssertionError(f"{method}: expected the planted error of the second forward, got none")
        _assert_restored(case, pipe, before, f"{method}: after an exception in the middle of a call")
        if not np.array_equal(case.run(), never):
            raise AssertionError(f"{method}: expected a bit-identical output after an exception mid-call")


def check_vsf_infinite_bias_is_unguided(case: Case) -> None:
    """VSF with ``bias=inf`` (the flipped copy fully masked) is the unguided pipeline, on both paths."""
    base = case.run()
    for path in ("dense", "split"):
        with case.apply(method="vsf", negative_prompt=case.negatives[1], bias=math.inf, attention=path):
            _close(case.run(), base, case.atol, f"vsf bias=inf attention={path}")
        with case.apply(method="vsf", negative_prompt=case.negatives[1], attention=path):
            _differs(case.run(), base, f"vsf attention={path}")


def check_nasa_zero_is_unguided(case: Case) -> None:
    """NASA with ``scale=0`` is the unguided pipeline."""
    base = case.run()
    for path in ("dense", "split"):
        with case.apply(method="nasa", negative_prompt=case.negatives[0], scale=0.0, attention=path):
            _close(case.run(), base, case.atol, f"nasa scale=0 attention={path}")


def check_batch_equals_separate_calls(case: Case) -> None:
    """Two prompts with their own negatives (different lengths: padded and masked) equal each prompt alone."""
    prompts, negatives = list(case.prompts), list(case.negatives)
    for method in METHODS:
        with case.apply(method=method, negative_prompt=negatives, **_params(method)):
            both = case.run(prompt=prompts, seed=[0, 1])
        for i in range(2):
            with case.apply(method=method, negative_prompt=negatives[i], **_params(method)):
                alone = case.run(prompt=prompts[i], seed=i)
            _close(both[i : i + 1], alone, case.atol, f"{method}: row {i} of a batch vs the prompt alone")


def check_empty_negative_row_is_unguided(case: Case) -> None:
    """``negative_prompt=["", n]``: the first prompt runs unguided, the second guided."""
    prompts = list(case.prompts)
    plain = case.run(prompt=prompts, seed=[0, 1])
    for method in ATTENTION_METHODS:
        with case.apply(method=method, negative_prompt=["", case.negatives[0]], **_params(method)):
            out = case.run(prompt=prompts, seed=[0, 1])
        _close(out[:1], plain[:1], case.atol, f"{method}: the row with an empty negative")
        _differs(out[1:], plain[1:], f"{method}: the row with a negative")


def check_pipeline_cfg_guides_conditional_rows(case: Case) -> None:
    """With the pipeline's own CFG on, exactly its conditional rows are guided (half of all rows the denoiser
    sees), and VSF with ``bias=inf`` equals the pipeline's own CFG."""
    if case.pipeline_cfg is None:
        return
    cfg = dict(case.pipeline_cfg)
    own = case.run(**cfg)
    with case.apply(method="vsf", negative_prompt=case.negatives[0], bias=math.inf):
        _close(case.run(**cfg), own, case.atol, "vsf bias=inf beside the pipeline's own CFG")
    adapter = case.adapter()
    denoiser = adapter.find_denoisers()[0]
    forwards: list[list[int]] = []
    installation: list[Any] = []

    def before(module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        inputs = {**dict(zip(positional_names(module), args)), **kwargs}  # SD pipelines pass the sample positionally
        sample = inputs[adapter.sample_input]
        forwards.append([len(sample) if isinstance(sample, (list, tuple)) else sample.shape[0], 0])  # Z-Image: a list

    def after(module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        fwd = installation[0].forward  # still set: this hook runs before negguide's (registered first)
        if fwd is not None:
            forwards[-1][1] = fwd.guided.stop - fwd.guided.start

    hooks = [denoiser.register_forward_pre_hook(before, with_kwargs=True),
             denoiser.register_forward_hook(after, with_kwargs=True)]  # fmt: skip
    try:
        with case.apply(method="vsf", negative_prompt=case.negatives[0]) as handle:
            installation.append(handle.installation)
            guided = case.run(**cfg)
    finally:
        for h in hooks:
            h.remove()
    _differs(guided, own, "vsf beside the pipeline's own CFG")
    total, conditional = sum(r for r, _ in forwards), sum(g for _, g in forwards)
    if conditional == 0 or 2 * conditional != total:
        raise AssertionError(f"expected the conditional half of the rows the denoiser saw to be guided, got "
                             f"{conditional} guided rows of {total} over {len(forwards)} forwards")  # fmt: skip


def check_dtype_and_device_kept(case: Case) -> None:
    """A bfloat16 pipeline stays bfloat16 on its device under every method (outputs finite)."""
    pipe = case.build().to(torch.bfloat16)
    denoiser = case.adapter(pipe).find_denoisers()[0]
    if case.keep_fp32:
        for d in case.adapter(pipe).find_denoisers():
            keep = getattr(d, "_keep_in_fp32_modules", None) or []
            for name, module in d.named_modules():
                if any(k in name.split(".") for k in keep):
                    module.float()
    seen: list[tuple[torch.dtype, torch.device]] = []

    def record(module: torch.nn.Module, args: Any, output: Any) -> None:
        out = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        for o in out if isinstance(out, (list, tuple)) else [out]:  # per-sample outputs (Z-Image)
            seen.append((o.dtype, o.device))

    hook = denoiser.register_forward_hook(record)
    try:
        for method in METHODS:
            with case.apply(pipe, method, negative_prompt=case.negatives[0], **_params(method)):
                out = case.run(pipe)
            if not np.isfinite(out).all():
                raise AssertionError(f"{method}: expected finite outputs from a bfloat16 pipeline, got NaN or inf")
    finally:
        hook.remove()
    device = next(denoiser.parameters()).device
    wrong = sorted({f"{d}/{v}" for d, v in seen if d != torch.bfloat16 or v != device})
    if wrong:
        raise AssertionError(f"expected the denoiser to return {torch.bfloat16} on {device}, got {wrong}")


def check_compiles_without_recompiles(case: Case) -> None:
    """``denoiser.compile(fullgraph=True)`` under guidance: no graph break, no recompile on a second call, = eager."""
    from torch._dynamo.utils import counters

    pipe = case.build()
    denoisers = case.adapter(pipe).find_denoisers()
    torch._dynamo.reset()
    counters.clear()
    try:
        with case.apply(pipe, "vsf", negative_prompt=case.negatives[0], attention="split"):
            eager = case.run(pipe)
            for d in denoisers:
                d.compile(backend="aot_eager", fullgraph=True)
            first = case.run(pipe)
            with torch._dynamo.config.patch(error_on_recompile=True):
                second = case.run(pipe)
    finally:
        for d in denoisers:
            d._compiled_call_impl = None
        torch._dynamo.reset()
    _close(first, eager, 1e-4, "compiled vs eager (first call)")
    _close(second, eager, 1e-4, "compiled vs eager (second call)")


def check_split_equals_dense(case: Case) -> None:
    """Every attention method gives the same output on the split and the dense path."""
    for method in ATTENTION_METHODS:
        outs = {}
        for path in ("dense", "split"):
            with case.apply(method=method, negative_prompt=case.negatives[1], attention=path, **_params(method)):
                outs[path] = case.run()
        _close(outs["split"], outs["dense"], case.atol, f"{method}: split vs dense")


def check_several_negatives(case: Case) -> None:
    """Weighted negatives: weight 1 is ``negative_prompt``, weight 0 is absence, order is irrelevant, VSF weights
    are multiplicities, and two negatives differ from one."""
    a, b = case.negatives
    for method in METHODS:
        p = _params(method)
        with case.apply(method=method, negative_prompt=a, **p):
            one = case.run()
        with case.apply(method=method, negatives={a: 1.0}, **p):
            got = case.run()
        if not np.array_equal(got, one):
            raise AssertionError(f"{method}: expected negatives={{{a!r}: 1.0}} to give exactly negative_prompt={a!r}")
        with case.apply(method=method, negatives={a: 1.0, b: 0.0}, **p):
            _close(case.run(), one, case.atol, f"{method}: a weight-0 negative vs its absence")
        with case.apply(method=method, negatives={a: 1.0, b: 0.5}, **p):
            ab = case.run()
        with case.apply(method=method, negatives=[(b, 0.5), (a, 1.0)], **p):
            _close(case.run(), ab, case.atol, f"{method}: the order of the negatives")
        _differs(ab, one, f"{method}: two negatives vs one")
    with case.apply(method="vsf", negatives=[(a, 2.0), (b, 1.0)]):
        weighted = case.run()
    with case.apply(method="vsf", negatives=[a, a, b]):
        _close(case.run(), weighted, case.atol, "vsf: weight 2 vs the same negative twice")


#: every check, by name
CHECKS: dict[str, Callable[[Case], None]] = {
    "batch_equals_separate_calls": check_batch_equals_separate_calls,
    "compiles_without_recompiles": check_compiles_without_recompiles,
    "dtype_and_device_kept": check_dtype_and_device_kept,
    "empty_negative_row_is_unguided": check_empty_negative_row_is_unguided,
    "nasa_zero_is_unguided": check_nasa_zero_is_unguided,
    "pipeline_cfg_guides_conditional_rows": check_pipeline_cfg_guides_conditional_rows,
    "remove_is_bit_exact": check_remove_is_bit_exact,
    "several_negatives": check_several_negatives,
    "split_equals_dense": check_split_equals_dense,
    "vsf_infinite_bias_is_unguided": check_vsf_infinite_bias_is_unguided,
}


def run_all(case: Case, skip: tuple[str, ...] = ()) -> None:
    """Run every check (but ``skip``) on ``case``; the first failure raises."""
    for name, check in sorted(CHECKS.items()):
        if name not in skip:
            check(case)
