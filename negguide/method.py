"""The contract of a guidance method: its config, the ``Segments`` it works on, and the base classes.

A method never sees a model. Attention-level methods get the queries, keys and values of one
attention call already split by the installation into image (``I``), positive-prompt (``P``) and
negative-prompt (``N_1 .. N_k``, each with its weight) tokens, and return the outputs of the query
segments. Prediction-level methods get the model's predictions for the positive and for each
negative conditioning.
"""

from __future__ import annotations

import dataclasses
from abc import ABC
from abc import abstractmethod
from collections.abc import Sequence
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

    # strict: a string, a bool or a float never passes for a number, a bool or an index (the CLI and YAML
    # parse their text into typed values first)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

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
    """Parameters of every attention-level method: the step window, a layer selection and the kernel path."""

    layers: list[int] | None = Field(
        None,
        min_length=1,
        description="Indices of the transformer blocks to guide (negative indices count from the end); "
        "None guides every block that sees text. Checked against the model's blocks at apply.",
    )
    attention: Literal["auto", "dense", "split"] = Field(
        "auto",
        description="Kernel path: 'dense' = one SDPA call with an additive mask (the reference), 'split' = "
        "mask-free partial attentions merged by log-sum-exp, 'auto' = split where a log-sum-exp kernel exists.",
    )

    def check_layers(self, num_layers: int, family: str, name: str) -> None:
        """Raise ``ConfigError`` if ``layers`` names a block the model does not have (``num_layers`` blocks)."""
        bad = [i for i in self.layers or () if not -num_layers <= i < num_layers]
        if bad:
            raise ConfigError(
                f"{name}: expected `layers` in {-num_layers} .. {num_layers - 1} (this {family} model has "
                f"{num_layers} blocks that see text), got {bad}."
            )

    def guides_layer(self, index: int, num_layers: int) -> bool:
        """Whether block ``index`` (of ``num_layers``) is guided."""
        if self.layers is None:
            return True
        return any(i == index or i + num_layers == index for i in self.layers)


@dataclasses.dataclass(frozen=True)
class NegativeTokens:
    """One negative prompt's tokens in one attention call: ``(batch, heads, tokens, head_dim)``.

    ``q`` is ``None`` in the cross layout (text tokens are not queries there). ``mask`` is ``None``
    when every token is real, else ``(batch, tokens)`` boolean, ``False`` on padding; a row whose
    mask is all ``False`` has no negative (an empty prompt in a list: the installation runs a row
    that no negative reaches unguided). ``weight`` >= 0 is the user's weight of this negative (1
    for ``negative_prompt``).
    """

    q: torch.Tensor | None
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None = None
    weight: float = 1.0

    @property
    def num_tokens(self) -> int:
        """Tokens of this negative, padding included."""
        return self.k.shape[2]

    def rows(self, index: slice) -> NegativeTokens:
        """The same tokens restricted to the batch rows ``index``."""
        return NegativeTokens(
            None if self.q is None else self.q[index],
            self.k[index],
            self.v[index],
            None if self.mask is None else self.mask[index],
            self.weight,
        )


@dataclasses.dataclass(frozen=True)
class Segments:
    """The queries, keys and values of one attention call, split by token group.

    Tensors are ``(batch, heads, tokens, head_dim)``, after the model's norms and rotary
    embeddings. In the ``joint`` layout (SD3, Flux) image and text tokens share one sequence and
    every segment has queries, keys and values. In the ``cross`` layout (Wan) only the image
    tokens are queries and the text is the context: ``k_img``, ``v_img``, ``q_pos`` and every
    negative's ``q`` are ``None``.

    ``negatives`` holds one ``NegativeTokens`` per negative prompt (at least one), in the order
    they were given. ``pos_mask`` is ``None`` when every positive token is real, else
    ``(batch, tokens)`` boolean, ``False`` on the prompt's padding (families whose text carries a
    mask). ``scale`` is the softmax scale (``None``: ``1 / sqrt(head_dim)``).

    ``Segments.one(...)`` builds the common one-negative case; ``q_neg``, ``k_neg``, ``v_neg``
    and ``neg_mask`` read that negative.
    """

    layout: Layout
    q_img: torch.Tensor
    k_img: torch.Tensor | None
    v_img: torch.Tensor | None
    q_pos: torch.Tensor | None
    k_pos: torch.Tensor
    v_pos: torch.Tensor
    negatives: tuple[NegativeTokens, ...]
    pos_mask: torch.Tensor | None = None
    scale: float | None = None

    @classmethod
    def one(
        cls,
        layout: Layout,
        q_img: torch.Tensor,
        k_img: torch.Tensor | None,
        v_img: torch.Tensor | None,
        q_pos: torch.Tensor | None,
        k_pos: torch.Tensor,
        v_pos: torch.Tensor,
        q_neg: torch.Tensor | None,
        k_neg: torch.Tensor,
        v_neg: torch.Tensor,
        neg_mask: torch.Tensor | None = None,
        scale: float | None = None,
        pos_mask: torch.Tensor | None = None,
    ) -> Segments:
        """Segments with one negative of weight 1."""
        neg = NegativeTokens(q_neg, k_neg, v_neg, neg_mask)
        return cls(layout, q_img, k_img, v_img, q_pos, k_pos, v_pos, (neg,), pos_mask, scale)

    def _only(self) -> NegativeTokens:
        if len(self.negatives) != 1:
            raise ValueError(
                f"expected one negative, got {len(self.negatives)}; read `seg.negatives` to handle several."
            )
        return self.negatives[0]

    @property
    def num_neg(self) -> int:
        """Tokens of the only negative (including padding)."""
        return self._only().num_tokens

    @property
    def q_neg(self) -> torch.Tensor | None:
        """The only negative's queries (joint layout)."""
        return self._only().q

    @property
    def k_neg(self) -> torch.Tensor:
        """The only negative's keys."""
        return self._only().k

    @property
    def v_neg(self) -> torch.Tensor:
        """The only negative's values."""
        return self._only().v

    @property
    def neg_mask(self) -> torch.Tensor | None:
        """The only negative's padding mask."""
        return self._only().mask

    def rows(self, index: slice) -> Segments:
        """The same segments restricted to the batch rows ``index``."""
        changes: dict[str, Any] = {"negatives": tuple(n.rows(index) for n in self.negatives)}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, torch.Tensor):
                changes[field.name] = value[index]
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class SegmentOutputs:
    """Attention outputs of the query segments, ``(batch, heads, tokens, head_dim)``.

    Joint layout: ``pos`` for the positive text queries and ``negs`` with one output per negative
    of ``Segments.negatives`` (its own tokens' queries), in the same order. Cross layout: ``pos``
    is ``None`` and ``negs`` empty (text tokens are not queries there).
    """

    img: torch.Tensor
    pos: torch.Tensor | None = None
    negs: tuple[torch.Tensor, ...] = ()

    @property
    def neg(self) -> torch.Tensor | None:
        """The only negative's output (joint layout), or ``None``."""
        if not self.negs:
            return None
        if len(self.negs) != 1:
            raise ValueError(f"expected one negative output, got {len(self.negs)}; read `negs`.")
        return self.negs[0]


class GuidanceMethod(ABC):
    """Base class of every guidance method.

    Subclasses set ``name`` (a short lowercase id), ``level`` and ``Config`` (a ``MethodConfig``
    subclass), and optionally ``defaults``: per model family (``"sd3"``, ``"flux"``, ``"wan"``)
    the parameters that replace the config's own defaults when the user does not set them. An
    adapter plugin can add defaults for its own family (``Adapter.defaults``);
    ``negguide.registry.family_defaults`` merges both.
    """

    name: ClassVar[str]
    level: ClassVar[Literal["attention", "prediction"]]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    defaults: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, config: MethodConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()

    @classmethod
    def make_config(
        cls,
        params: dict[str, Any] | None = None,
        family: str | None = None,
        defaults: dict[str, Any] | None = None,
    ) -> MethodConfig:
        """Validate ``params`` over defaults into a ``Config``; raise ``ConfigError``.

        ``defaults`` replace the config's own defaults (``apply`` passes the family's, merged from
        every plugin by ``negguide.registry.family_defaults``); without them, ``family`` picks this
        method's own ``defaults`` entry.
        """
        merged = dict(defaults if defaults is not None else cls.defaults.get(family, {}) if family else {})
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
        """Return the guided outputs of the query segments of one attention call.

        ``seg.negatives`` holds one or more weighted negatives (in the joint layout return one
        output per negative in ``negs``, its tokens' queries over ``[I, N_i]`` as
        ``negguide.attention.isolated`` computes them, unless the method defines otherwise).
        """


class PredictionMethod(GuidanceMethod):
    """A method that combines the model's predictions. Implement ``combine``."""

    level: ClassVar[Literal["attention", "prediction"]] = "prediction"

    @abstractmethod
    def combine(
        self, pred_pos: torch.Tensor, preds_neg: Sequence[torch.Tensor], weights: Sequence[float]
    ) -> torch.Tensor:
        """Return the guided prediction from the positive prediction and one prediction per weighted negative."""


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
        elif kind == "too_short" and field == "layers":
            lines.append(
                f"{name}: expected at least one block index in `layers`, got {got!r}. To run without guidance "
                "set `enabled=False`; to guide every block leave `layers` out."
            )
        else:
            lines.append(f"{name}: `{field}`: {err['msg']} (got {got!r}).")
    return "\n".join(lines)
