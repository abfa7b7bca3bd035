"""``negguide compare`` and ``negguide.compare`` on the shipped ToyWorld model (2 steps, 2 seeds), and its errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

import negguide
from tests.cli.helpers import _assert_same_picture
from tests.cli.helpers import _invoke
from tests.cli.helpers import _pixels

PROMPT, NEGATIVE = "red circle", "blue square"
SETTINGS = ("none", "vsf", "nag scale=3")


@pytest.fixture(scope="module")
def toyworld_pipe():
    from negguide import toyworld

    return toyworld.load()


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    args = ["compare", "--model", "toyworld", "--prompt", PROMPT, "--negative", NEGATIVE, "--seeds", "0-1"]
    args += ["--steps", "2", "--out", out]
    for setting in SETTINGS:
        args += ["--method", setting]
    result = _invoke(args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out


def _reference(pipe, method, params, seed, steps=2):
    import torch

    from negguide.toyworld.pipeline import CALL_KWARGS

    kwargs = {**CALL_KWARGS, "num_inference_steps": steps, "generator": torch.Generator().manual_seed(seed)}
    if method == "none":
        image = pipe(PROMPT, **kwargs).images[0]
    else:
        with negguide.apply(pipe, method, negative_prompt=NEGATIVE, **params):
            image = pipe(PROMPT, **kwargs).images[0]
    return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.int16)


def test_compare_writes_the_grid_one_png_per_image_and_the_run(compared):
    run = json.loads((compared / "compare.json").read_text())
    assert run["settings"] == list(SETTINGS) and run["seeds"] == [0, 1]
    assert run["model"] == "toyworld" and run["prompt"] == PROMPT and run["negative"] == NEGATIVE
    assert [(r["setting"], r["seed"]) for r in run["images"]] == [(s, seed) for s in SETTINGS for seed in (0, 1)]
    for record in run["images"]:
        assert (compared / record["image"]).is_file()
    grid = Image.open(compared / "grid.png")
    assert grid.width >= 2 * 128 and grid.height >= 3 * 128  # 32-pixel pictures enlarged to 128


def test_compare_pngs_carry_generates_metadata(compared):
    run = json.loads((compared / "compare.json").read_text())
    record = next(r for r in run["images"] if r["setting"] == "nag scale=3" and r["seed"] == 1)
    text = Image.open(compared / record["image"]).text
    assert text["parameters"].startswith(f"{PROMPT}\nNegative prompt: {NEGATIVE}\n")
    assert "Seed: 1" in text["parameters"] and "NegGuide method: nag" in text["parameters"]
    embedded = json.loads(text["negguide"])
    assert embedded["method"] == "nag" and embedded["params"]["scale"] == 3.0
    assert embedded["family"] == "sd3" and embedded["steps"] == 2 and embedded["pipeline"] == "ToyWorldPipeline"
    required = ("method", "params", "negative", "prompt", "seed", "steps", "model", "versions", "seconds", "image")
    assert all(embedded.get(key) is not None for key in required)


@pytest.mark.parametrize(("setting", "method", "params"), [("none", "none", {}), ("nag scale=3", "nag", {"scale": 3})])
@pytest.mark.parametrize("seed", [0, 1])
def test_compare_pictures_are_what_the_library_makes(compared, toyworld_pipe, setting, method, params, seed):
    run = json.loads((compared / "compare.json").read_text())
    record = next(r for r in run["images"] if r["setting"] == setting and r["seed"] == seed)
    _assert_same_picture(_pixels(compared / record["image"]), _reference(toyworld_pipe, method, params, seed))


def test_compare_python_function_returns_images_records_and_grid(compared, toyworld_pipe):
    result = negguide.compare(
        toyworld_pipe, PROMPT, ["none", ("vsf", {"scale": 2.0})], [1], negative=NEGATIVE, steps=2, progress=False
    )
    assert list(result.images) == [("none", 1), ("vsf scale=2.0", 1)]
    assert [r["setting"] for r in result.records] == ["none", "vsf scale=2.0"]
    assert result.seeds == [1] and result.grid.size[0] >= 128
    # the same seed and setting as the command's: the same picture
    cli = json.loads((compared / "compare.json").read_text())
    none = next(r for r in cli["images"] if r["setting"] == "none" and r["seed"] == 1)
    got = np.asarray(result.images[("none", 1)].convert("RGB"), dtype=np.int16)
    assert np.array_equal(got, _pixels(compared / none["image"]))


def test_compare_loads_a_folder_holding_a_toyworld_pipeline(tmp_path):
    from negguide import toyworld

    folder = tmp_path / "my-toyworld"
    shutil.copytree(toyworld.WEIGHTS_DIR, folder)
    args = ["compare", "--model", folder, "--prompt", PROMPT, "--negative", NEGATIVE, "--method", "none"]
    result = _invoke([*args, "--seeds", "3", "--steps", "1", "--size", "32x32", "--out", tmp_path / "out"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    run = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert run["images"][0]["model"] == str(folder) and run["images"][0]["seed"] == 3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "nga"], "no guidance method 'nga'"),
        (["--method", "nag tau=0.5"], "nag: expected `tau` >= 1.0, got 0.5"),
        (["--method", "vsf scael=2"], "unknown parameter `scael`"),
        (["--method", "vsf scale"], "KEY=VALUE"),
        (["--method", "none scale=2"], "'none' runs the pipeline unguided and takes no parameters"),
        (["--method", "vsf", "--seeds", "3-1"], "FIRST <= LAST"),
        (["--method", "vsf", "--seeds", "a"], "expected seeds like"),
        (["--method", "vsf", "--size", "12xq"], "expected --size HxW"),
        (["--method", "vsf", "--method", "vsf"], "expected each setting once"),
        ([], "Missing option '--method'"),
    ],
)
def test_bad_input_is_one_error_line(tmp_path, extra, message):
    out = tmp_path / "out"
    args = ["compare", "--model", "toyworld", "--prompt", PROMPT, "--negative", NEGATIVE, "--out", out, *extra]
    result = _invoke(args)
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    assert not out.exists()


def test_attention_method_without_a_negative_is_one_error_line(tmp_path):
    result = _invoke(["compare", "--model", "toyworld", "--prompt", PROMPT, "--method", "vsf", "--out", tmp_path / "o"])
    assert result.exit_code != 0
    assert result.stderr.strip().splitlines() == [
        "error: vsf: expected a negative prompt, got none. Pass --negative TEXT (negative= in Python)."
    ]


def test_compare_with_model_offload_makes_the_same_pictures(compared, tmp_path):
    out = tmp_path / "offloaded"
    args = ["compare", "--model", "toyworld", "--prompt", PROMPT, "--negative", NEGATIVE, "--seeds", "0"]
    args += ["--steps", "2", "--out", out, "--method", "vsf", "--offload", "model"]
    result = _invoke(args)
    assert result.exit_code == 0, result.output + result.stderr + repr(result.exception)
    run = json.loads((out / "compare.json").read_text())
    assert run["offload"] == "model"
    (record,) = run["images"]
    want = next(r for r in json.loads((compared / "compare.json").read_text())["images"] if r["setting"] == "vsf")
    np.testing.assert_array_equal(_pixels(out / record["image"]), _pixels(compared / want["image"]))


def test_an_unknown_offload_mode_is_refused(tmp_path):
    args = ["compare", "--model", "toyworld", "--prompt", PROMPT, "--method", "none", "--offload", "group"]
    result = _invoke([*args, "--out", tmp_path / "x"])
    assert result.exit_code != 0 and "'group' is not one of 'model', 'sequential'" in result.stderr


def test_compare_runs_the_distilled_toyworld_turbo(tmp_path):
    """``--model toyworld-turbo``: the shipped student (4 steps, no CFG), as ``toyworld.load("turbo")`` draws it."""
    from negguide import toyworld

    out = tmp_path / "turbo"
    args = ["compare", "--model", "toyworld-turbo", "--prompt", PROMPT, "--negative", NEGATIVE, "--seeds", "0"]
    result = _invoke([*args, "--steps", "4", "--out", out, "--method", "vsf"])
    assert result.exit_code == 0, result.output + result.stderr + repr(result.exception)
    (record,) = json.loads((out / "compare.json").read_text())["images"]
    want = _reference(toyworld.load("turbo"), "vsf", {}, 0, steps=4)
    _assert_same_picture(_pixels(out / record["image"]), want)
    teacher = _reference(toyworld.load(), "vsf", {}, 0, steps=4)
    assert np.abs(want - teacher).max() > 10  # a different model
