"""The live installation of a method on one pipeline: everything negguide changes, and its exact undo.

One ``Installation`` per patched pipeline, made by ``negguide.apply``. It acts on an adapter's
facts (``negguide.adapter``) and never knows a family:

* ``pipe.<encode_method>`` is wrapped (an instance attribute): when the pipeline encodes its
  prompt, each negative is encoded with the pipeline's own encoders and the call's settings, and
  stacked into rows (padded and masked when lengths differ, repeated per image);
* each denoiser gets a forward pre-hook (the step window, the pipeline's own CFG rows, the
  negative tokens joined to the text input or, for prediction-level methods, the negative
  branches batched beside the positive one), a forward hook (combining the predictions), and a
  wrapped ``cache_context`` (which branch of the pipeline's CFG runs; under one of diffusers' caches a
  guided forward runs under a context name of its own, see ``check_cache``);
* attention-level methods: the processors of the attention modules that see text are replaced
  by ``GuidedProcessor``s (the originals are put back with ``set_attention_processors``).

``remove`` undoes all of it in reverse order. Any error raised by negguide's code during a call
(while encoding, in a hook, inside a guided attention call) removes the installation before it
propagates: after an error the pipeline is exactly as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import weakref
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import torch

from negguide.adapter import QKV
from negguide.adapter import Adapter
from negguide.adapter import Conditioning
from negguide.adapter import EncodeCall
from negguide.adapter import Projected
from negguide.adapter import TextLayout
from negguide.attention import choose_path
from negguide.attention import isolated
from negguide.errors import NegativePromptError
from negguide.errors import NegGuideError
from negguide.errors import NoAdapterError
from negguide.errors import warn
from negguide.method import AttentionMethod
from negguide.method import GuidanceMethod
from negguide.method import NegativeTokens
from negguide.method import PredictionMethod
from negguide.method import SegmentOutputs
from negguide.method import Segments
from negguide.negatives import NegativeSpec

#: ``cache_context`` names of a pipeline's unconditional branch: diffusers' pipelines call it ``"uncond"``, its guiders
#: (``diffusers.guiders``, run by HunyuanImage and the modular pipelines) ``"pred_uncond"`` (their
#: ``_input_predictions`` identifier); every other named branch is conditional
UNCOND_CONTEXTS: tuple[str, ...] = ("uncond", "pred_uncond")


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedNegative:
    """One negative, encoded for the rows of the current pipeline call (1 shared row or one per row)."""

    cond: Conditioning
    weight: float
    spec: NegativeSpec

    @property
    def num_tokens(self) -> int:
        """Tokens per row, padding included."""
        return self.cond.num_tokens

    @property
    def embeds(self) -> torch.Tensor:
        return self.cond.embeds

    @property
    def mask(self) -> torch.Tensor | None:
        return self.cond.mask

    @property
    def rows(self) -> int:
        return self.cond.embeds.shape[0]


@dataclasses.dataclass(frozen=True)
class Forward:
    """One guided forward of a denoiser: what its guided attention calls need (attention level)."""

    guided: slice  #: batch rows the method guides; the others run isolated (unguided)
    text: TextLayout
    spans: tuple[tuple[int, int], ...]  #: where each negative sits in the text stream
    masks: tuple[torch.Tensor | None, ...]  #: each negative's ``(batch, n_i)`` padding mask
    weights: tuple[float, ...]
    pos_mask: torch.Tensor | None
    has_negative: torch.Tensor | None  #: ``(batch,)``: rows with a negative token; None when every row has one
    carry: Any = None  #: what the adapter's ``join`` returned as ``Joined.carry`` (read by its ``patched`` methods)

    def segments(self, layout: str, projected: Projected) -> Segments:
        """Cut the projected text stream into ``P`` and each ``N_i``: views, no copies."""
        text, image = projected.text, projected.image

        def cut(x: torch.Tensor | None, a: int, b: int) -> torch.Tensor | None:
            return None if x is None else x[:, :, a:b]

        p = self.text.num_pos
        negatives = tuple(
            NegativeTokens(cut(text.q, a, b), text.k[:, :, a:b], text.v[:, :, a:b], mask, weight)  # type: ignore[index]
            for (a, b), mask, weight in zip(self.spans, self.masks, self.weights)
        )
        return Segments(
            layout,  # type: ignore[arg-type]
            image.q,  # type: ignore[arg-type]
            image.k,
            image.v,
            cut(text.q, 0, p),
            text.k[:, :, :p],  # type: ignore[index]
            text.v[:, :, :p],  # type: ignore[index]
            negatives,
            self.pos_mask,
            projected.scale,
        )


@dataclasses.dataclass(frozen=True)
class Branches:
    """One forward of a prediction-level method: the positive rows, then ``k`` negative branches of ``rows`` each."""

    batch: int
    guided: slice
    rows: int
    weights: tuple[float, ...]


class Installation:
    """A method installed on one pipeline through one adapter. Made by ``negguide.apply``; see the module docstring."""

    def __init__(self, pipe: Any, adapter: Adapter, method: GuidanceMethod, negatives: list[NegativeSpec]) -> None:
        self.pipe = pipe
        self.adapter = adapter
        self.method = method
        self.negatives = negatives
        #: the negatives encoded for the current pipeline call (None: no negative, the call runs unguided)
        self.encoded: list[EncodedNegative] | None = None
        #: the current pipeline call, as its ``encode_prompt`` told
        self.call: EncodeCall | None = None
        #: the guided forward in progress (attention level), read by the processors
        self.forward: Forward | None = None
        self.branches: Branches | None = None
        self._has_negative: torch.Tensor | None = None
        self._window_checked = False
        self._last: dict[int, tuple[Any, weakref.ref[torch.Tensor] | None]] = {}
        self._undo: list[Callable[[], None]] = []

    @property
    def active(self) -> bool:
        """Whether the pipeline is patched by this installation."""
        return bool(self._undo)

    # ------------------------------------------------------------------ install / remove

    def install(self) -> None:
        """Patch the pipeline. On any error everything done so far is undone before re-raising."""
        try:
            denoisers = self.adapter.find_denoisers()
            if not denoisers:
                raise NoAdapterError(
                    f"{self.adapter.family}: expected a denoiser in one of the pipeline attributes "
                    f"{list(self.adapter.denoisers)}, found none on {type(self.pipe).__name__}."
                )
            self._wrap_encode()
            for denoiser in denoisers:
                self._install_denoiser(denoiser)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Undo every change, in reverse order. Safe to call twice."""
        while self._undo:
            self._undo.pop()()
        self.encoded = None
        self.call = None
        self.forward = None
        self.branches = None
        self._has_negative = None
        self._last.clear()

    def _set_instance_attr(self, obj: Any, name: str, value: Any) -> None:
        had = name in obj.__dict__
        previous = obj.__dict__.get(name)
        if isinstance(obj, torch.nn.Module):
            setattr(obj, name, value)
        else:  # bypass DiffusionPipeline.__setattr__ (it registers config entries)
            object.__setattr__(obj, name, value)

        def undo() -> None:
            if had:
                obj.__dict__[name] = previous
            else:
                obj.__dict__.pop(name, None)

        self._undo.append(undo)

    @contextlib.contextmanager
    def _restoring(self) -> Iterator[None]:
        """Remove the installation when the block raises: after an error the pipeline is as before."""
        try:
            yield
        except BaseException:
            self.remove()
            raise

    # ------------------------------------------------------------------ encoding

    def _wrap_encode(self) -> None:
        name = self.adapter.encode_method
        original = getattr(self.pipe, name, None)
        if not callable(original):
            raise NoAdapterError(
                f"{self.adapter.family}: expected the pipeline to have `{name}` (it encodes the negatives with the "
                f"pipeline's own encoders), got {type(self.pipe).__name__} without it."
            )
        signature = inspect.signature(original)

        @functools.wraps(original)
        def encode(*args: Any, **kwargs: Any) -> Any:
            output = original(*args, **kwargs)
            with self._restoring():
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                self._on_encode(dict(bound.arguments), output, original)
            return output

        self._set_instance_attr(self.pipe, name, encode)

    def _on_encode(self, arguments: dict[str, Any], output: Any, original: Callable[..., Any]) -> None:
        self._last.clear()  # a pipeline call starts by encoding its prompt
        positive = self.adapter.positive(output)
        per_prompt = arguments.get(self.adapter.num_per_prompt_arg) or 1
        call = EncodeCall(arguments, output, positive.shape[0], int(per_prompt), positive.device, positive.dtype,
                          original)  # fmt: skip
        self.call = call
        padded = isinstance(self.method, PredictionMethod)
        encoded = []
        for spec in self.negatives:
            if spec.embeds is not None:
                cond = self._rows_for_call(self.adapter.negative_from_embeds(spec.embeds, call, padded), call, spec)
            else:
                cond = self._encode_texts(spec, call, padded)
            encoded.append(EncodedNegative(self._on_call_device(cond, call), spec.weight, spec))
        width = positive.shape[-1]
        for e in encoded:
            if e.embeds.ndim != 3 or e.embeds.shape[-1] != width:
                raise NegativePromptError(
                    f"{self.adapter.family}: expected the negative {e.spec.describe()} as (rows, tokens, {width}) "
                    f"embeddings (the width of this call's prompt embeddings), got shape {tuple(e.embeds.shape)}. "
                    "Encode the negative with this pipeline's own `encode_prompt`."
                )
        if not padded:
            # a negative without a single token in any row is no negative (and never reaches a kernel)
            empty = [e for e in encoded if e.num_tokens == 0 or (e.mask is not None and not bool(e.mask.any()))]
            for e in empty:
                warn(
                    f"negguide: the negative {e.spec.describe()} has no token for any prompt of this call: "
                    + ("the call runs unguided." if len(empty) == len(encoded) else "it is left out.")
                    + " Pass a non-empty negative prompt."
                )
            encoded = [e for e in encoded if e not in empty]
        self.encoded = encoded or None
        self._window_checked = False
        self._has_negative = None
        if self.encoded and not padded and any(e.mask is not None for e in self.encoded):
            has = torch.zeros(call.batch, dtype=torch.bool, device=call.device)
            for e in self.encoded:
                rows = torch.ones(e.rows, dtype=torch.bool, device=call.device) if e.mask is None else e.mask.any(1)
                has = has | rows.to(call.device).expand(call.batch)
            if not bool(has.all()):
                self._has_negative = has  # some row has no negative token at all: it runs unguided

    def _encode_texts(self, spec: NegativeSpec, call: EncodeCall, padded: bool) -> Conditioning:
        texts = spec.text
        shared = isinstance(texts, str)
        per_prompt = [texts] if shared else list(texts)  # type: ignore[arg-type]
        if not shared and len(per_prompt) != call.prompts:
            raise NegativePromptError(
                f"{self.method.name}: expected one negative prompt per prompt ({call.prompts}), got a list of "
                f"{len(per_prompt)}. Pass a single string to share one negative, or a list as long as the prompts."
            )
        width = self.adapter.positive(call.output).shape[-1]
        encoded: dict[str, Conditioning] = {}
        for text in per_prompt:
            if text in encoded:
                continue
            if not padded and not text.strip():  # an empty negative: a row with no token
                empty = torch.zeros(1, 0, width, device=call.device, dtype=call.dtype)
                encoded[text] = Conditioning(empty)
            else:
                encoded[text] = self.adapter.encode_negative(text, call, padded)
        cond = stack([encoded[t] for t in per_prompt], call.device)
        if shared or call.num_per_prompt == 1:
            return cond
        return _repeat_rows(cond, call.num_per_prompt)

    def _rows_for_call(self, cond: Conditioning, call: EncodeCall, spec: NegativeSpec) -> Conditioning:
        rows = cond.embeds.shape[0]
        if rows in (1, call.batch):
            return cond
        if rows == call.prompts:
            return _repeat_rows(cond, call.num_per_prompt)
        choices = {1: "1 (shared)"}
        choices.setdefault(call.prompts, f"{call.prompts} (one per prompt)")
        choices.setdefault(call.batch, f"{call.batch} (one per image)")
        raise NegativePromptError(
            f"{self.method.name}: expected negative embeddings with {' or '.join(choices.values())} rows for this "
            f"call of {call.prompts} prompt(s) x {call.num_per_prompt} image(s), got {rows} rows in "
            f"{spec.describe()}. Pass one row per prompt of the pipeline call, or one shared row."
        )

    @staticmethod
    def _on_call_device(cond: Conditioning, call: EncodeCall) -> Conditioning:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=call.device, dtype=call.dtype) if t.is_floating_point() else t.to(call.device)

        mask = None if cond.mask is None else cond.mask.to(device=call.device, dtype=torch.bool)
        return Conditioning(move(cond.embeds), mask, {k: move(v) for k, v in cond.extras.items()})

    # ------------------------------------------------------------------ denoisers

    def _install_denoiser(self, denoiser: torch.nn.Module) -> None:
        check_cache(denoiser, self.method)
        context: dict[str, Any] = {"name": None, "kwargs": {}}
        original_cache_context = getattr(denoiser, "cache_context", None)
        if original_cache_context is not None:

            @contextlib.contextmanager
            def cache_context(name: str, *args: Any, **kwargs: Any) -> Iterator[None]:
                context["name"], context["kwargs"] = name, kwargs
                try:
                    with original_cache_context(name, *args, **kwargs):
                        yield
                finally:
                    context["name"], context["kwargs"] = None, {}

            self._set_instance_attr(denoiser, "cache_context", cache_context)

        if isinstance(self.method, AttentionMethod):
            self._install_processors(denoiser)
            self._install_patches(denoiser)

        positional = positional_names(denoiser)

        def pre_hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            with self._restoring():
                if args and len(args) <= len(positional):
                    # pipelines may pass the first inputs positionally (SD's ``unet(latents, t, ...)``): name them
                    kwargs = {**dict(zip(positional, args)), **kwargs}
                    args = ()
                check_cache(module, self.method)  # a cache enabled after `apply`
                kwargs = self._before_forward(module, kwargs, context["name"])
                if self.forward is not None or self.branches is not None:
                    _guided_cache_context(module, context, GUIDED_CACHE_SUFFIX)
                return args, kwargs

        def post_hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            try:
                with self._restoring():
                    return self._after_forward(output)
            finally:
                if self.forward is not None or self.branches is not None:
                    _guided_cache_context(module, context, "")
                self.forward = None
                self.branches = None

        # The hooks are host-side (they read the scheduler's step index and set the forward's state): kept
        # out of torch.compile even under ``transformer.compile()``, else every step would recompile.
        h1 = denoiser.register_forward_pre_hook(torch.compiler.disable(pre_hook), with_kwargs=True)
        h2 = denoiser.register_forward_hook(torch.compiler.disable(post_hook), with_kwargs=True)
        self._undo.append(h1.remove)
        self._undo.append(h2.remove)

    def _install_processors(self, denoiser: torch.nn.Module) -> None:
        saved = attention_processors(denoiser)
        modules = self.adapter.attention_modules(denoiser)
        unknown = sorted(set(modules) - set(saved))
        if unknown:
            raise NoAdapterError(
                f"{self.adapter.family}: the adapter names attention processors the denoiser does not have: {unknown}; "
                f"expected names from `attn_processors` such as {sorted(saved)[:3]}."
            )
        for name in sorted(modules):
            check_parallel(saved[name], self.adapter, self.method.name, name)
        num_layers = self.adapter.num_layers(denoiser)
        self.method.config.check_layers(num_layers, self.adapter.family, self.method.name)  # type: ignore[attr-defined]
        new = {
            name: guided_processor(self, proc, modules[name], num_layers) if name in modules else proc
            for name, proc in saved.items()
        }
        set_attention_processors(denoiser, new)
        self._undo.append(lambda: set_attention_processors(denoiser, saved))

    def _install_patches(self, denoiser: torch.nn.Module) -> None:
        """Replace the denoiser methods the adapter names in ``patched_methods`` (instance attributes, undone)."""
        for name in self.adapter.patched_methods:
            # a dotted name is a submodule's method ("context_embedder.forward"): patched on that submodule
            path, _, attr = name.rpartition(".")
            try:
                owner = denoiser.get_submodule(path) if path else denoiser
            except AttributeError:
                owner = None
            original = getattr(owner, attr, None)
            if owner is None or isinstance(original, torch.nn.Module) or not callable(original):
                raise NoAdapterError(
                    f"{self.adapter.family}: the adapter patches the denoiser method `{name}`, which "
                    f"{type(denoiser).__name__} does not have. Is this diffusers version supported?"
                )
            self._set_instance_attr(owner, attr, self._patched(name, original))

    def _patched(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        adapter = self.adapter

        @functools.wraps(original)
        def method(*args: Any, **kwargs: Any) -> Any:
            fwd = self.forward
            if fwd is None:  # outside a guided forward: the original, untouched
                return original(*args, **kwargs)
            try:
                return adapter.patched(name, original, fwd, *args, **kwargs)
            except Exception:
                self.remove()
                raise

        return method

    # ------------------------------------------------------------------ per forward

    def current_step(self, timestep: Any = None) -> tuple[int, int]:
        """``(step, num_steps)`` of the denoising loop, read host-side from the scheduler.

        Schedulers with a ``step_index`` (Euler, DPM-Solver, UniPC, flow matching, LCM...) give it once they
        have stepped; before that, for schedulers without one (DDIM, PNDM, DDPM), and for pipelines that step
        copies of ``pipe.scheduler`` (SkyReels-V2's diffusion forcing: one per frame), the forward's ``timestep``
        is looked up in the scheduler's ``timesteps`` (its first occurrence: PNDM repeats one; per-frame or
        per-token timesteps count by their largest, the noisiest frame's step).
        """
        scheduler = getattr(self.pipe, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        total = len(timesteps) if timesteps is not None else 1
        begin = getattr(scheduler, "begin_index", None) or 0
        index = getattr(scheduler, "step_index", None)
        if index is None and timesteps is not None and timestep is not None:
            index = _timestep_index(timesteps, timestep)
        # outside a denoising loop (no index yet, or a finished loop) a call counts as the first step
        index = begin if index is None or index >= total else index
        order = getattr(scheduler, "order", 1) or 1
        return (index - begin) // order, max(1, (total - begin) // order)

    def _uncond_rows(
        self, denoiser: torch.nn.Module, kwargs: dict[str, Any], context: str | None, batch: int
    ) -> slice | None:
        """Rows of this forward that are the pipeline's own unconditional branch (None: every row is conditional)."""
        if context in UNCOND_CONTEXTS:
            return slice(None)
        if self.adapter.pipeline_cfg == "batched":
            return self.adapter.uncond_rows(kwargs, self.call, batch)
        # separate forwards: without a cache_context name, the second forward of a step with other text is uncond
        text = kwargs.get(self.adapter.text_input)
        step = getattr(getattr(self.pipe, "scheduler", None), "step_index", None)
        last = self._last.get(id(denoiser))
        previous = None if last is None or last[1] is None else last[1]()
        self._last[id(denoiser)] = (step, weakref.ref(text) if isinstance(text, torch.Tensor) else None)
        second = last is not None and last[0] == step and text is not None and previous is not text
        return slice(None) if context is None and second else None

    def _before_forward(self, denoiser: torch.nn.Module, kwargs: dict[str, Any], context: str | None) -> dict[str, Any]:
        self.forward = None
        self.branches = None
        sample = kwargs.get(self.adapter.sample_input)
        if not isinstance(sample, torch.Tensor) and not _is_tensor_list(sample):
            if self.encoded is None:
                return kwargs
            raise NegGuideError(
                f"{self.adapter.family}: expected the denoiser's input `{self.adapter.sample_input}` as a tensor or "
                f"a list of per-sample tensors, got {type(sample).__name__}."
            )
        batch = len(sample) if isinstance(sample, (list, tuple)) else sample.shape[0]
        uncond = self._uncond_rows(denoiser, kwargs, context, batch)
        if self.encoded is None:
            return kwargs
        step, total = self.current_step(kwargs.get("timestep"))
        if not self._window_checked:
            self._window_checked = True
            config = self.method.config
            if config.enabled and not any(config.active(i, total) for i in range(total)):
                warn(
                    f"negguide: {self.method.name} guides no step of this {total}-step call: the window "
                    f"start={config.start}, stop={config.stop} covers the steps from int(start * {total}) = "
                    f"{int(config.start * total)} to int(stop * {total}) = {int(config.stop * total)} (exclusive). "
                    "Widen the window or use more steps."
                )
        if not self.method.config.active(step, total):
            return kwargs
        guided = _complement(uncond, batch)
        if guided is None:
            return kwargs
        n_guided = guided.stop - guided.start
        for e in self.encoded:
            # a pipeline that repeats each prompt's rows per image after encoding (Z-Image) has k rows per negative row
            if n_guided % e.rows:
                raise NegativePromptError(
                    f"{self.method.name}: the negative {e.spec.describe()} has {e.rows} rows, the guided branch of "
                    f"this forward {n_guided}. Pass one negative per prompt or a single shared one."
                )
        if isinstance(self.method, PredictionMethod):
            return self._negative_branches(kwargs, batch, guided)
        return self._join_negatives(kwargs, batch, guided, denoiser)

    def _join_negatives(
        self, kwargs: dict[str, Any], batch: int, guided: slice, denoiser: torch.nn.Module | None = None
    ) -> dict[str, Any]:
        text = kwargs.get(self.adapter.text_input)
        if _is_tensor_list(text):  # per-sample text tensors (Z-Image): the adapter's join reads them
            text = text[0]
        if not isinstance(text, torch.Tensor):
            raise NegGuideError(
                f"{self.adapter.family}: expected the denoiser's text input `{self.adapter.text_input}` as a tensor "
                f"or a list of per-sample tensors, got {type(text).__name__}."
            )
        assert self.encoded is not None
        negatives = [_forward_rows(e.cond, batch, guided, text) for e in self.encoded]
        shards = context_parallel_size(denoiser) if self.adapter.context_parallel == "split" else 1
        if shards > 1:  # the text stream is sharded with the sequence: its length must divide the ranks
            negatives[-1] = _pad_tokens(negatives[-1], -(text.shape[1] + sum(c.num_tokens for c in negatives)) % shards)
        joined = self.adapter.join_negatives(kwargs, negatives)
        if joined.spans:  # the adapter lays the text stream out itself (several text inputs)
            if len(joined.spans) != len(negatives) or len(joined.masks) not in (0, len(negatives)):
                raise NegGuideError(
                    f"{self.adapter.family}: expected `Joined.spans` (and `Joined.masks`, if any) for each of the "
                    f"{len(negatives)} negatives, got {len(joined.spans)} spans and {len(joined.masks)} masks."
                )
            spans = list(joined.spans)
            masks = list(joined.masks) or [None] * len(spans)
            start = max(b for _, b in spans)
        else:
            spans, masks, start = [], [], joined.num_pos
            for c in negatives:
                spans.append((start, start + c.num_tokens))
                masks.append(c.mask)
                start += c.num_tokens
        masks = [None if m is None else m.to(device=text.device, dtype=torch.bool) for m in masks]
        has = None
        if self._has_negative is not None:
            n_guided = guided.stop - guided.start
            has = torch.ones(batch, dtype=torch.bool, device=text.device)
            has[guided] = _expand(self._has_negative, n_guided).to(text.device)
        pos_mask = None if joined.pos_mask is None else joined.pos_mask.to(device=text.device, dtype=torch.bool)
        self.forward = Forward(
            guided, TextLayout(joined.num_pos, start, tuple(spans), joined.carry), tuple(spans), tuple(masks),
            tuple(e.weight for e in self.encoded), pos_mask, has, joined.carry,
        )  # fmt: skip
        return joined.kwargs

    def _negative_branches(self, kwargs: dict[str, Any], batch: int, guided: slice) -> dict[str, Any]:
        assert self.encoded is not None
        adapter = self.adapter
        n = guided.stop - guided.start
        kwargs = self._text_at_common_length(kwargs)
        out = dict(kwargs)
        parts: dict[str, list[torch.Tensor]] = {}

        def read(name: str) -> Any:  # a denoiser input, its batch axis first
            value = _lookup(kwargs, name)
            axis = adapter.batch_dims.get(name, 0)
            return value.movedim(axis, 0) if axis and isinstance(value, torch.Tensor) else value

        for name in _entries(kwargs, adapter.batched_inputs):
            value = read(name)
            if _is_tensor_list(value):  # one tensor per sample (Z-Image)
                parts[name] = [list(value[guided])] * len(self.encoded)
                continue
            if name in adapter.conditioning_inputs or not isinstance(value, torch.Tensor) or value.ndim == 0:
                continue
            if value.shape[0] % batch:
                continue  # not batched after all (a shared tensor)
            per_row = value.shape[0] // batch
            rows = value[guided.start * per_row : guided.stop * per_row]
            parts[name] = [rows] * len(self.encoded)
        for name, field in adapter.conditioning_inputs.items():
            target = read(name)
            if _is_tensor_list(target):  # per-sample text of its own length (Z-Image): each row's real tokens
                if field != "embeds":
                    raise NegativePromptError(
                        f"{adapter.family}: expected the per-sample denoiser input `{name}` to take the negative's "
                        f"`embeds`, got `{field}`."
                    )
                parts[name] = [_real_tokens(e.cond, n, target[0]) for e in self.encoded]
                continue
            if not isinstance(target, torch.Tensor):
                continue
            parts[name] = [self._conditioning_rows(e, field, name, target, n) for e in self.encoded]
        for name, values in parts.items():
            value = read(name)
            if isinstance(value, (list, tuple)):
                _store(out, name, [*value, *(t for v in values for t in v)])
            else:
                _store(out, name, torch.cat([value, *values], dim=0).movedim(0, adapter.batch_dims.get(name, 0)))
        self.branches = Branches(batch, guided, n, tuple(e.weight for e in self.encoded))
        return out

    def _masked_text(self) -> bool:
        """Whether the negative branches carry the text's padding mask (the family's text mask is a conditioning
        input): then zero padding, masked, changes no real token, and texts of any length batch together."""
        adapter = self.adapter
        return (
            adapter.text_mask_input is not None
            and adapter.conditioning_inputs.get(adapter.text_input) == "embeds"
            and adapter.conditioning_inputs.get(adapter.text_mask_input) == "mask"
        )

    def _text_at_common_length(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """A masked text (``_masked_text``): the positive text zero-padded to the longest negative and masked, its
        mask made (every token real) when the pipeline passed none but a negative needs padding; shorter negatives
        are padded in ``_conditioning_rows``."""
        text = kwargs.get(self.adapter.text_input)
        if not self._masked_text() or not isinstance(text, torch.Tensor) or text.ndim != 3:
            return kwargs
        assert self.encoded is not None and self.adapter.text_mask_input is not None
        mask_name = self.adapter.text_mask_input
        length = max(text.shape[1], *(e.num_tokens for e in self.encoded))
        mask = kwargs.get(mask_name)
        padded = any(e.num_tokens < length or e.mask is not None for e in self.encoded)
        if length == text.shape[1] and (mask is not None or not padded):
            return kwargs
        if mask is None:
            mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        extra = length - text.shape[1]
        out = dict(kwargs)
        out[self.adapter.text_input] = torch.nn.functional.pad(text, (0, 0, 0, extra))
        out[mask_name] = torch.nn.functional.pad(mask, (0, extra))
        return out

    def _conditioning_rows(
        self, e: EncodedNegative, field: str, name: str, target: torch.Tensor, n: int
    ) -> torch.Tensor:
        cond = e.cond
        if field == "embeds":
            value = cond.embeds
        elif field == "mask":
            value = cond.mask if cond.mask is not None else torch.ones(cond.embeds.shape[:2], dtype=torch.bool)
        elif field in cond.extras:
            value = cond.extras[field]
        else:
            raise NegativePromptError(
                f"{self.adapter.family}: {self.method.name} runs the negative branch with the denoiser input `{name}`, "
                f"which needs the negative's `{field}`; the negative {e.spec.describe()} has none. Pass it with the "
                "embeddings (see the adapter's documentation of `negative_prompt_embeds`)."
            )
        if not isinstance(value, torch.Tensor) or value.shape[0] not in (1, n):
            raise NegativePromptError(
                f"{self.adapter.family}: expected the negative's `{field}` as a tensor with 1 or {n} rows for the "
                f"denoiser input `{name}` {tuple(target.shape)}, got "
                f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}."
            )
        if field not in ("embeds", "mask") and tuple(value.shape[1:]) != tuple(target.shape[1:]):
            raise NegativePromptError(
                f"{self.adapter.family}: expected the negative's `{field}` of shape (rows, "
                f"{', '.join(str(d) for d in target.shape[1:])}) like the prompt's `{name}`, got "
                f"{tuple(value.shape)}. Pass the pipeline's own encoding of the negative."
            )
        value = _expand(value, n).to(device=target.device, dtype=target.dtype)
        if field in ("embeds", "mask") and value.ndim >= 2 and value.shape[1] != target.shape[1]:
            length = target.shape[1]
            if field == "mask" and value.shape[1] < length and self.adapter.pad_mask_with_ones:
                ones = value.new_ones(value.shape[0], length - value.shape[1], *value.shape[2:])
                value = torch.cat([value, ones], dim=1)
            elif value.shape[1] < length and (self.adapter.pad_text_with_zeros or self._masked_text()):
                pad = [0, 0] * (value.ndim - 2) + [0, length - value.shape[1]]
                value = torch.nn.functional.pad(value, pad)
            else:
                raise NegativePromptError(
                    f"{self.adapter.family}: {self.method.name} runs the negative branch batched beside the positive "
                    f"one, so it expected {length} negative tokens (the positive's), got {value.shape[1]} in "
                    f"{e.spec.describe()}. Encode the negative with the same `max_sequence_length` as the prompt."
                )
        return value

    def _after_forward(self, output: Any) -> Any:
        """Combine the predictions of a prediction-level forward: the first output (``sample``), and every other
        output with the forward's rows (a denoiser with several predictions, such as LTX-2's video and audio)."""
        br = self.branches
        if br is None:
            return output
        assert isinstance(self.method, PredictionMethod)
        rows = br.batch + len(br.weights) * br.rows
        if isinstance(output, tuple):
            return tuple(self._combine(o) if i == 0 or _has_rows(o, rows) else o for i, o in enumerate(output))
        output.sample = self._combine(output.sample)
        for key, value in list(output.items()):  # a dict-like output (diffusers' BaseOutput): the other predictions
            if key != "sample" and _has_rows(value, rows):
                output[key] = self._combine(value)
        return output

    def _combine(self, sample: Any) -> Any:
        """One prediction of the forward: the positive rows, the guided ones combined with their negative branches."""
        br = self.branches
        assert br is not None and isinstance(self.method, PredictionMethod)
        per_sample = isinstance(sample, (list, tuple))
        if per_sample:  # one prediction per sample (Z-Image): all of one shape
            sample = torch.stack(list(sample))
        batch, k, n = br.batch, len(br.weights), br.rows
        pos = sample[:batch]
        negatives = [sample[batch + i * n : batch + (i + 1) * n] for i in range(k)]
        combined = self.method.combine(pos[br.guided], negatives, list(br.weights))
        if br.guided == slice(0, batch):
            result = combined
        else:
            result = pos.clone()
            result[br.guided] = combined
        if per_sample:
            result = list(result.unbind(0))
        return result

    # ------------------------------------------------------------------ inside a guided attention call

    def run_method(self, seg: Segments, processor: GuidedProcessor) -> SegmentOutputs:
        """The method on the guided rows of a guided block; everything else isolated (unguided).

        Reads the processor's ``layer_guided`` (whether the method's ``layers`` include its block,
        decided when the processor is made, so no block index reaches a compiled graph).
        """
        layer_guided = processor.layer_guided
        method = self.method
        assert isinstance(method, AttentionMethod)
        fwd = self.forward
        assert fwd is not None
        path = choose_path(method.config.attention, seg)
        if not layer_guided:
            return isolated(seg, path)
        batch = seg.q_img.shape[0]
        start, stop = fwd.guided.start or 0, batch if fwd.guided.stop is None else fwd.guided.stop
        if start == 0 and stop == batch:
            return self._attend(seg, path, fwd.has_negative)
        parts = []
        if start > 0:
            parts.append(isolated(seg.rows(slice(0, start)), path))
        has = None if fwd.has_negative is None else fwd.has_negative[start:stop]
        parts.append(self._attend(seg.rows(slice(start, stop)), path, has))
        if stop < batch:
            parts.append(isolated(seg.rows(slice(stop, batch)), path))

        def cat(values: list[torch.Tensor | None]) -> torch.Tensor | None:
            return None if values[0] is None else torch.cat(values, dim=0)  # type: ignore[arg-type]

        negs = tuple(cat([p.negs[i] for p in parts]) for i in range(len(parts[0].negs)))
        return SegmentOutputs(cat([p.img for p in parts]), cat([p.pos for p in parts]), negs)  # type: ignore[arg-type]

    def _attend(self, seg: Segments, path: str, has: torch.Tensor | None) -> SegmentOutputs:
        """The method on guided rows; a row without any negative token (empty prompts) stays unguided."""
        out = self.method.attend(seg)  # type: ignore[union-attr]
        if seg.layout == "joint" and (out.pos is None or len(out.negs) != len(seg.negatives)):
            raise NegGuideError(
                f"{self.method.name}: expected the outputs of the positive text and of each of the "
                f"{len(seg.negatives)} negatives in the joint layout, got "
                f"pos={'None' if out.pos is None else 'a tensor'} and {len(out.negs)} negative outputs. "
                "Return SegmentOutputs(img, pos, negs) (see negguide.attention.isolated)."
            )
        if has is None:
            return out
        # decided once per call (host-side), selected per row here without a data-dependent branch
        iso = isolated(seg, path)  # type: ignore[arg-type]
        keep = has.to(seg.q_img.device)[:, None, None, None]

        def pick(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
            return None if a is None else torch.where(keep, a, b)  # type: ignore[arg-type]

        negs = tuple(pick(a, b) for a, b in zip(out.negs, iso.negs))
        return SegmentOutputs(pick(out.img, iso.img), pick(out.pos, iso.pos), negs)  # type: ignore[arg-type]


class GuidedProcessor:
    """The processor that replaces a text-seeing attention module's own, for one installation.

    Outside a guided forward it calls the original processor with the very same arguments, so
    unguided forwards are bit-identical. In a guided forward the adapter projects the call into
    queries, keys and values, the installation cuts them into segments and runs the method, and
    the adapter finishes the call. Its ``__call__`` carries the original processor's signature
    (attention modules filter keyword arguments by it), see ``guided_processor``.
    """

    def __init__(self, installation: Installation, original: Any, index: int, num_layers: int) -> None:
        self.installation = installation
        self.adapter = installation.adapter
        self.original = original
        self.index = index
        self.num_layers = num_layers
        #: whether the method guides this block (decided here, host-side; see ``Installation.run_method``)
        self.layer_guided = installation.method.config.guides_layer(index, num_layers)

    def __call__(self, attn: Any, *args: Any, **kwargs: Any) -> Any:
        return self.dispatch(attn, *args, **kwargs)

    # diffusers' attention backends and context parallelism read and write these two attributes on every
    # processor that has them (``set_attention_backend``, ``reset_attention_backend``, ``enable_parallelism``):
    # they live on the original processor, so that its unguided calls use them and ``remove`` keeps them. A
    # processor without them has none here either (``hasattr`` is False, as diffusers checks).

    @property
    def _attention_backend(self) -> Any:
        return self.original._attention_backend

    @_attention_backend.setter
    def _attention_backend(self, value: Any) -> None:
        self.original._attention_backend = value

    @property
    def _parallel_config(self) -> Any:
        return self.original._parallel_config

    @_parallel_config.setter
    def _parallel_config(self, value: Any) -> None:
        self.original._parallel_config = value

    def dispatch(self, attn: Any, *args: Any, **kwargs: Any) -> Any:
        """One call of the attention module: the original processor, or the guided path."""
        installation = self.installation
        fwd = installation.forward
        if fwd is None:
            return self.original(attn, *args, **kwargs)
        try:
            shard = context_shard(self.original, self.adapter, installation.method.name)
            layout_text = fwd.text if shard is None else shard.local_text(fwd.text)
            projected = self.adapter.project(attn, layout_text, *args, **kwargs)
            if projected is None:
                return self.original(attn, *args, **kwargs)
            layout = self.adapter.layout
            whole = projected if shard is None else shard.gather(projected)
            out = installation.run_method(fwd.segments(layout, whole), self)
            text = None if layout == "cross" else torch.cat([out.pos, *out.negs], dim=2)  # type: ignore[list-item]
            if shard is not None and text is not None:
                text = shard.local_rows(text)
            return self.adapter.finish(attn, projected, out.img, text)
        except Exception:
            installation.remove()  # an error inside a guided call leaves the pipeline as before
            raise


def _context_parallel_config(holder: Any) -> Any:
    """The ``ContextParallelConfig`` ``enable_parallelism`` recorded on a processor or a denoiser, or None."""
    config = getattr(holder, "_parallel_config", None)
    return None if config is None else getattr(config, "context_parallel_config", None)


def context_parallel_size(denoiser: Any) -> int:
    """Ranks the denoiser's sequence is sharded over by diffusers' context parallelism (1: none)."""
    config = _context_parallel_config(denoiser)
    return 1 if config is None else int(getattr(config, "_world_size", None) or 1)


@dataclasses.dataclass(frozen=True)
class Shard:
    """This rank's part of a context-parallel attention call (diffusers' ``enable_parallelism``).

    diffusers cuts the joint sequence into ``size`` equal chunks along the tokens, rank ``rank`` keeping chunk
    ``rank``, for the image and (``split_text``) the text stream. A guided call keeps its own image queries and
    gathers everything else from every rank: all keys and values (so every query sees every key, with VSF's
    per-key bias and the negatives' masks on the whole sequence, whatever the Ulysses or ring degrees) and the
    text queries (the text is short: every rank computes the whole text stream's rows and keeps its chunk).
    """

    group: Any
    rank: int
    size: int
    split_text: bool

    def local_text(self, text: TextLayout) -> TextLayout:
        """The text layout this rank's processor inputs have (its chunk of the text stream, when split)."""
        return dataclasses.replace(text, num_text=text.num_text // self.size) if self.split_text else text

    def _all(self, x: torch.Tensor | None) -> torch.Tensor | None:
        import torch.distributed as dist

        if x is None:
            return None
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=2)

    def gather(self, projected: Projected) -> Projected:
        """The call with this rank's image queries and every rank's keys, values and text queries."""
        image, text = projected.image, projected.text
        gathered_text = text if not self.split_text else QKV(self._all(text.q), self._all(text.k), self._all(text.v))
        gathered_image = QKV(image.q, self._all(image.k), self._all(image.v))
        return dataclasses.replace(projected, image=gathered_image, text=gathered_text)

    def local_rows(self, text: torch.Tensor) -> torch.Tensor:
        """This rank's chunk of the whole text stream's outputs ``(batch, heads, tokens, dim)``."""
        if not self.split_text:
            return text
        n = text.shape[2] // self.size
        return text[:, :, self.rank * n : (self.rank + 1) * n]


def context_shard(processor: Any, adapter: Adapter, method: str, name: str = "") -> Shard | None:
    """This rank's `Shard` when ``processor`` runs under diffusers' context parallelism, else None.

    Raises:
        NegGuideError: the family's adapter does not say how its text is sharded (``Adapter.context_parallel``),
            or the shards are uneven (``ulysses_anything`` / ``ring_anything``).
    """
    config = _context_parallel_config(processor)
    if config is None:
        return None
    where = f" ({name})" if name else ""
    if adapter.context_parallel is None:
        raise NegGuideError(
            f"{method}: expected attention processors without context parallelism on {adapter.family}, got "
            f"{type(processor).__name__}{where} with a `_parallel_config` set by `enable_parallelism`; negguide "
            f"has not checked how the {adapter.family} family shards its text (`Adapter.context_parallel`). Run the "
            "guided pipeline without `enable_parallelism` (one device per pipeline); Flux and Wan support it."
        )
    if getattr(config, "ulysses_anything", False) or getattr(config, "ring_anything", False):
        raise NegGuideError(
            f"{method}: expected equal shards under context parallelism, got `ulysses_anything` or `ring_anything` "
            f"on {type(processor).__name__}{where}; use ContextParallelConfig(ulysses_degree=...) or "
            "ring_degree=... without them."
        )
    mesh = getattr(config, "_flattened_mesh", None)
    if mesh is None:
        raise NegGuideError(
            f"{method}: expected a context-parallel config set up by `enable_parallelism` (a device mesh), got "
            f"{type(config).__name__} without one on {type(processor).__name__}{where}; call "
            "`transformer.enable_parallelism(config=...)` after `torch.distributed.init_process_group`."
        )
    import torch.distributed as dist

    group = mesh.get_group()
    return Shard(group, dist.get_rank(group), dist.get_world_size(group), adapter.context_parallel == "split")


def check_parallel(processor: Any, adapter: Adapter, method: str, name: str = "") -> None:
    """At ``apply``: refuse a context-parallel processor of a family negguide has not checked under it."""
    if _context_parallel_config(processor) is not None:
        context_shard(processor, adapter, method, name)


def _pad_tokens(c: Conditioning, pad: int) -> Conditioning:
    """``c`` with ``pad`` zero tokens appended, masked out (``False``), so that no query attends to them."""
    if pad == 0:
        return c
    rows = c.embeds.shape[0]
    zeros = c.embeds.new_zeros(rows, pad, *c.embeds.shape[2:])
    mask = torch.ones(c.embeds.shape[:2], dtype=torch.bool, device=c.embeds.device) if c.mask is None else c.mask
    mask = torch.cat([mask.to(torch.bool), torch.zeros(rows, pad, dtype=torch.bool, device=mask.device)], dim=1)
    return dataclasses.replace(c, embeds=torch.cat([c.embeds, zeros], dim=1), mask=mask)


#: diffusers' caches whose state is keyed by the ``cache_context`` name: a guided forward runs them under its
#: branch's name plus ``GUIDED_CACHE_SUFFIX``, so it never reuses what an unguided forward cached, nor the reverse
CACHES_KEYED_BY_CONTEXT: tuple[str, ...] = ("FirstBlockCacheConfig", "SeaCacheConfig", "TaylorSeerCacheConfig")
#: caches keyed by the context that also count its forwards as the step index: kept apart only when every step is
#: guided (else the guided context would start counting at the first guided step)
CACHES_COUNTING_STEPS: tuple[str, ...] = ("MagCacheConfig",)
GUIDED_CACHE_SUFFIX = ":negguide"
#: the context name MagCache (and TextKVCache) give themselves when the pipeline enters no ``cache_context``
DEFAULT_CACHE_CONTEXT = "inference"
#: every other cache of diffusers 0.42.1, and why negguide refuses it
REFUSED_CACHES: dict[str, str] = {
    "PyramidAttentionBroadcastConfig": (
        "it keeps one cached attention output per attention module, shared by every forward whatever its "
        "`cache_context`, so a guided forward would return the attention output of an unguided one (the "
        "pipeline's unconditional branch, or a step outside the `start`/`stop` window)"
    ),
    "FasterCacheConfig": (
        "it skips the unconditional batch half and approximates attention outputs from earlier steps in state "
        "shared by every forward, so a guided forward would be combined with unguided ones"
    ),
    "MagCacheConfig": (
        "it indexes its calibrated magnitude ratios by the number of forwards of a `cache_context`, and with a "
        "`start`/`stop` window that leaves steps unguided the guided forwards' context of their own (so that they "
        "never reuse unguided residuals) starts counting at the first guided step and would read the wrong "
        "step's ratios. MagCache works when every step is guided (`start=0`, `stop=1`)"
    ),
    "TextKVCacheConfig": (
        "it computes and caches the text keys and values in a block hook (NucleusMoE-Image's blocks), outside the "
        "attention processors, so the negative tokens would bypass the guided attention"
    ),
}


def check_cache(denoiser: Any, method: GuidanceMethod) -> None:
    """Refuse a cache of diffusers (``enable_cache``) that would make a guided forward reuse unguided values."""
    config = getattr(denoiser, "_cache_config", None)
    if config is None or type(config).__name__ in CACHES_KEYED_BY_CONTEXT:
        return
    kind = type(config).__name__
    window = method.config
    if kind in CACHES_COUNTING_STEPS and window.start == 0 and window.stop == 1:  # every step guided
        return
    reason = REFUSED_CACHES.get(kind, "negguide has not checked this cache with guidance")
    raise NegGuideError(
        f"{method.name}: expected no cache on {type(denoiser).__name__}, or one negguide keeps apart from unguided "
        f"forwards ({', '.join(c.removesuffix('Config') for c in CACHES_KEYED_BY_CONTEXT)}), got {kind} "
        f"(`enable_cache`): {reason}. Call the denoiser's `disable_cache()` before guiding, or use "
        "FirstBlockCache or TaylorSeerCache."
    )


def _guided_cache_context(denoiser: torch.nn.Module, context: dict[str, Any], suffix: str) -> None:
    """Run the cache hooks of a guided forward under its own ``cache_context`` name (``suffix``), and back (``""``)."""
    if getattr(denoiser, "_cache_config", None) is None:
        return
    from diffusers.hooks.hooks import CacheContext
    from diffusers.hooks.hooks import _set_cache_context

    name = context["name"]
    if name is None:  # the pipeline entered no `cache_context`: the caches that run without one use a default name
        _set_cache_context(denoiser, CacheContext(DEFAULT_CACHE_CONTEXT + suffix) if suffix else None)
        return
    _set_cache_context(denoiser, CacheContext(name + suffix, **context["kwargs"]))


_KINDS = inspect.Parameter


@functools.cache
def _processor_class(original_cls: type) -> type[GuidedProcessor]:
    """A ``GuidedProcessor`` subclass whose ``__call__`` has the parameters of ``original_cls.__call__``.

    Attention modules read their processor's signature to decide which keyword arguments to pass
    (and positional ones are passed in its order), so the guided processor mirrors it exactly.
    The method is generated as plain code (no ``__signature__`` attribute, which torch.compile
    cannot trace through ``inspect.signature``) and forwards every argument to ``dispatch``.
    """
    try:
        params = list(inspect.signature(original_cls.__call__).parameters.values())[1:]
    except (TypeError, ValueError):
        return GuidedProcessor
    if not params or any(p.name in ("self", "_dispatch") or p.name.startswith("_d") for p in params):
        return GuidedProcessor
    head: list[str] = []
    forward: list[str] = []
    env: dict[str, Any] = {"_dispatch": GuidedProcessor.dispatch}
    star = False
    for i, p in enumerate(params):
        default = ""
        if p.default is not _KINDS.empty:
            env[f"_d{i}"] = p.default
            default = f"=_d{i}"
        if p.kind in (_KINDS.POSITIONAL_ONLY, _KINDS.POSITIONAL_OR_KEYWORD):
            head.append(p.name + default)
            forward.append(p.name)
            if p.kind is _KINDS.POSITIONAL_ONLY and (i + 1 == len(params) or params[i + 1].kind is not p.kind):
                head.append("/")
        elif p.kind is _KINDS.VAR_POSITIONAL:
            head.append("*" + p.name)
            forward.append("*" + p.name)
            star = True
        elif p.kind is _KINDS.KEYWORD_ONLY:
            if not star:
                head.append("*")
                star = True
            head.append(p.name + default)
            forward.append(f"{p.name}={p.name}")
        else:
            head.append("**" + p.name)
            forward.append("**" + p.name)
    source = f"def __call__(self, {', '.join(head)}):\n    return _dispatch(self, {', '.join(forward)})\n"
    exec(compile(source, f"<negguide: guided {original_cls.__name__}.__call__>", "exec"), env)  # noqa: S102
    name = f"Guided{original_cls.__name__}"
    return type(name, (GuidedProcessor,), {"__call__": env["__call__"], "__module__": __name__, "__qualname__": name})


def guided_processor(installation: Installation, original: Any, index: int, num_layers: int) -> GuidedProcessor:
    """The guided processor replacing ``original`` in block ``index``."""
    return _processor_class(type(original))(installation, original, index, num_layers)


# ---------------------------------------------------------------------- processors


def attention_processors(denoiser: torch.nn.Module) -> dict[str, Any]:
    """The denoiser's attention processors by name (``"blocks.0.attn2.processor"``), as diffusers'
    ``attn_processors`` names them; also for models without diffusers' ``AttentionMixin`` (Allegro, Latte),
    whose attention modules still have ``get_processor``, or a plain ``processor`` attribute (Mochi's
    ``MochiAttention``)."""
    if hasattr(denoiser, "attn_processors"):
        return dict(denoiser.attn_processors)
    return {
        f"{name}.processor": module.get_processor() if hasattr(module, "get_processor") else module.processor
        for name, module in denoiser.named_modules()
        if name and _has_processor(module)
    }


def set_attention_processors(denoiser: torch.nn.Module, processors: dict[str, Any]) -> None:
    """Set every processor ``attention_processors(denoiser)`` names from ``processors``."""
    if hasattr(denoiser, "set_attn_processor"):
        denoiser.set_attn_processor(dict(processors))  # it pops from the dict it is given
        return
    for name, module in denoiser.named_modules():
        if name and hasattr(module, "set_processor"):
            module.set_processor(processors[f"{name}.processor"])
        elif name and _has_processor(module):
            module.processor = processors[f"{name}.processor"]


def _has_processor(module: torch.nn.Module) -> bool:
    """Whether ``module`` is an attention module with a processor: ``get_processor``, or a callable ``processor``
    attribute that is not a submodule (``MochiAttention`` has no ``get_processor``/``set_processor``)."""
    if hasattr(module, "get_processor"):
        return True
    processor = getattr(module, "processor", None)
    return callable(processor) and not isinstance(processor, torch.nn.Module)


# ---------------------------------------------------------------------- row helpers


def stack(rows: list[Conditioning], device: torch.device) -> Conditioning:
    """One row per prompt -> one ``Conditioning`` (zero-padded to the longest, masked where lengths differ)."""
    n = max(r.num_tokens for r in rows)
    same = all(r.num_tokens == n for r in rows) and all(r.mask is None for r in rows)
    if len(rows) == 1:
        return rows[0]
    extras = {k: _cat_padded([r.extras.get(k) for r in rows]) for k in dict.fromkeys(k for r in rows for k in r.extras)}
    if same:
        return Conditioning(torch.cat([r.embeds for r in rows], dim=0), None, extras)
    first = rows[0].embeds
    embeds = first.new_zeros(len(rows), n, first.shape[-1])
    mask = torch.zeros(len(rows), n, dtype=torch.bool, device=first.device)
    for i, r in enumerate(rows):
        embeds[i, : r.num_tokens] = r.embeds[0]
        mask[i, : r.num_tokens] = True if r.mask is None else r.mask[0].to(first.device)
    return Conditioning(embeds, mask, extras)


def _cat_padded(values: list[torch.Tensor | None]) -> torch.Tensor:
    """Per-row extras ``(1 or rows, ...)`` as one tensor: zero-padded (``False``: boolean) at the end of every axis
    to the largest; a row without the extra (an empty negative) is all padding."""
    present = [v for v in values if v is not None]
    shape = [max(s) for s in zip(*(v.shape[1:] for v in present))]
    if all(v is not None and list(v.shape[1:]) == shape for v in values):
        return torch.cat(present, dim=0)  # type: ignore[arg-type]
    rows = [1 if v is None else v.shape[0] for v in values]
    out = present[0].new_zeros(sum(rows), *shape)
    start = 0
    for v, n in zip(values, rows):
        if v is not None:
            out[(slice(start, start + n), *(slice(0, d) for d in v.shape[1:]))] = v
        start += n
    return out


def _forward_rows(cond: Conditioning, batch: int, guided: slice, like: torch.Tensor) -> Conditioning:
    """One negative for a guided forward of ``batch`` rows: its rows expanded to the guided branch, on ``like``'s
    device and dtype; rows outside the guided branch get zeros, every token "real" (they run isolated)."""
    n_guided = guided.stop - guided.start

    def rows(t: torch.Tensor, fill: Any) -> torch.Tensor:
        t = _expand(t, n_guided).to(device=like.device, dtype=like.dtype if t.is_floating_point() else t.dtype)
        if n_guided == batch:
            return t
        full = t.new_full((batch, *t.shape[1:]), fill)
        full[guided] = t
        return full

    def fill(t: torch.Tensor) -> Any:
        return True if t.dtype == torch.bool else 0

    mask = None if cond.mask is None else rows(cond.mask.bool(), True)
    return Conditioning(rows(cond.embeds, 0), mask, {k: rows(v, fill(v)) for k, v in cond.extras.items()})


def _repeat_rows(cond: Conditioning, times: int) -> Conditioning:
    if cond.embeds.shape[0] == 1 or times == 1:
        return cond
    return Conditioning(
        cond.embeds.repeat_interleave(times, dim=0),
        None if cond.mask is None else cond.mask.repeat_interleave(times, dim=0),
        {k: v.repeat_interleave(times, dim=0) for k, v in cond.extras.items()},
    )


def positional_names(module: torch.nn.Module) -> tuple[str, ...]:
    """The names of ``module.forward``'s leading positional-or-keyword parameters (to name positional inputs)."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return ()
    names = []
    for p in params:
        if p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD:
            break
        names.append(p.name)
    return tuple(names)


def _timestep_index(timesteps: Any, timestep: Any) -> int | None:
    """The first index of ``timestep`` (a number, or a tensor: its largest value) in ``timesteps``, or None."""
    try:
        t = float(timestep.detach().max()) if isinstance(timestep, torch.Tensor) else float(timestep)
        values = torch.as_tensor(timesteps, dtype=torch.float64).cpu()
    except (TypeError, ValueError, IndexError, RuntimeError):
        return None
    hits = torch.nonzero((values - t).abs() <= 1e-3 * max(1.0, abs(t)))
    return int(hits[0, 0]) if hits.numel() else None


def _entries(kwargs: dict[str, Any], names: tuple[str, ...]) -> list[str]:
    """``names`` with each ``"<input>.*"`` replaced by one name per entry of that list, tuple or dict input (a
    ControlNet's per-block residuals, each batched: ``"controlnet_block_samples.0"``, ...); absent inputs: none."""
    out: list[str] = []
    for name in names:
        if not name.endswith(".*"):
            out.append(name)
            continue
        value = _lookup(kwargs, name[:-2])
        keys = range(len(value)) if isinstance(value, (list, tuple)) else value if isinstance(value, dict) else ()
        out.extend(f"{name[:-2]}.{key}" for key in keys)
    return out


def _key(container: Any, part: str) -> Any:
    """The key of ``container`` (a dict, list or tuple) that the name part ``part`` means, or None."""
    if isinstance(container, (list, tuple)):
        return int(part) if part.isdigit() and int(part) < len(container) else None
    if isinstance(container, dict):
        if part in container:
            return part
        return next((k for k in container if not isinstance(k, str) and str(k) == part), None)  # {0: ...} dicts
    return None


def _lookup(kwargs: dict[str, Any], name: str) -> Any:
    """``kwargs[name]``; a dotted name reads inside a dict, list or tuple input (``"added_cond_kwargs.text_embeds"``,
    ``"controlnet_block_samples.0"``)."""
    value: Any = kwargs
    for part in name.split("."):
        key = _key(value, part)
        if key is None:
            return None
        value = value[key]
    return value


def _store(kwargs: dict[str, Any], name: str, value: Any) -> None:
    """``kwargs[name] = value``; a dotted name writes into a copy of the dict, list or tuple input, never the
    caller's."""
    outer, _, inner = name.partition(".")
    key = _key(kwargs, outer)
    if not inner:
        kwargs[outer if key is None else key] = value
        return
    container = kwargs[key]
    nested: Any = dict(container) if isinstance(container, dict) else list(container)
    _store(nested, inner, value)
    kwargs[key] = tuple(nested) if isinstance(container, tuple) else nested


def _expand(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with its batch expanded to ``rows`` (a shared negative has one row; a pipeline that repeats each
    prompt per image after encoding has ``rows / t.shape[0]`` rows per row of ``t``)."""
    if t.shape[0] == rows:
        return t
    if t.shape[0] == 1:
        return t.expand(rows, *t.shape[1:])
    return t.repeat_interleave(rows // t.shape[0], dim=0)


def _has_rows(value: Any, rows: int) -> bool:
    """Whether ``value`` is a tensor of ``rows`` rows: one more prediction of a prediction-level forward."""
    return isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == rows


def _is_tensor_list(value: Any) -> bool:
    """Whether ``value`` is a non-empty list (or tuple) of tensors: a denoiser input given per sample."""
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, torch.Tensor) for v in value)


def _real_tokens(cond: Conditioning, rows: int, like: torch.Tensor) -> list[torch.Tensor]:
    """``rows`` per-sample text tensors ``(tokens, channels)`` of ``cond``: each row's real tokens only."""
    embeds = _expand(cond.embeds, rows).to(device=like.device, dtype=like.dtype)
    if cond.mask is None:
        return list(embeds.unbind(0))
    mask = _expand(cond.mask, rows).to(like.device)
    return [row[m] for row, m in zip(embeds, mask)]


def _complement(uncond: slice | None, batch: int) -> slice | None:
    """The conditional rows: all rows if ``uncond`` is None, none if it is everything."""
    if uncond is None:
        return slice(0, batch)
    start = uncond.start or 0
    stop = batch if uncond.stop is None else uncond.stop
    if start == 0 and stop >= batch:
        return None
    if start == 0:
        return slice(stop, batch)
    return slice(0, start)
