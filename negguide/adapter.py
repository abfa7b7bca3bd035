"""The contract of a model-family adapter, and the install/restore machinery every adapter shares.

An adapter owns every fact about one model family: which pipeline methods encode text, where the
text enters the transformer, which attention processors see text, the token order inside them,
rotary embeddings and batching. It holds no guidance math: attention-level methods receive
``Segments``; prediction-level methods receive the two predictions.

What ``install`` changes, and ``remove`` restores exactly:

* ``pipe.encode_prompt`` is wrapped (an instance attribute) so that the negative prompt is
  encoded with the pipeline's own encoders, with the settings of the current call;
* each guided transformer gets a forward pre-hook and a forward hook (torch hook handles), and
  its ``cache_context`` is wrapped to learn which branch of the pipeline's own CFG runs;
* attention-level methods: the processors of the attention layers that see text are replaced
  (the originals are saved and put back with ``set_attn_processor``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from abc import ABC
from abc import abstractmethod
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any
from typing import ClassVar

import torch

from negguide.attention import isolated
from negguide.attention import resolve_path
from negguide.errors import NegativePromptError
from negguide.method import AttentionMethod
from negguide.method import GuidanceMethod
from negguide.method import Layout
from negguide.method import PredictionMethod
from negguide.method import SegmentOutputs
from negguide.method import Segments


@dataclasses.dataclass
class Negative:
    """Encoded negative conditioning for the rows of one pipeline call.

    ``embeds`` is ``(rows, n, channels)`` in the space the transformer's text input expects;
    ``mask`` is ``None`` or ``(rows, n)`` boolean (``False`` on padding); ``extras`` holds what a
    family needs beside it (e.g. ``"pooled"`` for prediction-level methods on SD3 and Flux).
    """

    embeds: torch.Tensor
    mask: torch.Tensor | None = None
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.embeds.shape[1]

    @functools.cached_property
    def has_empty_rows(self) -> bool:
        """Whether some row's negative is all padding (an empty prompt in a list); read once per call."""
        return self.mask is not None and not bool(self.mask.any(dim=1).all())


@dataclasses.dataclass
class EncodeCall:
    """What the adapter learns from the pipeline's own ``encode_prompt`` call."""

    arguments: dict[str, Any]  #: the call's bound arguments, defaults applied
    output: Any  #: what ``encode_prompt`` returned
    batch: int  #: rows of the positive conditioning (prompts x images per prompt)
    num_per_prompt: int  #: images (or videos) per prompt
    device: torch.device
    dtype: torch.dtype


@dataclasses.dataclass
class ForwardState:
    """What the processors of one transformer forward need to know (set by the pre-hook)."""

    active: bool = False  #: negative tokens are in the text stream of this forward
    num_pos: int = 0  #: positive text tokens
    num_neg: int = 0  #: negative text tokens (appended after the positive ones)
    guided: slice = dataclasses.field(
        default_factory=lambda: slice(None)
    )  #: batch rows to guide; the others run isolated (unguided)
    neg_mask: torch.Tensor | None = None
    empty_rows: bool = False  #: some guided row has no negative token: it must stay unguided
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


class Adapter(ABC):
    """Base class of model-family adapters. See the module docstring for what is patched.

    Subclasses set ``family`` and ``layout`` and implement ``matches``, ``encode_negative`` and,
    for prediction-level methods, ``negative_inputs``; for attention-level methods,
    ``attention_layers``, ``make_processor`` and ``extend_inputs``.
    """

    family: ClassVar[str]
    layout: ClassVar[Layout]
    #: keyword of ``encode_prompt`` that gives the number of images (or videos) per prompt
    num_per_prompt_arg: ClassVar[str] = "num_images_per_prompt"

    def __init__(
        self,
        pipe: Any,
        method: GuidanceMethod,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_embeds: Any = None,
    ) -> None:
        self.pipe = pipe
        self.method = method
        self.negative_prompt = negative_prompt
        self.negative_prompt_embeds = negative_prompt_embeds
        self.negative: Negative | None = None
        self.state = ForwardState()
        self._undo: list[Callable[[], None]] = []
        self._original_encode: Callable[..., Any] | None = None

    # ------------------------------------------------------------------ family facts

    @classmethod
    @abstractmethod
    def matches(cls, transformer: Any) -> bool:
        """Whether this adapter knows ``transformer`` (import diffusers classes inside)."""

    def transformers(self) -> list[torch.nn.Module]:
        """The denoisers to patch (Wan 2.2 has two)."""
        return [self.pipe.transformer]

    @abstractmethod
    def encode_negative(self, prompts: list[str], call: EncodeCall, encode: Callable[..., Any]) -> Negative:
        """Encode one negative per positive row of ``call`` with the pipeline's own encoders.

        ``encode`` is the pipeline's original ``encode_prompt``. Attention-level methods get the
        negative without padding tokens (``self.method.level == "attention"``); prediction-level
        methods get it exactly as the pipeline encodes its own negative prompt for CFG.
        """

    @abstractmethod
    def negative_from_embeds(self, embeds: Any, call: EncodeCall) -> Negative:
        """Turn user-given ``negative_prompt_embeds`` into a ``Negative`` for the rows of ``call``."""

    def negative_inputs(self, kwargs: dict[str, Any], rows: slice, neg: Negative) -> dict[str, Any]:
        """Prediction level: the transformer inputs of the negative branch for batch ``rows``.

        Return only the keyword arguments whose value differs per row (the base concatenates them
        after the positive rows); the default repeats every batched tensor and swaps nothing.
        """
        raise NotImplementedError(f"{type(self).__name__} does not support prediction-level methods")

    def attention_layers(self, transformer: torch.nn.Module) -> dict[str, int]:
        """Attention level: processor names (as in ``attn_processors``) to patch -> block index."""
        raise NotImplementedError(f"{type(self).__name__} does not support attention-level methods")

    def num_layers(self, transformer: torch.nn.Module) -> int:
        """Number of block indices ``attention_layers`` can return (for negative ``layers``)."""
        return len(set(self.attention_layers(transformer).values()))

    def make_processor(self, original: Any, index: int, num_layers: int) -> Any:
        """Attention level: the processor that replaces ``original`` in block ``index``."""
        raise NotImplementedError(f"{type(self).__name__} does not support attention-level methods")

    def extend_inputs(self, kwargs: dict[str, Any], neg: Negative) -> dict[str, Any]:
        """Attention level: append the negative tokens to the transformer's text input."""
        raise NotImplementedError(f"{type(self).__name__} does not support attention-level methods")

    def uncond_rows(self, kwargs: dict[str, Any], context: str | None) -> slice | None:
        """Rows of this forward that are the pipeline's own unconditional CFG branch.

        ``context`` is the name the pipeline gave to ``transformer.cache_context`` ("cond" or
        "uncond", pipelines with separate CFG calls), or ``None``. Return ``None`` if every row is
        conditional, ``slice(None)`` if every row is unconditional.
        """
        return slice(None) if context == "uncond" else None

    # ------------------------------------------------------------------ install / remove

    def install(self) -> None:
        """Patch the pipeline. On any error everything done so far is undone before re-raising."""
        try:
            self._install_encode()
            for transformer in self.transformers():
                self._install_transformer(transformer)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Undo every change, in reverse order. Safe to call twice."""
        while self._undo:
            self._undo.pop()()
        self.state = ForwardState()
        self.negative = None

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

    def _install_encode(self) -> None:
        original = self.pipe.encode_prompt
        self._original_encode = original
        signature = inspect.signature(original)

        @functools.wraps(original)
        def encode_prompt(*args: Any, **kwargs: Any) -> Any:
            output = original(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            self._on_encode(dict(bound.arguments), output, original)
            return output

        self._set_instance_attr(self.pipe, "encode_prompt", encode_prompt)

    def _on_encode(self, arguments: dict[str, Any], output: Any, original: Callable[..., Any]) -> None:
        first = output[0] if isinstance(output, tuple) else output
        nper = arguments.get(self.num_per_prompt_arg) or 1
        call = EncodeCall(arguments, output, first.shape[0], int(nper), first.device, first.dtype)
        try:
            if self.negative_prompt_embeds is not None:
                self.negative = self.negative_from_embeds(self.negative_prompt_embeds, call)
            else:
                prompts = self._negative_list(call)
                self.negative = None if prompts is None else self.encode_negative(prompts, call, original)
        except BaseException:
            # "after any error the user's pipeline is exactly as before"
            self.remove()
            raise

    def _negative_list(self, call: EncodeCall) -> list[str] | None:
        neg = self.negative_prompt
        if neg is None:
            neg = "" if isinstance(self.method, PredictionMethod) else None
        if neg is None:
            return None
        prompts = call.batch // call.num_per_prompt
        if isinstance(neg, str):
            neg = [neg] * prompts
        neg = list(neg)
        if len(neg) != prompts:
            raise NegativePromptError(
                f"{self.method.name}: expected one negative prompt per prompt ({prompts}), got a list of {len(neg)}. "
                "Pass a single string to share one negative, or a list as long as the prompts."
            )
        if isinstance(self.method, AttentionMethod) and all(not n.strip() for n in neg):
            return None  # an empty negative is no negative: the pipeline runs unguided, bit for bit
        return neg

    def _install_transformer(self, transformer: torch.nn.Module) -> None:
        context: dict[str, str | None] = {"name": None}
        original_cache_context = getattr(transformer, "cache_context", None)
        if original_cache_context is not None:

            @contextlib.contextmanager
            def cache_context(name: str, *args: Any, **kwargs: Any) -> Iterator[None]:
                context["name"] = name
                try:
                    with original_cache_context(name, *args, **kwargs):
                        yield
                finally:
                    context["name"] = None

            self._set_instance_attr(transformer, "cache_context", cache_context)

        if isinstance(self.method, AttentionMethod):
            self._install_processors(transformer)

        def pre_hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            try:
                return args, self._before_forward(kwargs, context["name"])
            except BaseException:
                self.remove()
                raise

        def post_hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            try:
                return self._after_forward(output)
            finally:
                self.state = ForwardState()

        # The hooks are host-side (they read the scheduler's step index and set ``self.state``): kept
        # out of torch.compile even under ``transformer.compile()``, else every step would recompile.
        h1 = transformer.register_forward_pre_hook(torch.compiler.disable(pre_hook), with_kwargs=True)
        h2 = transformer.register_forward_hook(torch.compiler.disable(post_hook), with_kwargs=True)
        self._undo.append(h1.remove)
        self._undo.append(h2.remove)

    def _install_processors(self, transformer: torch.nn.Module) -> None:
        saved = dict(transformer.attn_processors)
        layers = self.attention_layers(transformer)
        num_layers = self.num_layers(transformer)
        new = {}
        for name, proc in saved.items():
            if name in layers:
                new[name] = self.make_processor(proc, layers[name], num_layers)
            else:
                new[name] = proc
        transformer.set_attn_processor(new)
        self._undo.append(lambda: transformer.set_attn_processor(saved))

    # ------------------------------------------------------------------ per forward

    def current_step(self) -> tuple[int, int]:
        """``(step, num_steps)`` of the denoising loop, read host-side from the scheduler."""
        scheduler = self.pipe.scheduler
        timesteps = getattr(scheduler, "timesteps", None)
        total = len(timesteps) if timesteps is not None else 1
        begin = getattr(scheduler, "begin_index", None) or 0
        index = getattr(scheduler, "step_index", None)
        # outside a denoising loop (no index yet, or a finished loop) a call counts as the first step
        index = begin if index is None or index >= total else index
        order = getattr(scheduler, "order", 1) or 1
        return (index - begin) // order, max(1, (total - begin) // order)

    def _before_forward(self, kwargs: dict[str, Any], context: str | None) -> dict[str, Any]:
        self.state = ForwardState()
        neg = self.negative
        if neg is None:
            return kwargs
        step, total = self.current_step()
        if not self.method.config.active(step, total):
            return kwargs
        uncond = self.uncond_rows(kwargs, context)
        batch = self._batch(kwargs)
        guided = _complement(uncond, batch)
        if guided is None:
            return kwargs
        rows_in_neg = guided.stop - guided.start
        if neg.embeds.shape[0] not in (rows_in_neg, 1):
            raise NegativePromptError(
                f"{self.method.name}: the negative conditioning has {neg.embeds.shape[0]} rows, the guided branch "
                f"{rows_in_neg}. Pass one negative per prompt or a single shared one."
            )
        if isinstance(self.method, PredictionMethod):
            extra = self.negative_inputs(kwargs, guided, neg)
            out = dict(kwargs)
            for key, value in extra.items():
                out[key] = torch.cat([kwargs[key], value], dim=0)
            self.state = ForwardState(active=True, guided=guided, extra={"batch": batch})
            return out
        self.state = ForwardState(active=True, guided=guided, num_neg=neg.num_tokens, empty_rows=neg.has_empty_rows)
        return self.extend_inputs(kwargs, neg)

    def _batch(self, kwargs: dict[str, Any]) -> int:
        return kwargs["hidden_states"].shape[0]

    def _after_forward(self, output: Any) -> Any:
        st = self.state
        if not st.active or not isinstance(self.method, PredictionMethod):
            return output
        sample = output[0] if isinstance(output, tuple) else output.sample
        batch = st.extra["batch"]
        pos, neg = sample[:batch], sample[batch:]
        guided = pos.clone() if st.guided != slice(0, batch) else None
        combined = self.method.combine(pos[st.guided], neg)
        if guided is None:
            result = combined
        else:
            guided[st.guided] = combined
            result = guided
        if isinstance(output, tuple):
            return (result, *output[1:])
        output.sample = result
        return output

    # ------------------------------------------------------------------ helpers for processors

    def repeat_rows(self, tensor: torch.Tensor, rows: int) -> torch.Tensor:
        """``tensor`` with its batch expanded to ``rows`` (a shared negative has one row)."""
        if tensor.shape[0] == rows:
            return tensor
        if tensor.shape[0] == 1:
            return tensor.expand(rows, *tensor.shape[1:])
        raise NegativePromptError(f"expected 1 or {rows} negative rows, got {tensor.shape[0]}")

    def negative_rows(
        self, neg: Negative, batch: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Negative tokens for every row of a forward: the guided rows get theirs, the others zeros.

        Also returns the ``(batch, n)`` padding mask (``None`` if every token is real).
        """
        guided = self.state.guided
        n_guided = guided.stop - guided.start
        embeds = self.repeat_rows(neg.embeds, n_guided).to(device=device, dtype=dtype)
        mask = None if neg.mask is None else self.repeat_rows(neg.mask, n_guided).to(device)
        if n_guided == batch:
            return embeds, mask
        full = embeds.new_zeros(batch, *embeds.shape[1:])
        full[guided] = embeds
        full_mask = None
        if mask is not None:
            full_mask = torch.ones(batch, mask.shape[1], dtype=torch.bool, device=device)
            full_mask[guided] = mask
        return full, full_mask

    def run_method(
        self, seg: Segments, index: int, num_layers: int, layer_guided: bool | None = None
    ) -> SegmentOutputs:
        """Guided rows through the method, the others isolated; blocks outside ``layers`` isolated.

        ``layer_guided`` is the processor's ``layer_guided`` (whether the method's ``layers`` include
        block ``index``, decided once when the processor is made); pass it: then the block index
        never reaches a compiled graph, so under regional compilation (diffusers'
        ``compile_repeated_blocks``) every block of a type shares one graph instead of one per index.
        ``None`` decides from ``index`` here.
        """
        method = self.method
        assert isinstance(method, AttentionMethod)
        path = resolve_path(getattr(method.config, "attention", "auto"), seg.q_img.device)
        if layer_guided is None:
            layer_guided = method.config.guides_layer(index, num_layers)
        if not layer_guided:
            return isolated(seg, path)
        guided = self.state.guided
        batch = seg.q_img.shape[0]
        start, stop = guided.start or 0, batch if guided.stop is None else guided.stop
        if start == 0 and stop == batch:
            return self._attend(seg, path)
        parts = []
        if start > 0:
            parts.append(isolated(seg.rows(slice(0, start)), path))
        parts.append(self._attend(seg.rows(slice(start, stop)), path))
        if stop < batch:
            parts.append(isolated(seg.rows(slice(stop, batch)), path))

        def cat(name: str) -> torch.Tensor | None:
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else torch.cat(values, dim=0)

        return SegmentOutputs(cat("img"), cat("pos"), cat("neg"))

    def _attend(self, seg: Segments, path: str) -> SegmentOutputs:
        """The method on guided rows; a row whose negative is empty (all padding) stays unguided."""
        out = self.method.attend(seg)  # type: ignore[union-attr]
        if not self.state.empty_rows or seg.neg_mask is None:
            return out
        # decided once per call (host-side), selected per row here without a data-dependent branch
        iso = isolated(seg, path)  # type: ignore[arg-type]
        has = seg.neg_mask.any(dim=1).to(seg.q_img.device)[:, None, None, None]

        def pick(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
            return None if a is None else torch.where(has, a, b)

        return SegmentOutputs(pick(out.img, iso.img), pick(out.pos, iso.pos), pick(out.neg, iso.neg))


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


def rows_for_call(t: torch.Tensor, call: EncodeCall) -> torch.Tensor:
    """Rows given per prompt (or one shared) -> rows of the call (prompts x images per prompt)."""
    prompts = call.batch // call.num_per_prompt
    if t.shape[0] in (1, call.batch):
        return t
    if t.shape[0] == prompts:
        return t.repeat_interleave(call.num_per_prompt, dim=0)
    raise NegativePromptError(
        f"expected negative embeddings with 1, {prompts} (one per prompt) or {call.batch} rows, got {t.shape[0]}."
    )


def stack_negatives(rows: list[torch.Tensor], call: EncodeCall) -> Negative:
    """One ``(1, n_i, C)`` tensor per prompt -> a ``Negative`` for the call's rows (padded, masked)."""
    n = max(r.shape[1] for r in rows)
    width = rows[0].shape[-1]
    if all(r.shape[1] == n for r in rows):
        embeds = torch.cat(rows, dim=0)
        mask = None
    else:
        embeds = torch.zeros(len(rows), n, width, device=call.device, dtype=call.dtype)
        mask = torch.zeros(len(rows), n, device=call.device, dtype=torch.bool)
        for i, r in enumerate(rows):
            embeds[i, : r.shape[1]] = r[0]
            mask[i, : r.shape[1]] = True
    if len(rows) > 1 and call.num_per_prompt > 1:
        embeds = embeds.repeat_interleave(call.num_per_prompt, dim=0)
        mask = None if mask is None else mask.repeat_interleave(call.num_per_prompt, dim=0)
    return Negative(embeds, mask)


class GuidedProcessor:
    """Base of the adapters' attention processors: the original processor, the block index, the adapter.

    A subclass's ``__call__`` keeps the replaced processor's signature (attention modules filter
    keyword arguments by it) and delegates to ``self.original`` when ``self.adapter.state`` is not
    active, so unguided forwards are bit-identical.
    """

    def __init__(self, adapter: Adapter, original: Any, index: int, num_layers: int) -> None:
        self.adapter = adapter
        self.original = original
        self.index = index
        self.num_layers = num_layers
        #: whether the method guides this block (decided here, host-side; see ``Adapter.run_method``)
        self.layer_guided = adapter.method.config.guides_layer(index, num_layers)


class JointAttentionAdapter(Adapter):
    """Base of adapters whose image and text tokens share one attention sequence (SD3, Flux)."""

    layout: ClassVar[Layout] = "joint"

    def split_negative_embeds(self, embeds: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """User-given ``negative_prompt_embeds``: a tensor, or a dict with ``prompt_embeds`` and
        ``pooled_prompt_embeds`` -> ``(embeds, pooled or None)``; the pooled vector is required by
        prediction-level methods."""
        pooled = None
        if isinstance(embeds, dict):
            pooled = embeds.get("pooled_prompt_embeds")
            embeds = embeds.get("prompt_embeds")
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3:
            raise NegativePromptError(
                f"{self.family}: expected `negative_prompt_embeds` as a (rows, tokens, joint_attention_dim) tensor "
                f"or a dict with `prompt_embeds` and `pooled_prompt_embeds`, got {type(embeds).__name__}."
            )
        if self.method.level == "prediction" and pooled is None:
            raise NegativePromptError(
                f"{self.family}: CFG needs the negative pooled vector too: pass negative_prompt_embeds="
                "{'prompt_embeds': ..., 'pooled_prompt_embeds': ...}."
            )
        return embeds, pooled


class CrossAttentionAdapter(Adapter):
    """Base of adapters whose text enters through cross-attention (Wan)."""

    layout: ClassVar[Layout] = "cross"
