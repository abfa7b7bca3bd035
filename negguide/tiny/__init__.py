"""Tiny random-weight pipelines of every built-in family, built fully offline in seconds on a CPU.

Every model is built from a config (random init, seeded), never downloaded; tokenizers are built in
memory (``negguide.tiny.parts``), so any string tokenizes. One module per family in
``negguide.tiny.families`` defines ``build`` and ``CALL``; this package finds them all:

* ``BUILDERS[family]`` (also ``tiny.<family>(...)``, e.g. ``tiny.sd3()``) builds the pipeline;
* ``CALL_KWARGS[family]`` holds keyword arguments for a quick call.

Used by ``negguide demo``, the tests and the conformance kit; the outputs are noise-like pictures,
not images of anything: these pipelines prove the code path, not the image quality.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

from negguide.tiny import families as _families
from negguide.tiny.parts import clip_config
from negguide.tiny.parts import clip_tokenizer
from negguide.tiny.parts import finish
from negguide.tiny.parts import t5_config
from negguide.tiny.parts import t5_tokenizer
from negguide.tiny.parts import vae

_MODULES = {
    info.name: importlib.import_module(f"{_families.__name__}.{info.name}")
    for info in sorted(pkgutil.iter_modules(_families.__path__), key=lambda i: i.name)
    if not info.name.startswith("_")
}

#: family -> the function that builds its tiny pipeline
BUILDERS: dict[str, Callable[..., Any]] = {name: module.build for name, module in _MODULES.items()}
#: family -> keyword arguments for a quick call of its tiny pipeline
CALL_KWARGS: dict[str, dict[str, Any]] = {name: dict(module.CALL) for name, module in _MODULES.items()}
#: the tiny Wan transformer's config (tests build variants from it)
WAN_TRANSFORMER: dict[str, Any] = _MODULES["wan"].WAN_TRANSFORMER

__all__ = [
    "BUILDERS",
    "CALL_KWARGS",
    "WAN_TRANSFORMER",
    "clip_config",
    "clip_tokenizer",
    "finish",
    "t5_config",
    "t5_tokenizer",
    "vae",
]


def __getattr__(name: str) -> Any:
    # tiny.sd3(), tiny.flux(kontext=True), tiny.wan(num_layers=4): the family's builder
    if name in BUILDERS:
        return BUILDERS[name]
    raise AttributeError(f"module 'negguide.tiny' has no attribute {name!r}; families: {sorted(BUILDERS)}")
