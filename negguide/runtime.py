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
from negguide.errors import NoAdapterError
from negguide.method import GuidanceMethod

_applied: weakref.WeakKeyDictionary[Any, GuidanceHandle] = weakref.WeakKeyDictionary()


class GuidanceHandle:
    """An application of a method to a pipeline. A context manager; ``remove()`` undoes it."""

    def __init__(self, pipe: Any, adapter: Adapter) -> None:
        self.pipe = pipe
        self.adapter = adapter

    @property
    def method(self) -> GuidanceMethod:
        """The method instance, with its validated ``config``."""
        return self.adapter.method

    @property
    def active(self) -> bool:
        """Whether the pipeline is still patched by this handle."""
        return bool(self.adapter._undo)  # noqa: SLF001

    def remove(self) -> None:
        """Restore the pipeline exactly as it was. Idempotent."""
        self.adapter.remove()
        if _applied.get(self.pipe) is self:
            del _applied[self.pipe]

    def __enter__(self) -> GuidanceHandle:
        return self

    def __exit__(self, *exc: object) -> None:
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
    pm: pluggy.PluginManager | None = None,
    **params: Any,
) -> GuidanceHandle:
    """Patch ``pipe`` with a guidance method; return a handle (context manager, ``.remove()``).

    Args:
        pipe: a diffusers pipeline (SD3/SD3.5, Flux, Wan, or any family a plugin adapts).
        method: a method name (``"vsf"``, ``"nag"``, ``"nasa"``, ``"cfg"``...) or a ``GuidanceSpec``
            from ``load_config``.
        negative_prompt: one string shared by every prompt, or a list with one per prompt.
        negative_prompt_embeds: already-encoded negative conditioning instead of text; the shapes
            per family are documented on each adapter.
        pm: a plugin manager (tests); the process-wide one by default.
        **params: method parameters, validated by the method's ``Config`` over the family defaults.

    Applying again to the same pipeline replaces the previous application.
    """
    if isinstance(method, GuidanceSpec):
        spec = method
        name = spec.method
        params = {**spec.params, **params}
        if negative_prompt is None:
            negative_prompt = spec.negative_prompt
    elif isinstance(method, str):
        name = method
    else:
        raise ConfigError(f"expected a method name or a GuidanceSpec, got {type(method).__name__}.")
    method_cls = registry.get_method(name, pm)
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise NoAdapterError(
            f"expected a diffusers pipeline with a `transformer`, got {type(pipe).__name__}. "
            "negguide guides transformer-based pipelines (SD3, Flux, Wan, ...)."
        )
    adapter_cls = registry.get_adapter(transformer, pm)
    if isinstance(method, GuidanceSpec) and method.adapter not in ("auto", adapter_cls.family):
        raise ConfigError(
            f"config asks for adapter {method.adapter!r} but the pipeline is a {adapter_cls.family!r} model."
        )
    config = method_cls.make_config(params, family=adapter_cls.family)
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise NegativePromptError("pass either `negative_prompt` or `negative_prompt_embeds`, not both.")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        negative_prompt = list(negative_prompt)
        if not all(isinstance(n, str) for n in negative_prompt):
            raise NegativePromptError("expected `negative_prompt` to be a string or a list of strings.")
    if method_cls.level == "attention" and negative_prompt is None and negative_prompt_embeds is None:
        raise NegativePromptError(
            f"{name}: expected a negative prompt, got none. Pass negative_prompt='...' (or negative_prompt_embeds)."
        )
    remove(pipe)
    adapter = adapter_cls(pipe, method_cls(config), negative_prompt, negative_prompt_embeds)
    adapter.install()
    handle = GuidanceHandle(pipe, adapter)
    _applied[pipe] = handle
    return handle


def remove(pipe: Any) -> None:
    """Undo whatever ``apply`` did to ``pipe`` (nothing if it is not patched)."""
    handle = _applied.pop(pipe, None)
    if handle is not None:
        handle.adapter.remove()


def applied(pipe: Any) -> GuidanceHandle | None:
    """The active handle on ``pipe``, if any."""
    return _applied.get(pipe)
