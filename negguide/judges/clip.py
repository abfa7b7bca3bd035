"""The ``clip`` judge: CLIP or SigLIP similarity of the image to "X with Y", "X without Y" and "X".

Cheap (one forward pass, no generation) and rough: contrastive models read negation poorly, so a "without"
caption winning is weak evidence. Use it to rank settings on one model, and a VLM judge to measure.
"""

from __future__ import annotations

from typing import Any
from typing import Literal
from typing import final

from pydantic import Field
from pydantic import field_validator

from negguide.errors import ConfigError
from negguide.hookspecs import hookimpl
from negguide.judge import Judge
from negguide.judge import JudgeConfig
from negguide.judge import Verdict
from negguide.judges._transformers import given_model
from negguide.judges._transformers import load_pretrained

__all__ = ["ClipJudge", "ClipJudgeConfig"]

DEFAULT_MODEL = "openai/clip-vit-base-patch32"


@hookimpl
def register_judges(register: Any) -> None:
    register(ClipJudge)


class ClipJudgeConfig(JudgeConfig):
    """Which contrastive model to ask, where, and how to read its similarities."""

    model: str = Field(
        DEFAULT_MODEL,
        min_length=1,
        description="Local folder or hub id of a CLIP or SigLIP model (transformers AutoModel and AutoProcessor).",
    )
    device: str = Field("cpu", min_length=1, description='Torch device to run the model on: "cpu", "cuda", "cuda:1".')
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="Weights' dtype.")
    margin: float = Field(
        0.0,
        ge=0.0,
        le=2.0,
        description='Removed when cos(image, "X without Y") exceeds cos(image, "X with Y") by more than this.',
    )
    positive_threshold: float = Field(
        0.2,
        ge=-1.0,
        le=1.0,
        description="Positive when cos(image, X) is above this; a heuristic, model-dependent (0.2 suits OpenAI CLIP).",
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        import torch

        try:
            torch.device(value)
        except (RuntimeError, ValueError):
            raise ValueError('expected a torch device such as "cpu" or "cuda:0"') from None
        return value


def captions(item: dict[str, Any]) -> dict[str, str]:
    """The three texts the image is scored against: ``prompt`` (X), ``with`` (X with Y), ``without`` (X without Y)."""
    for key in ("prompt", "missing_element"):
        if not isinstance(item.get(key), str) or not item[key].strip():
            raise ConfigError(
                f"judge clip: expected the item's `{key}` to be a non-empty string, got {item.get(key)!r}; "
                "check the prompt set"
            )
    x, y = item["prompt"].strip(), item["missing_element"].strip()
    return {"prompt": x, "with": f"{x} with {y}", "without": f"{x} without {y}"}


@final
class ClipJudge(Judge):
    """Scores the image against "X with Y" and "X without Y" (X the prompt, Y the missing element) and X alone.

    ``removed``: the "without" caption's cosine similarity beats the "with" caption's by more than ``margin``.
    ``positive``: the prompt's similarity is above ``positive_threshold`` (a heuristic). ``quality`` is None:
    a similarity says nothing of a picture's quality. ``raw`` holds the texts and the three similarities.

    ``model`` may also be a loaded model object, then ``processor`` is required (Python only)::

        judge = ClipJudge(model=clip_model, processor=clip_processor, margin=0.01)
    """

    name = "clip"
    Config = ClipJudgeConfig

    def __init__(self, config: JudgeConfig | None = None, *, processor: Any = None, **params: Any) -> None:
        params, model = given_model("clip", params, processor)
        super().__init__(config, **params)
        self._model, self._processor = (model, processor) if model is not None else self._load()
        if model is not None:
            self._model.eval()

    def _load(self) -> tuple[Any, Any]:
        from transformers import AutoModel

        where = self.config.model
        kind = "a CLIP or SigLIP model"
        model, processor = load_pretrained("clip", AutoModel, where, self.config.dtype, kind)
        if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
            raise ConfigError(
                f"judge clip: expected a CLIP or SigLIP model at {where!r}, got a {type(model).__name__}; "
                "pass model=PATH of a contrastive image-text model"
            )
        return model.to(self.config.device).eval(), processor

    def similarities(self, image: Any, texts: list[str]) -> list[float]:
        """Cosine similarity of ``image`` (PIL) to each of ``texts``, in order."""
        import torch

        inputs = self._processor(
            text=texts, images=image.convert("RGB"), padding="max_length", truncation=True, return_tensors="pt"
        )
        device = next(self._model.parameters()).device
        dtype = next(self._model.parameters()).dtype
        inputs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
        with torch.inference_mode():
            out = self._model(**inputs)
        image_embeds = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        text_embeds = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        return (image_embeds @ text_embeds.T)[0].tolist()

    def judge(self, image: Any, item: dict[str, Any]) -> Verdict:
        texts = captions(item)
        scores = dict(zip(texts, self.similarities(image, list(texts.values())), strict=True))
        removed = scores["without"] - scores["with"] > self.config.margin
        positive = scores["prompt"] > self.config.positive_threshold
        raw = {"texts": texts, "similarity": {k: round(v, 6) for k, v in scores.items()}}
        return Verdict(positive=bool(positive), removed=bool(removed), quality=None, raw=raw)
