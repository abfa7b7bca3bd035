"""The built-in ``vqa`` judge on a tiny random LLaVA built from a config (offline): its answers are nonsense, so
these check the prompting, the parsing (through a fake ``generate``), the recording and the malformed path."""

from __future__ import annotations

import numpy as np
import pytest

import negguide
from negguide.judges.vqa import VqaJudge
from negguide.judges.vqa import parse_quality
from negguide.judges.vqa import parse_question_1
from negguide.judges.vqa import parse_yes_no
from negguide.records import to_pil
from negguide.tiny.parts import clip_tokenizer
from tests.cli.helpers import _invoke

ITEM = {
    "prompt": "a kitchen",
    "missing_element": "a cat",
    "question_1": "Is the image showing a kitchen with or without a cat?",
    "question_2": "Is the cat missing?",
}
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_vlm():
    """A random LlavaForConditionalGeneration (CLIP vision tower, Llama text model, width 32) and its processor."""
    import torch
    from transformers import CLIPImageProcessor
    from transformers import CLIPVisionConfig
    from transformers import LlamaConfig
    from transformers import LlavaConfig
    from transformers import LlavaForConditionalGeneration
    from transformers import LlavaProcessor

    tokenizer = clip_tokenizer(model_max_length=512)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=TEMPLATE,
        num_additional_image_tokens=1,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32, patch_size=8
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval(), processor


@pytest.fixture(scope="module")
def image():
    return to_pil(np.random.default_rng(0).random((40, 48, 3)))


def test_a_tiny_vlm_is_asked_the_three_questions_and_its_nonsense_is_recorded_as_malformed(tiny_vlm, image):
    model, processor = tiny_vlm
    judge = VqaJudge(model=model, processor=processor, max_new_tokens=4)
    verdict = judge.judge(image, ITEM)
    questions = verdict.raw["questions"]
    assert questions["question_1"].startswith(ITEM["question_1"] + " Answer with one word: 'with', 'without'")
    assert questions["question_2"] == "Is the cat missing? Answer with one word: yes or no."
    assert "from 0 (unusable) to 1 (excellent)" in questions["quality"]
    assert set(verdict.raw["answers"]) == {"question_1", "question_2", "quality"}
    assert all(isinstance(a, str) and a for a in verdict.raw["answers"].values())
    # random weights answer gibberish: recorded as given, read as nothing, never guessed
    assert verdict.malformed and (verdict.positive, verdict.removed, verdict.quality) == (None, None, None)
    assert judge.config.model == "<LlavaForConditionalGeneration>"


def test_answers_are_parsed_from_what_generate_returns(tiny_vlm, image, monkeypatch):
    """A fake ``generate`` answers in turn; the judge decodes only the new tokens and reads them."""
    import torch

    model, processor = tiny_vlm
    judge = VqaJudge(model=model, processor=processor)
    replies = iter(["Without.", "Yes, it is missing.", "1"])
    prompts = []

    def generate(input_ids, pixel_values, max_new_tokens, do_sample, **kwargs):
        assert pixel_values.shape[-2:] == (32, 32) and max_new_tokens == 16 and not do_sample
        prompts.append(processor.decode(input_ids[0]))
        answer = processor.tokenizer(next(replies), add_special_tokens=False, return_tensors="pt").input_ids
        return torch.cat([input_ids, answer], dim=1)

    monkeypatch.setattr(model, "generate", generate)
    verdict = judge.judge(image, ITEM)
    assert (verdict.positive, verdict.removed, verdict.quality, verdict.malformed) == (True, True, 1.0, False)
    # the tiny byte-level tokenizer decodes with a space between words and punctuation
    assert verdict.raw["answers"] == {"question_1": "without .", "question_2": "yes , it is missing .", "quality": "1"}
    assert prompts[0].startswith("<|startoftext|>user : " + "<image>" * 16 + "is the image showing a kitchen with")
    assert "assistant :" in prompts[0] and "is the cat missing ? answer with one word : yes or no" in prompts[1]


def test_one_malformed_answer_leaves_only_its_field_none(tiny_vlm, image, monkeypatch):
    judge = VqaJudge(model=tiny_vlm[0], processor=tiny_vlm[1])
    answers = {"question_1": "With a cat.", "question_2": "Maybe.", "quality": "8/10"}
    monkeypatch.setattr(judge, "ask", lambda img, question: answers[next(k for k in answers if k in asked[question])])
    asked = {q: k for k, q in judge.questions(ITEM).items()}
    verdict = judge.judge(image, ITEM)
    assert (verdict.positive, verdict.removed, verdict.quality, verdict.malformed) == (True, None, 0.8, True)
    assert verdict.raw["answers"] == answers


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("yes", True),
        ("Yes.", True),
        ("Answer: no", False),
        ("No, the cat is still there.", False),
        ("Yes, it is not there.", True),
        ("The cat is not missing.", None),
        ("It is yes and no", None),
        ("maybe", None),
        ("", None),
    ],
)
def test_parse_yes_no(answer, expected):
    assert parse_yes_no(answer) is expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("with", True),
        ("Without", True),
        ("'without'", True),
        ("A kitchen with no cat.", True),
        ("Neither.", False),
        ("no", None),
        ("with or neither", None),
        ("a kitchen", None),
    ],
)
def test_parse_question_1(answer, expected):
    assert parse_question_1(answer) is expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("0.8", 0.8),
        ("1", 1.0),
        (".5", 0.5),
        ("Quality: 0.85.", 0.85),
        ("8/10", 0.8),
        ("7 out of 10", 0.7),
        ("80%", 0.8),
        ("8", None),
        ("0.8 or 0.9", None),
        ("good", None),
        ("3/0", None),
    ],
)
def test_parse_quality(answer, expected):
    assert parse_quality(answer) == expected


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, r"judge vqa: `model`: field required"),
        ({"model": "m", "max_tokens": 3}, r"judge vqa: unknown parameter `max_tokens` \(known: `model`, `device`, "),
        ({"model": "m", "max_new_tokens": 0}, r"`max_new_tokens`: input should be greater than or equal to 1, got 0"),
        ({"model": "m", "device": "tpu:x"}, r"`device`: value error, expected a torch device such as"),
    ],
)
def test_bad_config_is_a_one_line_error(params, message):
    with pytest.raises(negguide.ConfigError, match=message) as info:
        negguide.get_judge("vqa").make_config(params)
    assert "\n" not in str(info.value)


def test_missing_model_processor_or_item_field_is_a_one_line_error(tiny_vlm, image, tmp_path):
    with pytest.raises(negguide.ConfigError, match=r"judge vqa: expected `model` to be a local folder or hub id") as e:
        VqaJudge(model=str(tmp_path / "nowhere"))
    assert "\n" not in str(e.value)
    with pytest.raises(negguide.ConfigError, match=r"got a loaded model \(LlavaForConditionalGeneration\) but no"):
        VqaJudge(model=tiny_vlm[0])
    judge = VqaJudge(model=tiny_vlm[0], processor=tiny_vlm[1])
    with pytest.raises(negguide.ConfigError, match=r"expected the item's `question_2` to be a non-empty string"):
        judge.judge(image, {**ITEM, "question_2": ""})


def test_a_saved_tiny_vlm_loads_by_path(tiny_vlm, image, tmp_path):
    model, processor = tiny_vlm
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    judge = negguide.get_judge("vqa")(model=str(tmp_path), max_new_tokens=2)
    verdict = judge.judge(image, ITEM)
    assert set(verdict.raw["answers"]) == {"question_1", "question_2", "quality"}


def test_judges_command_lists_vqa():
    result = _invoke(["judges"])
    assert result.exit_code == 0, result.output
    assert any(line.startswith("vqa") and "max_new_tokens=16" in line for line in result.output.splitlines())
