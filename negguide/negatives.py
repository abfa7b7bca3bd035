"""The negatives of one application: what the user asked for, validated, before anything is encoded.

``negative_prompt`` keeps its diffusers meaning (one string for every prompt, or a list with one
per prompt); ``negatives`` adds several weighted negatives applied to every prompt of a call, as a
mapping ``{"snow": 1.0, "people": 0.5}`` or a sequence of entries, each a string, precomputed
embeddings (the family's ``negative_prompt_embeds`` format), or a ``(string or embeddings,
weight)`` pair. The two are mutually exclusive, and ``negative_prompt_embeds`` is the one-negative
form of embeddings.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import torch

from negguide.errors import NegativePromptError


@dataclasses.dataclass(frozen=True)
class NegativeSpec:
    """One negative: its text (one string for every prompt, or one per prompt) or its embeddings, and its weight."""

    text: str | tuple[str, ...] | None = None
    embeds: Any = None
    weight: float = 1.0

    def describe(self) -> str:
        """A short label for messages: the text, or the embeddings' shape."""
        if self.embeds is not None:
            shape = getattr(self.embeds, "shape", None)
            return f"embeddings {tuple(shape)}" if shape is not None else "embeddings"
        return repr(self.text)


def parse(
    name: str,
    negative_prompt: Any = None,
    negative_prompt_embeds: Any = None,
    negatives: Any = None,
) -> list[NegativeSpec]:
    """The validated negatives of ``apply`` (empty: none given). ``name`` is the method, for messages."""
    given = [k for k, v in (("negative_prompt", negative_prompt), ("negative_prompt_embeds", negative_prompt_embeds),
                            ("negatives", negatives)) if v is not None]  # fmt: skip
    if len(given) > 1:
        raise NegativePromptError(
            f"{name}: pass one of `negative_prompt`, `negative_prompt_embeds` and `negatives`, got "
            f"{' and '.join(f'`{g}`' for g in given)}. Use `negatives` for several weighted negatives."
        )
    if negative_prompt is not None:
        return [NegativeSpec(text=_prompt(name, negative_prompt))]
    if negative_prompt_embeds is not None:
        return [NegativeSpec(embeds=check_embeds(name, negative_prompt_embeds, "negative_prompt_embeds"))]
    if negatives is None:
        return []
    if isinstance(negatives, Mapping):
        entries = list(negatives.items())
        for key, _ in entries:
            if not isinstance(key, str):
                raise NegativePromptError(
                    f"{name}: expected `negatives` as a mapping of negative prompts (strings) to weights, got the key "
                    f"{key!r} ({type(key).__name__}). Pass precomputed embeddings as a sequence: "
                    "negatives=[(embeds, 1.0), ...]."
                )
        specs = [NegativeSpec(text=key, weight=_weight(name, key, w)) for key, w in entries]
    elif isinstance(negatives, (str, torch.Tensor)) or not isinstance(negatives, Sequence):
        raise NegativePromptError(
            f"{name}: expected `negatives` as a mapping {{'snow': 1.0, 'people': 0.5}} or a sequence of strings, "
            f"embeddings and (negative, weight) pairs, got {type(negatives).__name__}. "
            "Use `negative_prompt` for one negative."
        )
    else:
        specs = [_entry(name, entry) for entry in negatives]
    if not specs:
        raise NegativePromptError(
            f"{name}: expected at least one negative in `negatives`, got an empty {type(negatives).__name__}. "
            "Pass e.g. negatives={'snow': 1.0}."
        )
    return specs


def _prompt(name: str, negative_prompt: Any) -> str | tuple[str, ...]:
    if isinstance(negative_prompt, str):
        return negative_prompt
    if isinstance(negative_prompt, (list, tuple)) and all(isinstance(n, str) for n in negative_prompt):
        if not negative_prompt:
            raise NegativePromptError(
                f"{name}: expected `negative_prompt` to be a string or a non-empty list of strings (one per prompt), "
                "got an empty list."
            )
        return tuple(negative_prompt)
    got = type(negative_prompt).__name__
    if isinstance(negative_prompt, (list, tuple)):
        bad = next(n for n in negative_prompt if not isinstance(n, str))
        got = f"a {got} holding {bad!r} ({type(bad).__name__})"
    raise NegativePromptError(
        f"{name}: expected `negative_prompt` to be a string or a list of strings (one per prompt), got {got}. "
        "Use `negatives` for several weighted negatives."
    )


def _entry(name: str, entry: Any) -> NegativeSpec:
    if isinstance(entry, tuple) and len(entry) == 2 and not isinstance(entry[1], torch.Tensor):
        negative, weight = entry
    else:
        negative, weight = entry, 1.0
    if isinstance(negative, str):
        return NegativeSpec(text=negative, weight=_weight(name, negative, weight))
    if isinstance(negative, (torch.Tensor, dict)):
        embeds = check_embeds(name, negative, "an entry of `negatives`")
        return NegativeSpec(embeds=embeds, weight=_weight(name, "embeddings", weight))
    raise NegativePromptError(
        f"{name}: expected each entry of `negatives` to be a string, embeddings (a tensor or a dict of tensors) or "
        f"a (negative, weight) pair, got {type(negative).__name__} {negative!r:.60}."
    )


def _weight(name: str, negative: str, weight: Any) -> float:
    ok = isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight) and weight >= 0
    if not ok:
        raise NegativePromptError(
            f"{name}: expected the weight of negative {negative!r} to be a finite number >= 0, got {weight!r}. "
            "A weight of 1 is one ordinary negative; 0 switches it off."
        )
    return float(weight)


#: the largest magnitude accepted in negative embeddings: far above any text encoder's output, far below
#: what overflows an attention logit
MAX_ABS = 1e6


def check_embeds(name: str, embeds: Any, where: str) -> Any:
    """Refuse negative embeddings no attention call can use: not a tensor (or a dict of tensors, or a list of
    per-prompt tensors as Z-Image's ``encode_prompt`` returns them), not floating point, on the ``meta`` device, NaN
    or infinite or beyond ``MAX_ABS``. Shapes are the adapter's to check."""
    tensors: Any = embeds.items() if isinstance(embeds, dict) else [("", embeds)]
    if isinstance(embeds, (list, tuple)) and embeds and all(isinstance(t, torch.Tensor) for t in embeds):
        tensors = list(enumerate(embeds))
    for key, t in tensors:
        label = f"{where}[{key!r}]" if key != "" else where
        if not isinstance(t, torch.Tensor):
            if isinstance(embeds, dict) and t is None:
                continue
            what = "a tensor" if key else "a tensor (rows, tokens, channels) or a dict of tensors"
            raise NegativePromptError(
                f"{name}: expected {label} to be {what}, got {type(t).__name__}. Encode the negative with the "
                "pipeline's `encode_prompt`."
            )
        shape = tuple(t.shape)
        if isinstance(key, str) and "mask" in key and not t.is_floating_point() and not t.is_complex():
            continue  # a padding mask (bool or 0/1 integers) beside the embeddings: the adapter reads it
        if not t.is_floating_point():
            raise NegativePromptError(
                f"{name}: expected {label} to be floating point (float32, float16, bfloat16), got {t.dtype} of shape "
                f"{shape}. Pass the text encoder's output, not token ids or a mask."
            )
        if t.device.type == "meta":
            raise NegativePromptError(
                f"{name}: expected {label} to hold values, got a tensor on the meta device of shape {shape}. "
                "Move it to the pipeline's device first."
            )
        if t.numel() and not bool(torch.isfinite(t).all()):
            raise NegativePromptError(
                f"{name}: expected finite values in {label}, got NaN or infinity (shape {shape}). Encode the "
                "negative again; every guided output would be NaN."
            )
        if t.numel() and float(t.detach().abs().max()) > MAX_ABS:
            raise NegativePromptError(
                f"{name}: expected values of a text encoder's magnitude (|x| <= {MAX_ABS:g}) in {label}, got "
                f"{float(t.detach().abs().max()):.3g} (shape {shape}). Such values overflow attention into NaN."
            )
    return embeds
