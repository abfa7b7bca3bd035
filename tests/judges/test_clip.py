"""The built-in ``clip`` judge on a tiny random CLIP built from a config (offline): texts, records, decisions."""

from __future__ import annotations

import numpy as np
import pytest

import negguide
from negguide.judges.clip import ClipJudge
from negguide.records import to_pil
from negguide.tiny.parts import clip_config
from negguide.tiny.parts import clip_tokenizer
from tests.cli.helpers import _invoke

ITEM = {
    "prompt": "a kitchen",
    "missing_element": "a cat",
    "question_1": "Is the image showing a kitchen with or without a cat?",
    "question_2": "Is the cat missing?",
}
TEXTS = {"prompt": "a kitchen", "with": "a kitchen with a cat", "without": "a kitchen without a cat"}


@pytest.fixture(scope="module")
def tiny_clip():
    """A random CLIPModel (width 32, 2 layers, 32x32 images) and its processor, all built in code."""
    import torch
    from transformers import CLIPConfig
    from transformers import CLIPImageProcessor
    from transformers import CLIPModel
    from transformers import CLIPProcessor
    from transformers import CLIPVisionConfig

    torch.manual_seed(0)
    tokenizer = clip_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32, patch_size=8
    )
    config = CLIPConfig(text_config=clip_config(tokenizer).to_dict(), vision_config=vision.to_dict(), projection_dim=32)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPModel(config).eval(), CLIPProcessor(image_processor=images, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def image():
    return to_pil(np.random.default_rng(0).random((48, 40, 3)))


def test_clip_judge_scores_the_three_texts_built_from_the_item(tiny_clip, image):
    model, processor = tiny_clip
    judge = ClipJudge(model=model, processor=processor)
    verdict = judge.judge(image, ITEM)
    assert verdict.raw["texts"] == TEXTS
    sims = verdict.raw["similarity"]
    assert set(sims) == {"prompt", "with", "without"} and all(-1 <= s <= 1 for s in sims.values())
    direct = judge.similarities(image, list(TEXTS.values()))
    assert np.allclose([sims[k] for k in TEXTS], direct, atol=1e-5)
    assert verdict.removed == (sims["without"] - sims["with"] > 0.0)
    assert verdict.positive == (sims["prompt"] > 0.2)
    assert verdict.quality is None and not verdict.malformed
    assert judge.config.model == "<CLIPModel>" and judge.config.model_dump()["margin"] == 0.0


@pytest.mark.parametrize(
    ("sims", "params", "positive", "removed"),
    [
        ((0.30, 0.20, 0.25), {}, True, True),
        ((0.30, 0.25, 0.20), {}, True, False),
        ((0.10, 0.20, 0.25), {}, False, True),
        ((0.30, 0.20, 0.25), {"margin": 0.05}, True, False),
        ((0.30, 0.20, 0.26), {"margin": 0.05}, True, True),
        ((0.30, 0.20, 0.25), {"positive_threshold": 0.35}, False, True),
    ],
)
def test_decisions_follow_the_margin_and_the_threshold(tiny_clip, image, monkeypatch, sims, params, positive, removed):
    model, processor = tiny_clip
    judge = ClipJudge(model=model, processor=processor, **params)
    seen = []
    monkeypatch.setattr(judge, "similarities", lambda img, texts: seen.append(texts) or list(sims))
    verdict = judge.judge(image, ITEM)
    assert seen == [list(TEXTS.values())]
    assert (verdict.positive, verdict.removed) == (positive, removed)
    assert verdict.raw["similarity"] == dict(zip(TEXTS, sims, strict=True))


def test_a_saved_tiny_clip_loads_by_path_once(tiny_clip, image, tmp_path, monkeypatch):
    import transformers

    model, processor = tiny_clip
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    calls = []
    real = transformers.AutoModel.from_pretrained
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", lambda *a, **k: calls.append(a) or real(*a, **k))
    judge = negguide.get_judge("clip")(model=str(tmp_path), dtype="float32", device="cpu")
    first, second = judge.judge(image, ITEM), judge.judge(image, ITEM)
    assert len(calls) == 1 and first.raw == second.raw
    by_object = ClipJudge(model=model, processor=processor).judge(image, ITEM)
    assert np.allclose(list(first.raw["similarity"].values()), list(by_object.raw["similarity"].values()), atol=1e-4)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"margn": 0.1}, r"judge clip: unknown parameter `margn` \(known: `model`, `device`, `dtype`, `margin`, "),
        ({"margin": -0.1}, r"judge clip: `margin`: input should be greater than or equal to 0, got -0.1"),
        ({"margin": "0.1"}, r"judge clip: `margin`: input should be a valid number"),
        ({"dtype": "float64"}, r"judge clip: `dtype`: input should be 'float32', 'float16' or 'bfloat16'"),
        ({"device": "gpu0"}, r"judge clip: `device`: value error, expected a torch device such as"),
    ],
)
def test_bad_config_is_a_one_line_error(params, message):
    with pytest.raises(negguide.ConfigError, match=message) as info:
        negguide.get_judge("clip").make_config(params)
    assert "\n" not in str(info.value)


def test_a_missing_model_or_a_model_without_processor_is_a_one_line_error(tiny_clip, tmp_path):
    with pytest.raises(negguide.ConfigError, match=r"judge clip: expected `model` to be a local folder or hub id") as e:
        ClipJudge(model=str(tmp_path / "nowhere"))
    assert "\n" not in str(e.value) and "pass model=PATH" in str(e.value)
    with pytest.raises(negguide.ConfigError, match=r"got a loaded model \(CLIPModel\) but no `processor`"):
        ClipJudge(model=tiny_clip[0])


def test_an_item_without_its_fields_is_a_one_line_error(tiny_clip, image):
    judge = ClipJudge(model=tiny_clip[0], processor=tiny_clip[1])
    with pytest.raises(negguide.ConfigError, match=r"expected the item's `missing_element` to be a non-empty string"):
        judge.judge(image, {"prompt": "a kitchen", "missing_element": " "})


def test_judges_command_lists_clip():
    result = _invoke(["judges"])
    assert result.exit_code == 0, result.output
    assert any(line.startswith("clip") and "margin=0.0" in line for line in result.output.splitlines())
