"""The judge plugin kind and the built-in ``toyworld`` judge (ToyWorld's colour detector), offline."""

from __future__ import annotations

import json

import numpy as np
import pytest

import negguide
from negguide.hookspecs import hookimpl
from negguide.records import to_pil
from tests.cli.helpers import _invoke

ITEM = {"prompt": "red circle", "missing_element": "blue square"}


@pytest.fixture(scope="module")
def bench_images():
    """Six ToyWorld images of the bench's first pair, unguided (most with the companion) and with VSF."""
    from negguide import toyworld
    from negguide.toyworld.bench import generate

    pipe = toyworld.load()
    plain = generate(pipe, "none", {}, "red circle", "blue square", n=3, steps=3)
    guided = generate(pipe, "vsf", {"scale": 5.0}, "red circle", "blue square", n=3, steps=3)
    return np.concatenate([plain, guided])


def test_toyworld_judge_says_what_the_bench_counts(bench_images):
    """On the bench's own images (as the PNGs eval saves), the judge's answers are the bench's detector's."""
    from negguide.toyworld import world

    judge = negguide.get_judge("toyworld")()
    verdicts = [judge.judge(to_pil((image.transpose(1, 2, 0) + 1) / 2), ITEM) for image in bench_images]
    assert [v.positive for v in verdicts] == world.present(bench_images, 0).tolist()
    assert [v.removed for v in verdicts] == (~world.present(bench_images, 1)).tolist()
    assert np.allclose([v.quality for v in verdicts], world.cleanliness(bench_images), atol=0.01)
    assert all(v.raw["positive"] is v.positive and not v.malformed for v in verdicts)


def test_toyworld_judge_refuses_an_item_that_is_not_a_toyworld_object():
    judge = negguide.get_judge("toyworld")()
    with pytest.raises(negguide.ConfigError, match=r"judge toyworld: expected `missing_element` to be a ToyWorld"):
        judge.judge(to_pil(np.ones((32, 32, 3))), {"prompt": "red circle", "missing_element": "snow"})


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"min_pxels": 3}, r"judge toyworld: unknown parameter `min_pxels` \(known: `min_pixels`\)"),
        ({"min_pixels": 0}, r"judge toyworld: `min_pixels`: input should be greater than or equal to 1, got 0"),
        ({"min_pixels": "12"}, r"judge toyworld: `min_pixels`: input should be a valid integer"),
    ],
)
def test_judge_config_is_strict_and_closed(params, message):
    with pytest.raises(negguide.ConfigError, match=message):
        negguide.get_judge("toyworld")(**params)


def test_unknown_judge_names_the_installed_ones():
    with pytest.raises(negguide.UnknownJudgeError, match=r"no judge 'vqx'; installed: .*'toyworld'"):
        negguide.get_judge("vqx")


def test_registering_a_non_judge_or_a_name_twice_is_a_plugin_error(pm):
    class NotAJudge:
        name = "nope"

    class Twin(negguide.Judge):
        name = "toyworld"

        def judge(self, image, item):
            raise AssertionError

    class Bad:
        @hookimpl
        def register_judges(self, register):
            register(NotAJudge)

    pm.register(Bad(), name="negguide_bad")
    with pytest.raises(negguide.PluginError, match="expected a subclass of Judge"):
        negguide.list_judges(pm=pm)
    pm.unregister(name="negguide_bad")

    class Dup:
        @hookimpl
        def register_judges(self, register):
            register(Twin)

    pm.register(Dup(), name="negguide_twin")
    with pytest.raises(negguide.PluginError, match="judge 'toyworld' registered twice"):
        negguide.list_judges(pm=pm)


def test_judges_command_lists_the_builtin_judge():
    result = _invoke(["judges"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].split() == ["JUDGE", "PACKAGE", "VERSION", "PARAMETERS"]
    assert any(line.startswith("toyworld") and "min_pixels=12" in line for line in result.output.splitlines())
    rows = json.loads(_invoke(["judges", "--json"]).output)
    toy = next(r for r in rows if r["name"] == "toyworld")
    assert toy["package"] == "negguide" and toy["class"] == "negguide.judges.toyworld.ToyWorldJudge"
    assert toy["params"] == [
        {"name": "min_pixels", "default": 12, "required": False, "description": toy["params"][0]["description"]}
    ]
    assert toy["params"][0]["description"]
