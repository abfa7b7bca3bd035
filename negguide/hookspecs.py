"""The plugin hooks of negguide. A plugin implements them with ``@negguide.hookimpl``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("negguide")
hookimpl = pluggy.HookimplMarker("negguide")


@hookspec
def register_methods(register: Callable[[type[Any]], None]) -> None:
    """Register GuidanceMethod subclasses, e.g. ``register(NormalizedAttentionGuidance)``."""


@hookspec
def register_adapters(register: Callable[[type[Any]], None]) -> None:
    """Register Adapter subclasses for model families, e.g. ``register(WanAdapter)``."""


@hookspec
def register_judges(register: Callable[[type[Any]], None]) -> None:
    """Register Judge subclasses for ``negguide eval``, e.g. ``register(ToyWorldJudge)``."""
