"""Plugin discovery: a pluggy manager over the ``negguide`` entry-point group.

Built-in methods and adapters are registered through the same hooks as third-party ones.
Nothing is loaded at ``import negguide``: the default manager is built on first use.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import os
import threading
import warnings
from collections.abc import Callable
from typing import Any

import pluggy

from negguide import hookspecs
from negguide.errors import NoAdapterError
from negguide.errors import PluginError
from negguide.errors import UnknownMethodError

ENTRY_POINT_GROUP = "negguide"


def _adapter_modules() -> tuple[str, ...]:
    import pkgutil

    import negguide.adapters

    names = sorted(m.name for m in pkgutil.iter_modules(negguide.adapters.__path__) if not m.name.startswith("_"))
    return tuple(f"negguide.adapters.{name}" for name in names)


#: Modules registered as plugins before any third-party entry point: the built-in methods, then every module of
#: ``negguide.adapters`` (one per model family), in name order.
DEFAULT_PLUGINS = (
    "negguide.plugins.cfg",
    "negguide.plugins.vsf",
    "negguide.plugins.nag",
    "negguide.plugins.nasa",
    "negguide.judges.toyworld",
    "negguide.judges.clip",
    "negguide.judges.vqa",
    *_adapter_modules(),
)


@dataclasses.dataclass(frozen=True)
class PluginInfo:
    """Where a registered method or adapter comes from."""

    name: str  #: the plugin's name in the manager (module path or entry-point name)
    package: str  #: the distribution that provides it
    version: str  #: that distribution's version


def get_plugin_manager(entry_points: bool = True) -> pluggy.PluginManager:
    """Return a new plugin manager with the hook specs, the built-ins and (optionally) entry points.

    ``NEGGUIDE_LOAD_PLUGINS=a,b`` loads only the entry points named ``a`` and ``b``; an empty
    value loads none. A plugin whose import fails is skipped with a warning naming it.
    """
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    for module_name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
    if entry_points:
        _load_entry_points(pm)
    return pm


def _negguide_version() -> str:
    try:
        return importlib.metadata.version("negguide")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    allowed = os.environ.get("NEGGUIDE_LOAD_PLUGINS")
    wanted = None if allowed is None else {n.strip() for n in allowed.split(",") if n.strip()}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if wanted is not None and ep.name not in wanted:
            continue
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party plugin must not break the others
            warnings.warn(
                f"negguide plugin {ep.name!r} ({ep.value}) failed to load and was skipped: "
                f"{type(exc).__name__}: {exc}. Uninstall it or set NEGGUIDE_LOAD_PLUGINS to exclude it.",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        pm.register(plugin, name=ep.name)
        dist = getattr(ep, "dist", None)
        pm._negguide_sources = getattr(pm, "_negguide_sources", {})  # noqa: SLF001
        pm._negguide_sources[ep.name] = PluginInfo(  # noqa: SLF001
            ep.name, dist.name if dist else ep.name, dist.version if dist else "unknown"
        )


def _source(pm: pluggy.PluginManager, plugin_name: str) -> PluginInfo:
    sources = getattr(pm, "_negguide_sources", {})
    if plugin_name in sources:
        return sources[plugin_name]
    if plugin_name.startswith("negguide."):
        return PluginInfo(plugin_name, "negguide", _negguide_version())
    return PluginInfo(plugin_name, plugin_name, "unknown")


def _collect(pm: pluggy.PluginManager, hook_name: str, base: type) -> dict[str, tuple[type, PluginInfo]]:
    found: dict[str, tuple[type, PluginInfo]] = {}
    attr = "family" if hook_name == "register_adapters" else "name"
    kind = {"register_methods": "method", "register_adapters": "adapter"}.get(hook_name, "judge")
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        info = _source(pm, impl.plugin_name)

        def register(cls: type, _info: PluginInfo = info) -> None:
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise PluginError(
                    f"plugin {_info.name!r} registered {cls!r} with `{hook_name}`; expected a subclass of "
                    f"{base.__name__}. Pass the class itself, e.g. register(MyMethod)."
                )
            key = getattr(cls, attr, None)
            if not isinstance(key, str) or not key:
                raise PluginError(f"plugin {_info.name!r}: {cls.__name__} has no `{attr}`; set a short lowercase id.")
            problems = _contract_problems(kind, cls)
            if problems:
                raise PluginError(
                    f"plugin {_info.name!r} registered the {kind} {cls.__name__} ({key!r}), which breaks the {kind} "
                    f"contract: it lacks {'; '.join(problems)}. See docs/plugins/writing-plugins.md."
                )
            if key in found:
                other = found[key][1].name
                raise PluginError(
                    f"{kind} {key!r} registered twice: by {other!r} and by {_info.name!r}. "
                    f"Uninstall one of them or exclude it with NEGGUIDE_LOAD_PLUGINS."
                )
            found[key] = (cls, _info)

        kwargs: dict[str, Callable[[type], None]] = {"register": register}
        impl.function(**{k: v for k, v in kwargs.items() if k in impl.argnames})
    return found


def _contract_problems(kind: str, cls: type) -> list[str]:
    if kind == "adapter":
        from negguide.adapter import contract_problems

        return contract_problems(cls)
    if kind == "judge":
        from negguide.judge import JudgeConfig

        config = getattr(cls, "Config", None)
        problems = [] if isinstance(config, type) and issubclass(config, JudgeConfig) else ["`Config` (a JudgeConfig)"]
        missing = sorted(getattr(cls, "__abstractmethods__", ()))
        return problems + (["the method(s) " + ", ".join(f"`{m}`" for m in missing)] if missing else [])
    from negguide.method import MethodConfig

    problems = []
    if getattr(cls, "level", None) not in ("attention", "prediction"):
        problems.append("`level` (subclass AttentionMethod or PredictionMethod)")
    config = getattr(cls, "Config", None)
    if not (isinstance(config, type) and issubclass(config, MethodConfig)):
        problems.append("`Config` (a MethodConfig subclass)")
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:
        problems.append("the method(s) " + ", ".join(f"`{m}`" for m in missing))
    defaults = getattr(cls, "defaults", None)
    if not isinstance(defaults, dict) or not all(isinstance(v, dict) for v in defaults.values()):
        problems.append("`defaults` (a dict of family -> parameters)")
    return problems


_lock = threading.Lock()
_default: pluggy.PluginManager | None = None


def default_plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager, built once on first use (lazy and idempotent)."""
    global _default
    with _lock:
        if _default is None:
            _default = get_plugin_manager()
        return _default


def reset() -> None:
    """Forget the process-wide manager; the next call rebuilds it (re-reads NEGGUIDE_LOAD_PLUGINS)."""
    global _default
    with _lock:
        _default = None


def methods(pm: pluggy.PluginManager | None = None) -> dict[str, tuple[type, PluginInfo]]:
    """All registered methods: name -> (class, source)."""
    from negguide.method import GuidanceMethod

    return _collect(pm or default_plugin_manager(), "register_methods", GuidanceMethod)


def adapters(pm: pluggy.PluginManager | None = None) -> dict[str, tuple[type, PluginInfo]]:
    """All registered adapters: family -> (class, source)."""
    from negguide.adapter import Adapter

    return _collect(pm or default_plugin_manager(), "register_adapters", Adapter)


def judges(pm: pluggy.PluginManager | None = None) -> dict[str, tuple[type, PluginInfo]]:
    """All registered judges: name -> (class, source)."""
    from negguide.judge import Judge

    return _collect(pm or default_plugin_manager(), "register_judges", Judge)


def list_judges(pm: pluggy.PluginManager | None = None) -> list[str]:
    """Names of the installed judges, sorted."""
    return sorted(judges(pm))


def get_judge(name: str, pm: pluggy.PluginManager | None = None) -> type:
    """The judge class registered as ``name``; ``UnknownJudgeError`` if there is none."""
    from negguide.errors import UnknownJudgeError

    found = judges(pm)
    if name not in found:
        installed = ", ".join(repr(n) for n in sorted(found)) or "none"
        raise UnknownJudgeError(f"no judge {name!r}; installed: {installed}. Is negguide-{name} installed?")
    return found[name][0]


def list_methods(pm: pluggy.PluginManager | None = None) -> list[str]:
    """Names of the installed guidance methods, sorted."""
    return sorted(methods(pm))


def list_adapters(pm: pluggy.PluginManager | None = None) -> list[str]:
    """Families of the installed adapters, sorted."""
    return sorted(adapters(pm))


def get_method(name: str, pm: pluggy.PluginManager | None = None) -> type:
    """The method class registered as ``name``; ``UnknownMethodError`` if there is none."""
    found = methods(pm)
    if name not in found:
        installed = ", ".join(repr(n) for n in sorted(found)) or "none"
        raise UnknownMethodError(f"no guidance method {name!r}; installed: {installed}. Is negguide-{name} installed?")
    return found[name][0]


def get_adapter(denoiser: Any, pm: pluggy.PluginManager | None = None) -> type:
    """The adapter class whose ``matches(denoiser)`` is true; ``NoAdapterError`` otherwise."""
    found = adapters(pm)
    for _family, (cls, _info) in sorted(found.items()):
        if cls.matches(denoiser):
            return cls
    installed = ", ".join(repr(n) for n in sorted(found)) or "none"
    processors = getattr(denoiser, "attn_processors", None)
    proc = ""
    if processors:
        proc = f" (processor {type(next(iter(processors.values()))).__name__})"
    raise NoAdapterError(
        f"no adapter matches {type(denoiser).__name__}{proc}; installed: {installed}. "
        "Install a plugin for this model family or write one (docs: plugins/writing-plugins)."
    )


#: pipeline attributes that hold a denoiser in diffusers pipelines, for error messages
_DENOISER_NAMES = ("transformer", "unet", "prior", "decoder")


def adapter_for(pipe: Any, pm: pluggy.PluginManager | None = None) -> type:
    """The adapter class that knows ``pipe``: the first (by family) one of whose ``denoisers`` matches.

    Raises ``NoAdapterError`` naming the pipeline's denoiser and the installed adapters.
    """
    found = adapters(pm)
    for _family, (cls, _info) in sorted(found.items()):
        for name in cls.denoisers:
            module = getattr(pipe, name, None)
            if module is not None and cls.matches(module):
                return cls
    names = sorted({n for cls, _ in found.values() for n in cls.denoisers} | set(_DENOISER_NAMES))
    present = [n for n in names if getattr(pipe, n, None) is not None]
    if not present:
        raise NoAdapterError(
            f"expected a diffusers pipeline with a denoiser (one of {', '.join(f'`{n}`' for n in names)}), got "
            f"{type(pipe).__name__}. negguide guides diffusers pipelines (SD3, Flux, Wan, ...)."
        )
    return get_adapter(getattr(pipe, present[0]), pm)


def family_defaults(method: type, family: str, pm: pluggy.PluginManager | None = None) -> dict[str, Any]:
    """The parameters that replace ``method``'s own defaults on ``family``, from every plugin that gives some.

    A method plugin gives them per family (``GuidanceMethod.defaults``), an adapter plugin per method
    for its own family (``Adapter.defaults``); where both give a parameter, the adapter's wins (it
    states the facts of its model).
    """
    merged = dict(getattr(method, "defaults", {}).get(family, {}))
    entry = adapters(pm).get(family)
    if entry is not None:
        merged.update(entry[0].defaults.get(getattr(method, "name", ""), {}))
    return merged
