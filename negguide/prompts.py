"""Prompt sets for ``negguide eval``, in NegGenBench's JSON format.

A set is a JSON list of objects, each with ``prompt``, ``missing_element`` (what the image should not
show: the negative prompt), ``question_1`` ("Is the image showing X with or without Y?") and
``question_2`` ("Is Y missing?"); other fields are kept. The NegGenBench file is
``prompts/test_prompts.json.new`` in the VSF repository. Built in: ``toyworld`` (the ToyWorld bench's pairs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic import ConfigDict
from pydantic import Field
from pydantic import ValidationError

from negguide.errors import PromptSetError

__all__ = ["BUILTIN_SETS", "PromptItem", "load_prompt_set", "toyworld_set"]

#: the sets ``--set NAME`` knows without a file
BUILTIN_SETS = ("toyworld",)

_FIELDS = ("prompt", "missing_element", "question_1", "question_2")


class PromptItem(BaseModel):
    """One prompt-set entry: the prompt, the element it must not show, the judge's two questions, and extras."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    prompt: str = Field(min_length=1, description="The positive prompt (X).")
    missing_element: str = Field(min_length=1, description="What the image should not show (Y): the negative prompt.")
    question_1: str = Field(min_length=1, description='"Is the image showing X with or without Y?"')
    question_2: str = Field(min_length=1, description='"Is Y missing?"')

    def as_dict(self) -> dict[str, Any]:
        """Every field, extras included, as a judge receives the item."""
        return self.model_dump()


def toyworld_set() -> list[PromptItem]:
    """The ToyWorld bench's (primary, companion) pairs as a NegGenBench set: the companion is the missing element."""
    from negguide.toyworld.world import PAIRS

    return [
        PromptItem(
            prompt=primary,
            missing_element=companion,
            question_1=f"Is the image showing a {primary} with or without a {companion}?",
            question_2=f"Is the {companion} missing?",
            source="toyworld",
        )
        for primary, companion in PAIRS
    ]


def _validate(data: Any, where: str) -> list[PromptItem]:
    if not isinstance(data, list) or not data:
        raise PromptSetError(
            f"{where}: expected a non-empty JSON list of objects with {', '.join(_FIELDS)}, "
            f"got {type(data).__name__ if data else data!r}; see NegGenBench's prompts/test_prompts.json.new"
        )
    items = []
    for index, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise PromptSetError(
                f"{where}: item {index}: expected an object with {', '.join(_FIELDS)}, got {type(entry).__name__}"
            )
        try:
            items.append(PromptItem.model_validate(entry))
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(p) for p in error["loc"]) or "?"
            if error["type"] == "missing":
                problem = f"missing field `{field}` (has: {', '.join(map(repr, entry)) or 'none'})"
            else:
                problem = f"`{field}`: expected a non-empty string, got {error.get('input')!r}"
            raise PromptSetError(f"{where}: item {index}: {problem}; every item needs {', '.join(_FIELDS)}") from None
    return items


def load_prompt_set(source: str | Path | list[Any]) -> list[PromptItem]:
    """A prompt set: a built-in name (``"toyworld"``), a JSON file in NegGenBench's format, or its parsed list.

    Raises:
        PromptSetError: no such file or set, not JSON, not a list, or an item lacks a field or has a wrong one
            (the message names the item's index and the field).
    """
    if isinstance(source, list):
        return _validate(source, "prompt set")
    if isinstance(source, str) and source in BUILTIN_SETS:
        return toyworld_set()
    path = Path(source)
    if not path.is_file():
        raise PromptSetError(
            f"expected a built-in prompt set ({', '.join(map(repr, BUILTIN_SETS))}) or a JSON file, "
            f"got {str(source)!r}; "
            "pass a NegGenBench-format file such as prompts/test_prompts.json.new"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0]
        raise PromptSetError(
            f"{path}: expected JSON (a list of prompt objects), got unreadable text: {first}"
        ) from None
    return _validate(data, str(path))
