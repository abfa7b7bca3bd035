"""``negguide demo`` on the tiny SD3 pipeline and on ToyWorld; the demo runs once per module."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import negguide
from negguide import registry
from negguide import tiny
from tests.cli.helpers import BUILTINS
from tests.cli.helpers import NEGATIVE
from tests.cli.helpers import _assert_same_picture
from tests.cli.helpers import _invoke
from tests.cli.helpers import _pixels


class _Boom(negguide.AttentionMethod):
    """A third-party method that fails on every model."""

    name = "boom"

    def attend(self, seg):
        raise RuntimeError("boom cannot run on this model\nsecond line")


class _BoomPlugin:
    __name__ = "BoomPlugin"

    @negguide.hookimpl
    def register_methods(self, register):
        register(_Boom)


SEEDS = 3  # the random-weight run takes --seeds 3; the ToyWorld run keeps the default 4


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One demo run on the tiny SD3 pipeline, with a failing third-party method registered beside the installed ones."""
    out = tmp_path_factory.mktemp("demo")
    pm = registry.default_plugin_manager()
    pm.register(_BoomPlugin(), name="undo-boom")
    try:
        names = negguide.list_methods()
        result = _invoke(["demo", "--model", "sd3", "--out", out, "--steps", "2", "--seed", "5", "--seeds", SEEDS])
    finally:
        pm.unregister(name="undo-boom")
    return result, out, names


@pytest.fixture(scope="module")
def toyworld_run(tmp_path_factory):
    """CI's smoke run, `negguide demo --out DIR --steps 2`, as a user runs it: in a fresh process."""
    out = tmp_path_factory.mktemp("toyworld-demo")
    command = [sys.executable, "-m", "negguide", "demo", "--out", str(out), "--steps", "2"]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    return result, out, json.loads((out / "demo.json").read_text()), seconds


def _cell(out, entry, i):
    """Seed ``i`` of a method as the grid shows it, and as its PNG strip holds it."""
    grid = Image.open(out / "grid.png").convert("RGB")
    strip = Image.open(out / entry["image"]).convert("RGB")
    side = strip.height
    return grid.crop(tuple(entry["cells"][i])), strip.crop((i * side, 0, (i + 1) * side, side))


def test_demo_exits_zero_and_says_weights_are_random(demo_run):
    result, _out, _names = demo_run
    assert result.exit_code == 0, result.output + str(result.exception)
    assert "random weights" in result.stdout
    assert "Traceback" not in result.output


def test_default_demo_is_the_trained_toyworld_model(toyworld_run):
    """`negguide demo` with no options runs every method on ToyWorld: red circle, negative blue square."""
    result, out, record, _seconds = toyworld_run
    assert "ToyWorld" in result.stdout and "random weights" not in result.stdout
    assert record["model"] == "toyworld" and record["pipeline"] == "ToyWorldPipeline"
    assert record["prompt"] == "red circle" and record["negative"] == "blue square"
    assert record["seeds"] == [0, 1, 2, 3] and record["steps"] == 2
    statuses = {m["name"]: m["status"] for m in record["methods"]}
    assert {"none", "cfg", "nag", "nasa", "vsf"} <= set(statuses) and set(statuses.values()) == {"ok"}


def test_demo_stderr_holds_no_known_library_noise(toyworld_run):
    result, _out, _record, _seconds = toyworld_run
    noise = ("requires torchvision", "accelerate", "should be kept in float32", "torch_dtype", "[transformers]")
    assert not [n for n in noise if n in result.stderr], result.stderr
    assert "Traceback" not in result.stderr


def test_toyworld_demo_rates_are_the_detector_on_the_pictures_shown(toyworld_run):
    """Under each column: the share of seeds without the negative's object and with the prompt's, as the
    ToyWorld detector counts them on exactly the pictures saved."""
    from negguide.toyworld import world

    result, out, record, _seconds = toyworld_run
    assert record["detector"] and "ToyWorld colour detector" in record["detector_note"]
    names = [world.object_name(i) for i in range(len(world.OBJECTS))]
    prompt, negative = names.index("red circle"), names.index("blue square")
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.strip()}
    assert rows["METHOD"][5:7] == ["REMOVED", "POSITIVE"]  # METHOD STATUS SECONDS VS NONE ...
    for entry in record["methods"]:
        strip = np.asarray(Image.open(out / entry["image"]).convert("RGB"), dtype=np.float64) / 255.0 * 2 - 1
        images = np.stack(np.split(strip, len(record["seeds"]), axis=1)).transpose(0, 3, 1, 2)
        found = world.detect(images)
        assert entry["removed"] == pytest.approx(1 - found[:, negative].mean())
        assert entry["positive"] == pytest.approx(found[:, prompt].mean())
        assert [d["negative"] for d in entry["detected"]] == found[:, negative].tolist()
        assert rows[entry["name"]][4] == f"{round(entry['removed'] * 4)}/4"
        assert rows[entry["name"]][5] == f"{round(entry['positive'] * 4)}/4"


def test_toyworld_grid_shows_every_seed_upscaled_without_blur(toyworld_run):
    _result, out, record, _seconds = toyworld_run
    for entry in record["methods"]:
        assert len(entry["cells"]) == 4
        for i in range(4):
            shown, picture = _cell(out, entry, i)
            assert shown.size == (128, 128) and picture.size == (32, 32)
            assert np.array_equal(np.asarray(shown), np.asarray(picture.resize((128, 128), Image.NEAREST)))


def test_demo_smoke_run_is_fast(toyworld_run):
    """CI runs `negguide demo --out DIR --steps 2` on a 2-core CPU; it must stay well under a minute."""
    *_rest, seconds = toyworld_run
    assert seconds < 60, f"the demo smoke run took {seconds:.0f} s"


def test_random_weight_demo_says_it_has_no_detector(demo_run):
    result, out, _names = demo_run
    record = json.loads((out / "demo.json").read_text())
    assert record["detector"] is None and record["detector_note"].startswith("no detector")
    assert "no detector" in result.stdout
    assert all("removed" not in e and "positive" not in e for e in record["methods"])


def test_demo_json_has_every_method_with_params_and_timings(demo_run):
    _result, out, names = demo_run
    record = json.loads((out / "demo.json").read_text())
    assert "random" in record["note"]
    assert {"negguide", "torch", "diffusers", "transformers"} <= set(record["versions"])
    assert record["model"] == "sd3" and record["prompt"] and record["negative"] == NEGATIVE
    assert record["seeds"] == [5, 6, 7]
    entries = {e["name"]: e for e in record["methods"]}
    assert [e["name"] for e in record["methods"]] == ["none", *names]
    assert "boom" in names
    for name in ["none", *BUILTINS]:
        entry = entries[name]
        assert entry["status"] == "ok", entry
        assert entry["seed"] == 5 and entry["seeds"] == [5, 6, 7] and entry["steps"] == 2
        assert isinstance(entry["seconds"], float) and entry["seconds"] > 0
        assert (out / entry["image"]).is_file()
        assert Image.open(out / entry["image"]).size == (32 * SEEDS, 32)
    for name in BUILTINS:
        assert entries[name]["params"] == negguide.get_method(name).make_config(family="sd3").model_dump()
        assert entries[name]["ratio"] > 0


def test_demo_reports_a_failing_method_and_goes_on(demo_run):
    result, out, _names = demo_run
    boom = json.loads((out / "demo.json").read_text())["methods"]
    boom = next(e for e in boom if e["name"] == "boom")
    assert boom["status"] == "failed"
    assert boom["error"] == "RuntimeError: boom cannot run on this model"
    line = next(line for line in result.stdout.splitlines() if line.startswith("boom "))
    assert "failed" in line and "boom cannot run on this model" in line
    assert not (out / "boom.png").exists()


def test_demo_grid_is_a_labelled_upscaled_picture(demo_run):
    _result, out, names = demo_run
    grid = Image.open(out / "grid.png")
    cells = len(names) + 1
    assert grid.width >= cells * 128
    assert grid.height >= (SEEDS + 1) * 128  # a row per seed, and the difference maps of the first seed
    assert grid.width < 2000 and grid.height < 2000
    record = json.loads((out / "demo.json").read_text())
    vsf = next(e for e in record["methods"] if e["name"] == "vsf")
    shown, picture = _cell(out, vsf, SEEDS - 1)
    assert np.array_equal(np.asarray(shown), np.asarray(picture.resize((128, 128), Image.NEAREST)))


def test_demo_pictures_are_what_the_library_makes(demo_run, sd3_pipe):
    """Every seed of the batch is the picture the library makes with that seed alone."""
    _result, out, _names = demo_run
    call = {**tiny.CALL_KWARGS["sd3"], "guidance_scale": 0.0}
    call.pop("output_type")
    prompt = json.loads((out / "demo.json").read_text())["prompt"]
    kwargs = {"num_inference_steps": 2, "output_type": "np", **call}
    for i, seed in enumerate([5, 6, 7]):
        unguided = sd3_pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).images[0]
        with negguide.apply(sd3_pipe, "vsf", negative_prompt=NEGATIVE):
            guided = sd3_pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).images[0]
        for name, expected in (("none", unguided), ("vsf", guided)):
            strip = _pixels(out / f"{name}.png")
            actual = strip[:, 32 * i : 32 * (i + 1)]
            _assert_same_picture(actual, (np.clip(expected, 0, 1) * 255).round().astype(np.int16))


def test_demo_refuses_an_empty_negative(tmp_path):
    result = _invoke(["demo", "--out", tmp_path, "--negative", "  "])
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: expected a non-empty --negative"), result.stderr
    assert not (tmp_path / "demo.json").exists()
