"""The ``vqa`` judge: a vision-language model answers the item's two questions and rates the image's quality.

Any transformers image-text-to-text model (``AutoModelForImageTextToText``) with a chat template, by local
folder or hub id. The answers are parsed strictly but tolerantly (case, punctuation, surrounding words);
an answer that cannot be read is recorded as malformed with its field None, never guessed.
"""

from __future__ import annotations

import re
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

__all__ = ["VqaJudge", "VqaJudgeConfig", "parse_quality", "parse_question_1", "parse_yes_no"]

#: appended to question 1 ("Is the image showing X with or without Y?")
ASK_1 = " Answer with one word: 'with', 'without', or 'neither' if the image does not show {prompt}."
#: appended to question 2 ("Is Y missing?")
ASK_2 = " Answer with one word: yes or no."
#: the quality question
ASK_QUALITY = (
    "Rate the overall visual quality of this image (sharpness, coherence, absence of artifacts) "
    "from 0 (unusable) to 1 (excellent). Answer with a number only."
)

_WORDS = re.compile(r"[a-z]+")
_NUMBER = r"(\d+(?:\.\d+)?|\.\d+)"


@hookimpl
def register_judges(register: Any) -> None:
    register(VqaJudge)


class VqaJudgeConfig(JudgeConfig):
    """Which vision-language model to ask, where, and how long it may answer."""

    model: str = Field(
        min_length=1,
        description="Local folder or hub id of an image-text-to-text model (transformers AutoModelForImageTextToText).",
    )
    device: str = Field("cpu", min_length=1, description='Torch device to run the model on: "cpu", "cuda", "cuda:1".')
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="Weights' dtype.")
    max_new_tokens: int = Field(16, ge=1, le=512, description="Most tokens generated per answer (greedy decoding).")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        import torch

        try:
            torch.device(value)
        except (RuntimeError, ValueError):
            raise ValueError('expected a torch device such as "cpu" or "cuda:0"') from None
        return value


def _words(answer: str) -> list[str]:
    return _WORDS.findall(answer.lower())


def _one_of(answer: str, options: dict[str, Any]) -> Any:
    """What the answer's option words say, when they all say the same; None when it has none or they disagree."""
    found = {options[w] for w in _words(answer) if w in options}
    return found.pop() if len(found) == 1 else None


def parse_yes_no(answer: str) -> bool | None:
    """``True`` for yes, ``False`` for no, ``None`` when the answer says neither or both."""
    return _one_of(answer, {"yes": True, "no": False})


def parse_question_1(answer: str) -> bool | None:
    """Whether the prompt's subject is shown: "with" or "without" Y both say yes, "neither" says no (a bare "no"
    is ambiguous here: ``None``)."""
    return _one_of(answer, {"with": True, "without": True, "neither": False})


def parse_quality(answer: str) -> float | None:
    """A rating in [0, 1]: "0.8", "8/10", "80%"; ``None`` when there is no number, or more than one, or it is out
    of range (never rescaled by guess)."""
    text = answer.strip().lower()
    ratio = re.fullmatch(rf"\D*?{_NUMBER}\s*(?:/|out of)\s*{_NUMBER}\D*", text)
    if ratio:
        den = float(ratio.group(2))
        value = float(ratio.group(1)) / den if den else None
    else:
        numbers = re.findall(rf"{_NUMBER}\s*(%?)", text)
        if len(numbers) != 1:
            return None
        value = float(numbers[0][0]) / (100 if numbers[0][1] else 1)
    return value if value is not None and 0.0 <= value <= 1.0 else None


@final
class VqaJudge(Judge):
    """Asks question 1, question 2 and a 0-1 quality rating, one generation each.

    ``positive``: question 1 answered "with" or "without" (the subject is shown). ``removed``: question 2 ("Is Y
    missing?") answered yes. ``quality``: the rating. ``raw``: the three questions and answers as generated.

    ``model`` may also be a loaded model object, then ``processor`` is required (Python only)::

        judge = VqaJudge(model=vlm, processor=vlm_processor)
    """

    name = "vqa"
    Config = VqaJudgeConfig

    def __init__(self, config: JudgeConfig | None = None, *, processor: Any = None, **params: Any) -> None:
        params, model = given_model("vqa", params, processor)
        super().__init__(config, **params)
        self._model, self._processor = (model, processor) if model is not None else self._load()

    def _load(self) -> tuple[Any, Any]:
        from transformers import AutoModelForImageTextToText

        kind = "an image-text-to-text model"
        model, processor = load_pretrained(
            "vqa", AutoModelForImageTextToText, self.config.model, self.config.dtype, kind
        )
        return model.to(self.config.device).eval(), processor

    def ask(self, image: Any, question: str) -> str:
        """The model's answer to ``question`` about ``image`` (greedy, the new tokens only, special tokens off)."""
        import torch

        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = self._processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = self._processor(images=image.convert("RGB"), text=prompt, return_tensors="pt")
        device = next(self._model.parameters()).device
        dtype = next(self._model.parameters()).dtype
        inputs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
        with torch.inference_mode():
            out = self._model.generate(**inputs, max_new_tokens=self.config.max_new_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :]
        return self._processor.decode(new, skip_special_tokens=True).strip()

    def questions(self, item: dict[str, Any]) -> dict[str, str]:
        """What the model is asked: the item's two questions, each with its answer format, and the rating."""
        for key in ("prompt", "question_1", "question_2"):
            if not isinstance(item.get(key), str) or not item[key].strip():
                raise ConfigError(
                    f"judge vqa: expected the item's `{key}` to be a non-empty string, got {item.get(key)!r}; "
                    "check the prompt set"
                )
        return {
            "question_1": item["question_1"].strip() + ASK_1.format(prompt=item["prompt"].strip()),
            "question_2": item["question_2"].strip() + ASK_2,
            "quality": ASK_QUALITY,
        }

    def judge(self, image: Any, item: dict[str, Any]) -> Verdict:
        asked = self.questions(item)
        answers = {key: self.ask(image, question) for key, question in asked.items()}
        positive = parse_question_1(answers["question_1"])
        removed = parse_yes_no(answers["question_2"])
        quality = parse_quality(answers["quality"])
        raw = {"questions": asked, "answers": answers}
        malformed = positive is None or removed is None or quality is None
        return Verdict(positive=positive, removed=removed, quality=quality, raw=raw, malformed=malformed)
