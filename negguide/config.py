"""Guidance specs from YAML files or dicts. The only module that imports omegaconf."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic import ConfigDict
from pydantic import Field
from pydantic import ValidationError

from negguide.errors import ConfigError


class GuidanceSpec(BaseModel):
    """A method, its parameters and its negative prompt, as written in a config file.

    ```yaml
    method: vsf
    adapter: auto
    negative_prompt: snow
    params: {scale: 3.5, bias: 0.1}
    ```
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = Field(description="Entry-point id of the guidance method, e.g. 'vsf'.")
    adapter: str = Field("auto", description="Model family adapter ('auto' picks the one that matches).")
    negative_prompt: str | list[str] | None = Field(None, description="Negative prompt(s); None keeps the call's.")
    params: dict[str, Any] = Field(default_factory=dict, description="Method parameters, validated by its Config.")


def load_config(source: str | Path | dict[str, Any]) -> GuidanceSpec:
    """Read a ``GuidanceSpec`` from a YAML file path or a dict (omegaconf interpolation resolved)."""
    from omegaconf import OmegaConf

    try:
        if isinstance(source, dict):
            container = OmegaConf.to_container(OmegaConf.create(source), resolve=True)
        else:
            path = Path(source)
            if not path.is_file():
                raise ConfigError(
                    f"config file {str(path)!r} not found; expected a YAML file with `method:` and `params:`."
                )
            container = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"could not read the config {source!r}: {exc}") from None
    if not isinstance(container, dict):
        raise ConfigError(f"expected a mapping with `method:` and `params:`, got {type(container).__name__}.")
    try:
        return GuidanceSpec.model_validate(container)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"config: `{field}`: {first['msg']} (got {first.get('input')!r}).") from None
