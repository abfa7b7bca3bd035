"""The judge contract: a plugin that looks at one generated image and says whether the prompt's subject is
there, whether the negative's is gone, and how good the picture is.

Judges are the third plugin kind, beside methods and adapters: ``register_judges(register)``. ``negguide
eval`` asks one for every (setting, item, seed) image.
"""

from __future__ import annotations

from abc import ABC
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any
from typing import ClassVar

from pydantic import BaseModel
from pydantic import ConfigDict
from pydantic import ValidationError

from negguide.errors import ConfigError

__all__ = ["Judge", "JudgeConfig", "Verdict"]


class JudgeConfig(BaseModel):
    """A judge's settings: unknown keys and wrong types are errors (``--judge-param KEY=VALUE``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


@dataclass(frozen=True)
class Verdict:
    """What a judge says about one image."""

    #: the prompt's subject is there (question 1: "X with or without Y?" answered about X)
    positive: bool | None
    #: the negative's element is absent (question 2: "Is Y missing?")
    removed: bool | None
    #: overall quality in [0, 1]
    quality: float | None
    #: the judge's own answer(s), recorded as given
    raw: Any = None
    #: the answer could not be read; the fields it lacks are None, never guessed
    malformed: bool = False


class Judge(ABC):
    """Base class of judges. Subclasses set ``name`` and ``Config`` and implement `judge`.

    Example:
        ```python
        @negguide.hookimpl
        def register_judges(register):
            register(MyJudge)
        ```
    """

    #: short lowercase id: ``--judge NAME`` and the entry-point name
    name: ClassVar[str] = ""
    #: the judge's settings (a `JudgeConfig` subclass)
    Config: ClassVar[type[JudgeConfig]] = JudgeConfig

    def __init__(self, config: JudgeConfig | None = None, **params: Any) -> None:
        self.config = config if config is not None else self.make_config(params)

    @classmethod
    def make_config(cls, params: dict[str, Any]) -> JudgeConfig:
        """Validate ``params`` with ``Config``; a `ConfigError` naming the judge and the field otherwise."""
        try:
            return cls.Config.model_validate(params)
        except ValidationError as exc:
            problems = []
            for error in exc.errors():
                where = ".".join(str(p) for p in error["loc"]) or "?"
                if error["type"] == "extra_forbidden":
                    known = ", ".join(f"`{k}`" for k in cls.Config.model_fields) or "none"
                    problems.append(f"unknown parameter `{where}` (known: {known})")
                else:
                    problems.append(f"`{where}`: {error['msg'].lower()}, got {error.get('input')!r}")
            raise ConfigError(f"judge {cls.name}: " + "; ".join(problems) + ". See `negguide judges`.") from None

    @abstractmethod
    def judge(self, image: Any, item: dict[str, Any]) -> Verdict:
        """Judge one PIL ``image`` generated for ``item`` (a prompt-set entry: ``prompt``, ``missing_element``,
        ``question_1``, ``question_2``, ...)."""
