"""The bench: every setting on every pair with the same seeds, its table, trade-off plot and sample grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import negguide
from negguide.toyworld import load
from negguide.toyworld.bench import Row
from negguide.toyworld.bench import Setting
from negguide.toyworld.bench import format_table
from negguide.toyworld.bench import generate
from negguide.toyworld.bench import run
from negguide.toyworld.bench import sample_grid
from negguide.toyworld.bench import tradeoff_plot
from negguide.toyworld.pipeline import CALL_KWARGS
from negguide.toyworld.world import PAIRS
from negguide.toyworld.world import score

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
    assert [(r.method, r.params, r.guidance_scale) for r in rows] == [Setting(*entry) for entry in SWEEP]
    for i in (1, 3):
        method, params, guidance_scale = Setting(*SWEEP[i])
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
