"""The contract of a guidance method: its config, the ``Segments`` it works on, and the base classes.

A method never sees a model. Attention-level methods get the queries, keys and values of one
attention call already split by the adapter into image (``I``), positive-prompt (``P``) and
negative-prompt (``N``) tokens, and return the outputs of the query segments. Prediction-level
methods get the model's predictions for the positive and the negative conditioning.
"""

from __future__ import annotations

import dataclasses
from abc import ABC
from abc import abstractmethod
from typing import Any
from typing import ClassVar
from typing import Literal

import torch
from pydantic import BaseModel
from pydantic import ConfigDict
from pydantic import Field
from pydantic import ValidationError
from pydantic import model_validator

from negguide.errors import ConfigError

Layout = Literal["joint", "cross"]


class MethodConfig(BaseModel):
    """Parameters every method has: an on/off switch and a step window.

    ``start`` and ``stop`` are fractions of the denoising steps, in the convention of diffusers'
    guiders: step ``i`` of ``N`` is guided when ``int(start * N) <= i < int(stop * N)``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="Switch the method off without removing it.")
    start: float = Field(0.0, ge=0.0, le=1.0, description="First guided step, as a fraction of the steps.")
    stop: float = Field(1.0, ge=0.0, le=1.0, description="End of the guided steps (exclusive), as a fraction.")

    @model_validator(mode="after")
    def _window(self) -> MethodConfig:
        if self.start >= self.stop:
            raise ValueError(f"expected `start` < `stop`, got start={self.start!r} and stop={self.stop!r}")
        return self

    def active(self, step: int, num_steps: int) -> bool:
        """Whether step ``step`` of ``num_steps`` is inside the window."""
        if not self.enabled:
            return False
        return int(self.start * num_steps) <= step < int(self.stop * num_steps)


class AttentionMethodConfig(MethodConfig):
    """Parameters of every attention-level method: the step window plus a layer selection."""

    layers: list[int] | None = Field(
        None,
        description="Indices of the transformer blocks to guide (negative indices count from the end); "
        "None guides every block that sees text.",
    )

    def guides_layer(self, index: int, num_layers: int) -> bool:
        """Whether block ``index`` (of ``num_layers``) is guided."""
        if self.layers is None:
            return True
        return any(i == index or i + num_layers == index for i in self.layers)


@dataclasses.dataclass(frozen=True)
class Segments:
    """The queries, keys and values of one attention call, split by token group.

    Tensors are ``(batch, heads, tokens, head_dim)``, after the model's norms and rotary
    embeddings. In the ``joint`` layout (SD3, Flux) image and text tokens share one sequence and
    every segment has queries, keys and values. In the ``cross`` layout (Wan) only the image
    tokens are queries and the text is the context: ``k_img``, ``v_img``, ``q_pos`` and ``q_neg``
    are ``None``.

    ``neg_mask`` is ``None`` when every negative token is real, else a ``(batch, n)`` boolean
    tensor that is ``False`` on padding (a batch of negatives of different lengths).
    """

    layout: Layout
    q_img: torch.Tensor
    k_img: torch.Tensor | None
    v_img: torch.Tensor | None
    q_pos: torch.Tensor | None
    k_pos: torch.Tensor
    v_pos: torch.Tensor
    q_neg: torch.Tensor | None
    k_neg: torch.Tensor
    v_neg: torch.Tensor
    neg_mask: torch.Tensor | None = None
    scale: float | None = None

    @property
    def num_neg(self) -> int:
        """Number of negative tokens (including padding)."""
        return self.k_neg.shape[2]

    def rows(self, index: slice) -> Segments:
        """The same segments restricted to the batch rows ``index``."""
        changes = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, torch.Tensor):
                changes[field.name] = value[index]
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class SegmentOutputs:
    """Attention outputs of the query segments, ``(batch, heads, tokens, head_dim)``.

    ``pos`` and ``neg`` are ``None`` in the cross layout (text tokens are not queries there).
    """

    img: torch.Tensor
    pos: torch.Tensor | None = None
    neg: torch.Tensor | None = None


class GuidanceMethod(ABC):
    """Base class of every guidance method.

    Subclasses set ``name`` (a short lowercase id), ``level`` and ``Config`` (a ``MethodConfig``
    subclass), and optionally ``defaults``: per model family (``"sd3"``, ``"flux"``, ``"wan"``)
    the parameters that replace the config's own defaults when the user does not set them.
    """

    name: ClassVar[str]
    level: ClassVar[Literal["attention", "prediction"]]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    defaults: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, config: MethodConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()

    @classmethod
    def make_config(cls, params: dict[str, Any] | None = None, family: str | None = None) -> MethodConfig:
        """Validate ``params`` (over the family's defaults) into a ``Config``; raise ``ConfigError``."""
        merged = dict(cls.defaults.get(family, {})) if family else {}
        merged.update(params or {})
        try:
            return cls.Config(**merged)
        except ValidationError as exc:
            raise ConfigError(_describe(cls.name, exc, cls.Config)) from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


class AttentionMethod(GuidanceMethod):
    """A method that changes attention calls. Implement ``attend``."""

    level: ClassVar[Literal["attention", "prediction"]] = "attention"
    Config: ClassVar[type[MethodConfig]] = AttentionMethodConfig

    @abstractmethod
    def attend(self, seg: Segments) -> SegmentOutputs:
        """Return the guided outputs of the query segments of one attention call."""


class PredictionMethod(GuidanceMethod):
    """A method that combines the model's predictions. Implement ``combine``."""

    level: ClassVar[Literal["attention", "prediction"]] = "prediction"

    @abstractmethod
    def combine(self, pred_pos: torch.Tensor, pred_neg: torch.Tensor) -> torch.Tensor:
        """Return the guided prediction from the positive and negative predictions."""


def _describe(name: str, exc: ValidationError, config: type[BaseModel]) -> str:
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "config"
        got = err.get("input")
        kind = err["type"]
        ctx = err.get("ctx") or {}
        if kind == "extra_forbidden":
            known = ", ".join(f"`{f}`" for f in config.model_fields)
            lines.append(f"{name}: unknown parameter `{field}` (got {got!r}); known: {known}.")
        elif kind in {"greater_than_equal", "greater_than", "less_than_equal", "less_than"}:
            op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
            bound = next(iter(ctx.values()))
            lines.append(f"{name}: expected `{field}` {op} {bound!r}, got {got!r}.")
        elif kind == "value_error":
            lines.append(f"{name}: {ctx.get('error', err['msg'])}.")
        else:
            lines.append(f"{name}: `{field}`: {err['msg']} (got {got!r}).")
    return "\n".join(lines)
