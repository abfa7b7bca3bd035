"""The command line, run in-process with click's CliRunner on the tiny offline SD3 pipeline.

Pictures are checked against the library run directly (``negguide.apply`` on the same weights),
not against the CLI's own output; the demo and each generate call run once per module.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import negguide
from negguide import registry
from negguide import tiny
from negguide.cli import main
from negguide.cli import parse_param

BUILTINS = ("cfg", "nag", "nasa", "vsf")
PROMPT, NEGATIVE = "a red fox in a forest", "snow"


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)  # click < 8.2 mixes stderr into output by default
    except TypeError:
        return CliRunner()


def _invoke(args):
    return _runner().invoke(main, [str(a) for a in args])


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _reference(pipe, method=None, negative=NEGATIVE, steps=2, seed=0, **call) -> np.ndarray:
    """The picture the library itself makes with ``method`` (None: the untouched pipeline), as uint8 levels."""
    kwargs = {"num_inference_steps": steps, "generator": torch.Generator().manual_seed(seed), "output_type": "np"}
    kwargs.update(call)
    if method is None:
        out = pipe(PROMPT, **kwargs)
    else:
        name, params = method
        with negguide.apply(pipe, name, negative_prompt=negative, **params):
            out = pipe(PROMPT, **kwargs)
    return (np.clip(out.images[0], 0.0, 1.0) * 255).round().astype(np.int16)


def _assert_same_picture(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= 1  # one quantisation level for rounding differences


# ---------------------------------------------------------------------------------- methods


def test_methods_table_lists_builtins_with_level_and_params():
    result = _invoke(["methods"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:] if line.strip()}
    for name in BUILTINS:
        assert name in rows
        assert rows[name][1] == ("prediction" if name == "cfg" else "attention")
        assert rows[name][2] == "negguide"
    assert "scale=3.5" in rows["vsf"] and "bias=0.1" in rows["vsf"]
    assert "tau=2.5" in rows["nag"]
    header = result.stdout.splitlines()[0].split()
    assert header == ["METHOD", "LEVEL", "PACKAGE", "VERSION", "PARAMETERS"]


def test_methods_json_has_every_method_with_params():
    result = _invoke(["methods", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == negguide.list_methods()
    by_name = {r["name"]: r for r in rows}
    for name in BUILTINS:
        row = by_name[name]
        assert {"name", "package", "version", "level", "params"} <= set(row)
        assert row["level"] == negguide.get_method(name).level
        fields = negguide.get_method(name).Config.model_fields
        assert [p["name"] for p in row["params"]] == list(fields)
        for p in row["params"]:
            assert {"name", "default", "description"} <= set(p)
            assert p["description"]
    assert {p["name"]: p["default"] for p in by_name["vsf"]["params"]}["scale"] == 3.5


def test_version_and_help():
    result = _invoke(["--version"])
    assert result.exit_code == 0
    assert negguide.__version__ in result.stdout
    result = _invoke(["--help"])
    assert result.exit_code == 0
    assert "generate" in result.stdout and "demo" in result.stdout


def test_python_dash_m_runs_the_same_command():
    result = subprocess.run(
        [sys.executable, "-m", "negguide", "methods", "--json"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert {"vsf", "nag", "nasa", "cfg"} <= {m["name"] for m in json.loads(result.stdout)}


# ---------------------------------------------------------------------------------- demo


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


# ---------------------------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, sd3_pipe):
    path = tmp_path_factory.mktemp("tiny-sd3")
    sd3_pipe.save_pretrained(path)
    return path


def _generate(model_dir, out, *extra):
    args = ["generate", "--model", model_dir, "--prompt", PROMPT, "--seed", "0", "--steps", "2"]
    args += ["--height", "32", "--width", "32", "--out", out, *extra]
    result = _invoke(args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def generated(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "img.png"
    _generate(model_dir, out, "--negative", NEGATIVE, "--method", "vsf", "--param", "scale=2")
    return out


def test_generate_embeds_the_parameters_in_the_png(generated):
    text = Image.open(generated).text
    assert text["parameters"].startswith(PROMPT + "\nNegative prompt: snow\n")
    assert "Seed: 0" in text["parameters"] and "scale=2.0" in text["parameters"]
    embedded = json.loads(text["negguide"])
    assert embedded["method"] == "vsf"
    assert embedded["params"]["scale"] == 2.0


def test_generate_sidecar_has_method_params_seed_and_no_nulls(generated):
    record = json.loads(generated.with_suffix(".json").read_text())
    assert record["method"] == "vsf"
    assert record["params"]["scale"] == 2.0
    assert record["params"]["bias"] == negguide.get_method("vsf").defaults["sd3"]["bias"]
    assert record["seed"] == 0 and record["steps"] == 2
    assert record["negative"] == NEGATIVE and record["prompt"] == PROMPT
    required = ("method", "params", "negative", "prompt", "seed", "steps", "model", "versions", "seconds")
    assert all(record[key] is not None for key in required)
    assert {"negguide", "torch", "diffusers"} <= set(record["versions"])


def test_generate_picture_is_what_the_library_makes(generated, sd3_pipe):
    expected = _reference(sd3_pipe, ("vsf", {"scale": 2.0}), height=32, width=32)
    _assert_same_picture(_pixels(generated), expected)


def test_generate_same_seed_same_pixels_other_seed_other_pixels(generated, model_dir, tmp_path):
    again, other = tmp_path / "again.png", tmp_path / "other.png"
    _generate(model_dir, again, "--negative", NEGATIVE, "--method", "vsf", "--param", "scale=2")
    _generate(model_dir, other, "--negative", NEGATIVE, "--method", "vsf", "--param", "scale=2", "--seed", "1")
    assert np.array_equal(_pixels(again), _pixels(generated))
    assert not np.array_equal(_pixels(other), _pixels(generated))


def test_generate_with_a_yaml_config_and_param_override(model_dir, tmp_path):
    config = tmp_path / "nag.yaml"
    config.write_text("method: nag\nnegative_prompt: snow\nparams:\n  scale: 3\n  tau: 2.0\n")
    out = tmp_path / "nag.png"
    _generate(model_dir, out, "--config", config, "--param", "tau=1.5", "--no-embed-metadata")
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["method"] == "nag" and record["negative"] == "snow"
    assert record["params"]["scale"] == 3.0 and record["params"]["tau"] == 1.5
    assert not {"parameters", "negguide"} & set(Image.open(out).text)


def test_generate_method_none_is_the_untouched_pipeline(model_dir, tmp_path, sd3_pipe):
    out = tmp_path / "none.png"
    _generate(model_dir, out, "--method", "none", "--guidance-scale", "0")
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["method"] == "none" and record["params"] == {}
    _assert_same_picture(_pixels(out), _reference(sd3_pipe, None, height=32, width=32, guidance_scale=0.0))


# ---------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "nga"], "no guidance method 'nga'"),
        (["--param", "scale=-1"], "`scale`"),
        (["--param", "scael=2"], "unknown parameter `scael`"),
        (["--param", "scale"], "KEY=VALUE"),
        (["--config", "/nonexistent/negguide.yaml"], "not found"),
        (["--method", "vsf", "--bogus"], "--bogus"),
    ],
)
def test_bad_input_is_one_error_line(model_dir, tmp_path, extra, message):
    args = ["generate", "--model", model_dir, "--prompt", PROMPT, "--negative", NEGATIVE, "--out", tmp_path / "x.png"]
    result = _invoke([*args, *extra])
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "x.png").exists()


def test_missing_model_path_is_one_error_line(tmp_path):
    missing = tmp_path / "no-such-model"
    result = _invoke(["generate", "--model", missing, "--prompt", PROMPT, "--negative", NEGATIVE])
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"error: model path not found: {str(missing)!r}; pass a local folder saved with save_pretrained or a hub id"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("scale=2", ("scale", 2)),
        ("scale=2.5", ("scale", 2.5)),
        ("enabled=false", ("enabled", False)),
        ("bias=inf", ("bias", math.inf)),
        ("layers=null", ("layers", None)),
        ("layers=[0, -1]", ("layers", [0, -1])),
        ("attention=split", ("attention", "split")),
        (" name = a=b ", ("name", "a=b")),
    ],
)
def test_parse_param_reads_values(text, expected):
    assert parse_param(text) == expected
    assert type(parse_param(text)[1]) is type(expected[1])
