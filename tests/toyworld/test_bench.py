"""The bench: every setting on every pair with the same seeds, its table, trade-off plot and sample grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import negguide
from negguide.toyworld import load
from negguide.toyworld.bench import SEVERAL
from negguide.toyworld.bench import SEVERAL_NEGATIVES
from negguide.toyworld.bench import SWEEPS
from negguide.toyworld.bench import Row
from negguide.toyworld.bench import Setting
from negguide.toyworld.bench import format_negatives
from negguide.toyworld.bench import format_several_table
from negguide.toyworld.bench import format_table
from negguide.toyworld.bench import generate
from negguide.toyworld.bench import parse_negatives
from negguide.toyworld.bench import resolve_negatives
from negguide.toyworld.bench import run
from negguide.toyworld.bench import sample_grid
from negguide.toyworld.bench import several_plot
from negguide.toyworld.bench import tradeoff_plot
from negguide.toyworld.pipeline import CALL_KWARGS
from negguide.toyworld.world import PAIRS
from negguide.toyworld.world import score
from negguide.toyworld.world import score_objects

SWEEP = (
    ("none", {}),
    ("vsf", {"scale": 3.5, "bias": 0.1}),
    Setting("vsf", {"scale": 5.0, "bias": 0.1, "layers": [0, 1]}),
    Setting("vsf", {"scale": 3.5, "bias": 0.1}, 2.0),
)


@pytest.fixture(scope="module")
def pipe():
    return load()


@pytest.fixture(scope="module")
def bench(pipe):
    return run(pipe, n=2, seed=3, sweep=SWEEP, progress=False)


def test_generate_is_the_pipeline_with_the_method_applied(pipe) -> None:
    """Image i starts from seed + i, whatever the method: 'none' is the plain pipeline, others apply()."""
    prompt, negative = PAIRS[0]
    kwargs = {**CALL_KWARGS, "num_images_per_prompt": 2}
    plain = pipe(prompt, generator=[torch.Generator().manual_seed(3 + i) for i in range(2)], **kwargs).images
    np.testing.assert_array_equal(
        generate(pipe, "none", {}, prompt, negative, 2, seed=3), plain.transpose(0, 3, 1, 2) * 2 - 1
    )
    with negguide.apply(pipe, "vsf", negative_prompt=negative, scale=2.0):
        guided = pipe(prompt, generator=[torch.Generator().manual_seed(3 + i) for i in range(2)], **kwargs).images
    got = generate(pipe, "vsf", {"scale": 2.0}, prompt, negative, 2, seed=3)
    np.testing.assert_array_equal(got, guided.transpose(0, 3, 1, 2) * 2 - 1)


def test_generate_with_a_guidance_scale_keeps_the_pipelines_cfg_on(pipe) -> None:
    """guidance_scale is the pipeline's own: its CFG (empty negative) runs, the method guides beside it."""
    prompt, negative = PAIRS[1]
    kwargs = {**CALL_KWARGS, "num_images_per_prompt": 2, "guidance_scale": 2.0}
    with negguide.apply(pipe, "vsf", negative_prompt=negative, scale=3.0):
        guided = pipe(prompt, generator=[torch.Generator().manual_seed(5 + i) for i in range(2)], **kwargs).images
    got = generate(pipe, "vsf", {"scale": 3.0}, prompt, negative, 2, seed=5, guidance_scale=2.0)
    np.testing.assert_array_equal(got, guided.transpose(0, 3, 1, 2) * 2 - 1)
    assert not np.array_equal(got, generate(pipe, "vsf", {"scale": 3.0}, prompt, negative, 2, seed=5))


def test_rows_are_the_scores_averaged_over_the_pairs(pipe, bench) -> None:
    rows, samples = bench
    assert [(r.method, r.params, r.guidance_scale, r.negatives) for r in rows] == [Setting(*entry) for entry in SWEEP]
    for i in (1, 3):
        method, params, guidance_scale, _ = Setting(*SWEEP[i])
        scores = [
            score(generate(pipe, method, params, pos, neg, 2, seed=3, guidance_scale=guidance_scale), pos, neg)
            for pos, neg in PAIRS
        ]
        for key in ("positive", "removed", "clean"):
            assert getattr(rows[i], key) == pytest.approx(np.mean([s[key] for s in scores]))
    assert all(0.0 <= getattr(r, key) <= 1.0 for r in rows for key in ("positive", "removed", "clean"))
    assert list(samples) == [
        ("none", "-"),
        ("vsf", "scale=3.5, bias=0.1"),
        ("vsf", "scale=5, bias=0.1, layers=[0, 1]"),
        ("vsf, CFG 2", "scale=3.5, bias=0.1"),
    ]
    assert all(images.shape == (2, 3, 32, 32) for images in samples.values())


def test_table_has_a_line_per_setting() -> None:
    rows = [
        Row("none", {}, 0.9, 0.25, 0.98),
        Row("vsf", {"scale": 3.5, "layers": [0, 1]}, 0.8, 0.912345, 0.97),
        Row("vsf", {"scale": 12.0, "bias": 1.5}, 0.97, 0.98, 0.987, guidance_scale=2.0),
    ]
    lines = format_table(rows).splitlines()
    assert lines[0] == "| method | params | guidance_scale | positive | removed | clean |" and len(lines) == 5
    assert lines[3] == "| vsf | scale=3.5, layers=[0, 1] | 0 | 0.800 | 0.912 | 0.970 |"
    assert lines[4] == "| vsf | scale=12, bias=1.5 | 2 | 0.970 | 0.980 | 0.987 |"


def test_plot_and_grid_are_pictures(bench, tmp_path) -> None:
    rows, samples = bench
    plot = Image.open(tradeoff_plot(rows, tmp_path / "a" / "tradeoff.png"))
    assert plot.size == (560, 420)
    grid = Image.open(sample_grid(samples, tmp_path / "samples.png", columns=2, zoom=2))
    assert grid.size == (170 + 2 * 66, 4 * 66)
    # the first tile of the first row is the first 'none' image, upscaled
    tile = np.asarray(grid)[0:64:2, 170 : 170 + 64 : 2]
    expected = ((np.clip(samples[("none", "-")][0], -1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(1, 2, 0)
    np.testing.assert_array_equal(tile, expected)


@pytest.mark.parametrize(
    ("guidance_scale", "name"), [(0.0, "vsf"), (1.0, "vsf"), (1.5, "vsf, CFG 1.5"), (2.0, "vsf, CFG 2")]
)
def test_a_rows_name_says_cfg_only_where_the_pipeline_runs_it(guidance_scale, name) -> None:
    """diffusers' SD3 pipeline runs its CFG only for guidance_scale > 1."""
    assert Row("vsf", {"scale": 3.5}, 0.9, 0.9, 0.99, guidance_scale).name == name


# ------------------------------------------------------------------- several negatives (companion and extras)

EXTRAS = ("green triangle", "yellow square", "magenta circle", "cyan triangle")


@pytest.mark.parametrize(
    ("text", "parsed", "canonical"),
    [
        ("companion:1,extras:0.5", ((("companion",), 1.0), (("extras",), 0.5)), "companion:1,extras:0.5"),
        ("companion", ((("companion",), 1.0),), "companion:1"),
        ("companion+extras", ((("companion", "extras"), 1.0),), "companion+extras:1"),
        (" Extras : .25 , companion:2 ", ((("extras",), 0.25), (("companion",), 2.0)), "extras:0.25,companion:2"),
        ("companion:0", ((("companion",), 0.0),), "companion:0"),
    ],
)
def test_negatives_by_role_are_parsed(text, parsed, canonical) -> None:
    assert parse_negatives(text) == parsed
    assert format_negatives(parsed) == canonical
    assert parse_negatives(canonical) == parsed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected negatives by role, got ''"),
        ("extra:1", "unknown role 'extra' in negatives 'extra:1'; write e.g. 'companion:1,extras:0.5'"),
        ("companion:1,companion:0.5", "role 'companion' given twice"),
        ("companion+extras,extras:1", "role 'extras' given twice"),
        ("companion:-1", "expected the weight of 'companion' to be a finite number >= 0, got '-1'"),
        ("companion:lots", "got 'lots'"),
        ("companion:inf", "got 'inf'"),
        ("companion:nan", "got 'nan'"),
        ("companion,,extras", "got an empty one"),
        ("companion+", "got an empty one"),
    ],
)
def test_bad_negatives_are_refused(text, message) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
        parse_negatives(text)


def test_negatives_resolve_per_pair() -> None:
    """Separate items are a `negatives` mapping (`extras` alone: one negative per object); `+` joins one prompt;
    one negative of weight 1 is the `negative_prompt` of the companion rows."""
    prompt, companion = PAIRS[0]
    assert resolve_negatives("", prompt, companion) == "blue square"
    assert resolve_negatives("companion:1", prompt, companion) == "blue square"
    assert resolve_negatives("companion:2", prompt, companion) == {"blue square": 2.0}
    assert resolve_negatives("companion:1,extras:0.5", prompt, companion) == {
        "blue square": 1.0,
        **dict.fromkeys(EXTRAS, 0.5),
    }
    assert resolve_negatives("companion+extras", prompt, companion) == " and ".join(("blue square", *EXTRAS))
    assert resolve_negatives("extras+companion:0.5", *PAIRS[2]) == {
        "red circle and blue square and green triangle and yellow square and cyan triangle": 0.5
    }


def test_the_several_sweep() -> None:
    """Every method runs the same negatives; the default sweep stays as it was."""
    assert SWEEPS["several"] is SEVERAL and SWEEPS["default"] is not SEVERAL
    assert all(not s.negatives for s in SWEEPS["default"])
    assert [s for s in SEVERAL if s.method == "none"] == [Setting("none", {}), Setting("none", {}, 2.0)]
    guided = [s for s in SEVERAL if s.method != "none"]
    assert {s.method for s in guided} == {"vsf", "nag", "nasa", "cfg"}
    assert len(guided) == 6 * len(SEVERAL_NEGATIVES)
    assert [s.negatives for s in guided[: len(SEVERAL_NEGATIVES)]] == list(SEVERAL_NEGATIVES)
    for s in guided:
        if s.negatives:
            parse_negatives(s.negatives)


def test_generate_with_weighted_negatives_is_apply_with_negatives(pipe) -> None:
    prompt, _ = PAIRS[1]
    negatives = {"yellow square": 1.0, "red circle": 0.5}
    kwargs = {**CALL_KWARGS, "num_images_per_prompt": 1, "num_inference_steps": 2}
    with negguide.apply(pipe, "nag", negatives=negatives, scale=5.0):
        guided = pipe(prompt, generator=[torch.Generator().manual_seed(7)], **kwargs).images
    got = generate(pipe, "nag", {"scale": 5.0}, prompt, negatives, 1, seed=7, steps=2)
    np.testing.assert_array_equal(got, guided.transpose(0, 3, 1, 2) * 2 - 1)


def test_rows_with_negatives_are_scored_for_the_companion_and_the_extras(pipe, tmp_path) -> None:
    sweep = (
        Setting("vsf", {"scale": 12.0, "bias": 1.5}, 0.0, "companion:1,extras:0.5"),
        Setting("cfg", {"scale": 4.0}, 0.0, "companion+extras"),
        Setting("vsf", {"scale": 12.0, "bias": 1.5}),
    )
    rows, samples = run(pipe, n=1, seed=2, sweep=sweep, progress=False, steps=2)
    assert [(r.method, r.negatives, r.negatives_label) for r in rows] == [
        ("vsf", "companion:1,extras:0.5", "companion:1,extras:0.5"),
        ("cfg", "companion+extras:1", "companion+extras:1"),
        ("vsf", "", "companion"),
    ]
    scores = []
    for pos, companion in PAIRS:
        negative = resolve_negatives("companion:1,extras:0.5", pos, companion)
        images = generate(pipe, "vsf", {"scale": 12.0, "bias": 1.5}, pos, negative, 1, seed=2, steps=2)
        scores.append(score_objects(images, pos, companion))
    for key in ("positive", "removed", "extras_removed", "only", "clean"):
        assert getattr(rows[0], key) == pytest.approx(np.mean([s[key] for s in scores]))
    assert list(samples) == [
        ("vsf [companion:1,extras:0.5]", "scale=12, bias=1.5"),
        ("cfg [companion+extras:1]", "scale=4"),
        ("vsf", "scale=12, bias=1.5"),
    ]
    lines = format_several_table(rows).splitlines()
    assert lines[0].startswith("| method | params | guidance_scale | negatives | positive | removed | extras removed |")
    assert lines[2].startswith("| vsf | scale=12, bias=1.5 | 0 | companion:1,extras:0.5 | ")
    assert lines[4].startswith("| vsf | scale=12, bias=1.5 | 0 | companion | ")
    assert Image.open(several_plot([Row("none", {}, 0.9, 0.3, 0.99, only=0.1), *rows], tmp_path / "p.png")).size == (
        640,
        420,
    )


def test_the_unguided_model_takes_no_negatives(pipe) -> None:
    with pytest.raises(ValueError, match="'none' is the unguided model and takes no negatives"):
        run(pipe, n=1, sweep=(Setting("none", {}, 0.0, "companion"),), progress=False)
    with pytest.raises(ValueError, match="unknown role 'extra'"):
        run(pipe, n=1, sweep=(Setting("vsf", {}), Setting("vsf", {}, 0.0, "extra")), progress=False)
