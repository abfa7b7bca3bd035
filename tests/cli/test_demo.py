"""``negguide demo`` on the tiny SD3 pipeline and on ToyWorld; the demo runs once per module."""

from __future__ import annotations

import json
import math

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


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One demo run, with a failing third-party method registered beside the installed ones."""
    out = tmp_path_factory.mktemp("demo")
    pm = registry.default_plugin_manager()
    pm.register(_BoomPlugin(), name="undo-boom")
    try:
        names = negguide.list_methods()
        result = _invoke(["demo", "--model", "sd3", "--out", out, "--steps", "2"])
    finally:
        pm.unregister(name="undo-boom")
    return result, out, names


def test_demo_exits_zero_and_says_weights_are_random(demo_run):
    result, _out, _names = demo_run
    assert result.exit_code == 0, result.output + str(result.exception)
    assert "random weights" in result.stdout
    assert "Traceback" not in result.output


def test_default_demo_is_the_trained_toyworld_model(tmp_path):
    """`negguide demo` with no options runs every method on ToyWorld: red circle, negative blue square."""
    result = _invoke(["demo", "--out", tmp_path, "--steps", "4"])
    assert result.exit_code == 0, result.output + str(result.exception)
    assert "ToyWorld" in result.stdout and "random weights" not in result.stdout
    record = json.loads((tmp_path / "demo.json").read_text())
    assert record["model"] == "toyworld" and record["pipeline"] == "ToyWorldPipeline"
    assert record["prompt"] == "red circle" and record["negative"] == "blue square"
    statuses = {m["name"]: m["status"] for m in record["methods"]}
    assert {"none", "cfg", "nag", "nasa", "vsf"} <= set(statuses) and set(statuses.values()) == {"ok"}
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size[0] >= 5 * 32


def test_demo_json_has_every_method_with_params_and_timings(demo_run):
    _result, out, names = demo_run
    record = json.loads((out / "demo.json").read_text())
    assert "random" in record["note"]
    assert {"negguide", "torch", "diffusers", "transformers"} <= set(record["versions"])
    assert record["model"] == "sd3" and record["prompt"] and record["negative"] == NEGATIVE
    entries = {e["name"]: e for e in record["methods"]}
    assert [e["name"] for e in record["methods"]] == ["none", *names]
    assert "boom" in names
    for name in ["none", *BUILTINS]:
        entry = entries[name]
        assert entry["status"] == "ok", entry
        assert entry["seed"] == 0 and entry["steps"] == 2
        assert isinstance(entry["seconds"], float) and entry["seconds"] > 0
        assert (out / entry["image"]).is_file()
        assert Image.open(out / entry["image"]).size == (32, 32)
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
    assert grid.width >= min(cells, 6) * 128
    assert grid.height >= math.ceil(cells / 6) * 2 * 128
    assert grid.width < 2000 and grid.height < 2000


def test_demo_pictures_are_what_the_library_makes(demo_run, sd3_pipe):
    _result, out, _names = demo_run
    call = {**tiny.CALL_KWARGS["sd3"], "guidance_scale": 0.0}
    call.pop("output_type")
    prompt = json.loads((out / "demo.json").read_text())["prompt"]
    kwargs = {"num_inference_steps": 2, "output_type": "np", **call}
    unguided = sd3_pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    with negguide.apply(sd3_pipe, "vsf", negative_prompt=NEGATIVE):
        guided = sd3_pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    for name, expected in (("none", unguided), ("vsf", guided)):
        _assert_same_picture(_pixels(out / f"{name}.png"), (np.clip(expected, 0, 1) * 255).round().astype(np.int16))


def test_demo_refuses_an_empty_negative(tmp_path):
    result = _invoke(["demo", "--out", tmp_path, "--negative", "  "])
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: expected a non-empty --negative"), result.stderr
    assert not (tmp_path / "demo.json").exists()
