"""``apply`` and ``remove``: patch an unmodified diffusers pipeline, and put it back exactly."""

from __future__ import annotations

import weakref
from typing import Any

import pluggy

from negguide import registry
from negguide.adapter import Adapter
from negguide.config import GuidanceSpec
from negguide.errors import ConfigError
from negguide.errors import NegativePromptError
from negguide.installation import Installation
from negguide.method import GuidanceMethod
from negguide.negatives import NegativeSpec
from negguide.negatives import parse

_applied: weakref.WeakKeyDictionary[Any, GuidanceHandle] = weakref.WeakKeyDictionary()


class GuidanceHandle:
    """An application of a method to a pipeline. A context manager; ``remove()`` undoes it."""

    def __init__(self, pipe: Any, installation: Installation) -> None:
        self.pipe = pipe
        self.installation = installation
        self._entered = False

    @property
    def method(self) -> GuidanceMethod:
        """The method instance, with its validated ``config``."""
        return self.installation.method

    @property
    def adapter(self) -> Adapter:
        """The adapter (the model family's facts) the installation acts on."""
        return self.installation.adapter

    @property
    def negatives(self) -> list[NegativeSpec]:
        """The negatives as given (text or embeddings, and weights)."""
        return list(self.installation.negatives)

    @property
    def active(self) -> bool:
        """Whether the pipeline is still patched by this handle."""
        return self.installation.active

    def remove(self) -> None:
        """Restore the pipeline exactly as it was. Idempotent."""
        self.installation.remove()
        if _applied.get(self.pipe) is self:
            del _applied[self.pipe]

    def __enter__(self) -> GuidanceHandle:
        if not self.active:
            raise ConfigError(
                f"this {self.method.name} handle was removed (by remove(), a later apply or an error); expected an "
                "active one. Call negguide.apply again and use its handle."
            )
        self._entered = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._entered = False
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"<GuidanceHandle {self.method.name} on {type(self.pipe).__name__} ({state})>"


def apply(
    pipe: Any,
    method: str | GuidanceSpec,
    *,
    negative_prompt: str | list[str] | None = None,
    negative_prompt_embeds: Any = None,
    negatives: Any = None,
    pm: pluggy.PluginManager | None = None,
    **params: Any,
) -> GuidanceHandle:
    """Patch ``pipe`` with a guidance method; return a handle (context manager, ``.remove()``).

    Args:
        pipe: a diffusers pipeline (SD3/SD3.5, Flux, Wan, or any family a plugin adapts).
        method: a method name (``"vsf"``, ``"nag"``, ``"nasa"``, ``"cfg"``...) or a ``GuidanceSpec``
            from ``load_config``.
        negative_prompt: one string shared by every prompt, or a list with one per prompt (as in
            diffusers). An empty string leaves its prompt unguided.
        negative_prompt_embeds: already-encoded negative conditioning instead of text; the shapes
            per family are documented on each adapter.
        negatives: several weighted negatives, applied to every prompt of a call: a mapping
            ``{"snow": 1.0, "people": 0.5}``, or a sequence whose entries are strings, embeddings
            (as ``negative_prompt_embeds``) or ``(string or embeddings, weight)`` pairs. Weights
            are finite and >= 0; one negative of weight 1 is ``negative_prompt``. Exclusive with
            ``negative_prompt`` and ``negative_prompt_embeds``.
        pm: a plugin manager (tests); the process-wide one by default.
        **params: method parameters, validated by the method's ``Config`` over the family defaults.

    Applying again to the same pipeline replaces the previous application.
    """
    if isinstance(method, GuidanceSpec):
        spec = method
        name = spec.method
        params = {**spec.params, **params}
        if negative_prompt is None and negative_prompt_embeds is None and negatives is None:
            negative_prompt, negatives = spec.negative_prompt, spec.negatives
    elif isinstance(method, str):
        name = method
    else:
        raise ConfigError(f"expected a method name or a GuidanceSpec, got {type(method).__name__}.")
    method_cls = registry.get_method(name, pm)
    adapter_cls = registry.adapter_for(pipe, pm)
    if isinstance(method, GuidanceSpec) and method.adapter not in ("auto", adapter_cls.family):
        raise ConfigError(
            f"config asks for adapter {method.adapter!r} but the pipeline is a {adapter_cls.family!r} model."
        )
    _check_pipe(pipe, "apply")
    current = _applied.get(pipe)
    if current is not None and current.active and current._entered:
        raise ConfigError(
            f"{name}: expected no other guidance inside the `with` block of {current!r}, got a nested apply. "
            "Leave the outer block first, or apply once (several negatives go in `negatives={...}`)."
        )
    config = method_cls.make_config(params, defaults=registry.family_defaults(method_cls, adapter_cls.family, pm))
    specs = parse(name, negative_prompt, negative_prompt_embeds, negatives)
    if not specs:
        if method_cls.level == "attention":
            raise NegativePromptError(
                f"{name}: expected a negative prompt, got none. Pass negative_prompt='...' (or negatives={{...}}, "
                "negative_prompt_embeds)."
            )
        specs = [NegativeSpec(text="")]  # prediction level: CFG against the empty prompt, as diffusers does
    remove(pipe)
    installation = Installation(pipe, adapter_cls(pipe), method_cls(config), specs)
    installation.install()
    handle = GuidanceHandle(pipe, installation)
    _applied[pipe] = handle
    return handle


def remove(pipe: Any) -> None:
    """Undo whatever ``apply`` did to ``pipe`` (nothing if it is not patched)."""
    _check_pipe(pipe, "remove")
    handle = _applied.pop(pipe, None)
    if handle is not None:
        handle.installation.remove()


def applied(pipe: Any) -> GuidanceHandle | None:
    """The active handle on ``pipe``, if any (``None`` once removed, also by an error)."""
    _check_pipe(pipe, "applied")
    handle = _applied.get(pipe)
    return handle if handle is not None and handle.active else None


def _check_pipe(pipe: Any, what: str) -> None:
    try:
        weakref.ref(pipe)
    except TypeError:
        raise ConfigError(
            f"negguide.{what}: expected a diffusers pipeline, got {type(pipe).__name__} {pipe!r:.60}. Pass the "
            "pipeline object itself."
        ) from None
