"""Guidance specs from YAML files or dicts. The only module that imports omegaconf."""

from __future__ import annotations

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
        if not field:  # a rule across keys
            raise ConfigError(f"config: {first['ctx']['error']}.") from None
        raise ConfigError(f"config: `{field}`: {first['msg']} (got {first.get('input')!r}).") from None
