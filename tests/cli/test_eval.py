"""``negguide eval`` and its prompt sets, offline on the shipped ToyWorld model (2 steps, few seeds)."""

from __future__ import annotations

import json

import pytest

import negguide
from negguide.errors import PromptSetError
from negguide.prompts import load_prompt_set
from negguide.prompts import toyworld_set

ITEM = {"prompt": "red circle", "missing_element": "blue square", "question_1": "q1?", "question_2": "q2?"}


def test_toyworld_set_is_the_bench_pairs_in_neggenbench_format():
    from negguide.toyworld.world import PAIRS

    items = toyworld_set()
    assert [(i.prompt, i.missing_element) for i in items] == list(PAIRS)
    assert all(i.question_1.startswith("Is the image showing") and i.question_2.endswith("missing?") for i in items)
    assert load_prompt_set("toyworld") == items


def test_a_neggenbench_file_loads_with_its_extra_fields(tmp_path):
    path = tmp_path / "set.json"
    path.write_text(json.dumps([{**ITEM, "category": "shapes", "id": 7}]))
    (item,) = load_prompt_set(path)
    assert item.prompt == "red circle" and item.as_dict()["category"] == "shapes" and item.as_dict()["id"] == 7


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"prompt": "x"}, "expected a non-empty JSON list of objects"),
        ([], "expected a non-empty JSON list"),
        ([ITEM, "text"], "item 1: expected an object"),
        ([ITEM, {k: v for k, v in ITEM.items() if k != "question_2"}], "item 1: missing field `question_2`"),
        ([{**ITEM, "missing_element": 3}], "item 0: `missing_element`: expected a non-empty string, got 3"),
        ([{**ITEM, "prompt": ""}], "item 0: `prompt`: expected a non-empty string"),
    ],
)
def test_a_bad_set_is_one_line_naming_the_item_and_field(tmp_path, data, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PromptSetError, match=message) as excinfo:
        load_prompt_set(path)
    assert "\n" not in str(excinfo.value) and isinstance(excinfo.value, negguide.NegGuideError)


def test_a_missing_or_unreadable_file_is_a_prompt_set_error(tmp_path):
    with pytest.raises(PromptSetError, match="expected a built-in prompt set .*'toyworld'.* or a JSON file"):
        load_prompt_set(tmp_path / "nope.json")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(PromptSetError, match="expected JSON"):
        load_prompt_set(tmp_path / "broken.json")
