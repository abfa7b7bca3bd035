"""Guidance specs from YAML files or dicts. The only module that imports omegaconf; no resolver ever runs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated
from typing import Any

from pydantic import BaseModel
from pydantic import ConfigDict
from pydantic import Field
from pydantic import ValidationError
from pydantic import model_validator

from negguide.errors import ConfigError


class GuidanceSpec(BaseModel):
    """A method, its parameters and its negative prompt, as written in a config file.

    ```yaml
    method: vsf
    adapter: auto
    negative_prompt: snow          # or: negatives: {snow: 1.0, people: 0.5}
    params: {scale: 3.5, bias: 0.1}
    ```
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = Field(description="Entry-point id of the guidance method, e.g. 'vsf'.")
    adapter: str = Field("auto", description="Model family adapter ('auto' picks the one that matches).")
    negative_prompt: str | list[str] | None = Field(None, description="Negative prompt(s); None keeps the call's.")
    negatives: dict[str, Annotated[float, Field(ge=0.0, allow_inf_nan=False, strict=True)]] | None = Field(
        None,
        description="Several weighted negatives applied to every prompt, e.g. {snow: 1.0, people: 0.5}; "
        "exclusive with negative_prompt.",
    )
    params: dict[str, Any] = Field(default_factory=dict, description="Method parameters, validated by its Config.")

    @model_validator(mode="after")
    def _one_kind_of_negative(self) -> GuidanceSpec:
        if self.negative_prompt is not None and self.negatives is not None:
            raise ValueError("expected either `negative_prompt` or `negatives`, got both")
        if self.negatives is not None and not self.negatives:
            raise ValueError("expected at least one entry in `negatives`, got an empty mapping")
        return self


#: where an interpolation starts (``\${`` is an escaped, literal ``${``)
_OPEN = re.compile(r"(?<!\\)\$\{")
#: the only interpolation allowed: a key of the file itself, ``${params.scale}``, ``${.scale}``, ``${a[0]}``
_KEY = re.compile(r"\$\{\s*\.*[A-Za-z_][\w.\[\]]*\s*\}")


def load_config(source: str | Path | dict[str, Any], pm: Any = None) -> GuidanceSpec:
    """Read a ``GuidanceSpec`` from a YAML file path or a dict, and validate it.

    A config file is data: interpolation of its own keys (``${.scale}``, ``${params.scale}``) is
    resolved, but no resolver may run (``${oc.env:HOME}`` and any other ``${name:...}`` are refused),
    so a file can read neither the environment nor the file system. The method must be installed,
    its ``params`` must validate with its config (the model family's defaults are merged at
    ``apply``), and ``adapter`` must be ``auto`` or an installed family. ``pm``: a plugin manager
    (tests); the process-wide one by default.
    """
    from omegaconf import OmegaConf

    try:
        if isinstance(source, dict):
            cfg = OmegaConf.create(source)
        else:
            path = Path(source)
            if path.is_dir():
                raise ConfigError(
                    f"config {str(path)!r} is a directory, not a file; expected a YAML file with `method:` and "
                    "`params:`."
                )
            if not path.is_file():
                raise ConfigError(
                    f"config file {str(path)!r} not found; expected a YAML file with `method:` and `params:`."
                )
            cfg = OmegaConf.load(path)
        _refuse_resolvers(OmegaConf.to_container(cfg, resolve=False), source)
        container = OmegaConf.to_container(cfg, resolve=True)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"could not read the config {source!r}: {exc}") from None
    if not isinstance(container, dict):
        raise ConfigError(f"expected a mapping with `method:` and `params:`, got {type(container).__name__}.")
    try:
        spec = GuidanceSpec.model_validate(container)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        if not field:  # a rule across keys
            raise ConfigError(f"config: {first['ctx']['error']}.") from None
        raise ConfigError(f"config: `{field}`: {first['msg']} (got {first.get('input')!r}).") from None
    from negguide import registry

    registry.get_method(spec.method, pm).make_config(spec.params)
    families = registry.list_adapters(pm)
    if spec.adapter != "auto" and spec.adapter not in families:
        raise ConfigError(
            f"config: expected `adapter` to be 'auto' or an installed family ({', '.join(map(repr, families))}), "
            f"got {spec.adapter!r}."
        )
    return spec


def _refuse_resolvers(node: Any, source: Any) -> None:
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        for text in (key, value):
            if isinstance(text, str) and any(not _KEY.match(text, m.start()) for m in _OPEN.finditer(text)):
                raise ConfigError(
                    f"config {source!r}: expected plain values or interpolations of the file's own keys such as "
                    f"${{params.scale}}, got {text!r}. Config files are data: no resolver (oc.env, ...) runs, so "
                    "they cannot read the environment or files; write the value itself."
                )
        _refuse_resolvers(value, source)
