"""``negguide generate`` on a saved tiny SD3 pipeline, and its one-line errors; each call runs once per module."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import negguide
from tests.cli.helpers import NEGATIVE
from tests.cli.helpers import PROMPT
from tests.cli.helpers import _assert_same_picture
from tests.cli.helpers import _invoke
from tests.cli.helpers import _pixels
from tests.cli.helpers import _reference


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


# ---------------------------------------------------------------------------------- ToyWorld


@pytest.fixture(scope="module")
def toyworld_generated(tmp_path_factory):
    """`--model toyworld`: the weights shipped with negguide, offline, at ToyWorld's own call defaults."""
    out = tmp_path_factory.mktemp("toyworld") / "tw.png"
    args = ["generate", "--model", "toyworld", "--prompt", "red circle", "--negative", "blue square"]
    result = _invoke([*args, "--steps", "2", "--out", out])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out


def _toyworld_reference(steps=2, seed=0):
    import torch

    from negguide import toyworld
    from negguide.toyworld.pipeline import CALL_KWARGS

    pipe = toyworld.load()
    kwargs = {**CALL_KWARGS, "num_inference_steps": steps, "generator": torch.Generator().manual_seed(seed)}
    with negguide.apply(pipe, "vsf", negative_prompt="blue square"):
        image = pipe("red circle", **kwargs).images[0]
    return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.int16)


def test_generate_model_toyworld_is_the_shipped_pipeline(toyworld_generated):
    record = json.loads(toyworld_generated.with_suffix(".json").read_text())
    assert record["model"] == "toyworld" and record["pipeline"] == "ToyWorldPipeline"
    assert record["family"] == "sd3" and record["guidance_scale"] == 0.0
    assert (record["width"], record["height"]) == (32, 32)
    _assert_same_picture(_pixels(toyworld_generated), _toyworld_reference())


def test_generate_loads_a_folder_holding_a_toyworld_pipeline(toyworld_generated, tmp_path):
    """diffusers cannot resolve ToyWorldPipeline by name; a saved ToyWorld folder still loads (as negguide's class)."""
    import shutil

    from negguide import toyworld

    folder = tmp_path / "my-toyworld"
    shutil.copytree(toyworld.WEIGHTS_DIR, folder)
    out = tmp_path / "folder.png"
    args = ["generate", "--model", folder, "--prompt", "red circle", "--negative", "blue square"]
    result = _invoke([*args, "--steps", "2", "--out", out])
    assert result.exit_code == 0, result.output + repr(result.exception)
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["pipeline"] == "ToyWorldPipeline" and record["model"] == str(folder)
    assert np.array_equal(_pixels(out), _pixels(toyworld_generated))


def test_a_pipeline_class_diffusers_does_not_know_is_one_error_line(model_dir, tmp_path):
    import shutil

    folder = tmp_path / "custom"
    shutil.copytree(model_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "MyOwnPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    args = ["generate", "--model", folder, "--prompt", PROMPT, "--negative", NEGATIVE, "--out", tmp_path / "x.png"]
    result = _invoke(args)
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: expected a pipeline class that diffusers ")
    assert "got 'MyOwnPipeline'" in lines[0] and "negguide.apply" in lines[0]
    assert not (tmp_path / "x.png").exists()


def test_a_hub_model_with_a_class_diffusers_does_not_know_is_one_error_line(monkeypatch, tmp_path):
    """For a hub id diffusers reads model_index.json itself; its AttributeError becomes the same one line."""
    import diffusers

    def from_pretrained(*args, **kwargs):
        raise AttributeError("module diffusers has no attribute HubOnlyPipeline")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", from_pretrained)
    args = ["generate", "--model", "someone/some-model", "--prompt", PROMPT, "--negative", NEGATIVE]
    result = _invoke([*args, "--out", tmp_path / "x.png"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code != 0 and len(lines) == 1, result.stderr
    assert "got 'HubOnlyPipeline'" in lines[0] and "someone/some-model" in lines[0]


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
        f"error: model path not found: {str(missing)!r}; pass a local folder saved with save_pretrained, a hub id, "
        "or 'toyworld' / 'toyworld-turbo' (the models shipped with negguide)"
    ]


@pytest.mark.parametrize("negative", ["", "   ", "\t\n"])
@pytest.mark.parametrize("method", ["vsf", "cfg", "none"])
def test_empty_negative_is_one_error_line(model_dir, tmp_path, negative, method):
    """The library only warns about an empty negative; on the command line it is a mistake, caught before loading."""
    out = tmp_path / "x.png"
    args = ["generate", "--model", model_dir, "--prompt", PROMPT, "--method", method, "--out", out]
    result = _invoke([*args, "--negative", negative])
    assert result.exit_code != 0
    assert result.stderr.strip().splitlines() == [
        f"error: expected a non-empty --negative (what the picture should not show), got {negative!r}; "
        "pass the text to steer away from, e.g. --negative snow"
    ]
    assert not out.exists()


# ---------------------------------------------------------------------------------- library noise

#: what transformers and diffusers print on every load, and say nothing a command-line user can act on
NOISE = ("requires torchvision", "accelerate", "should be kept in float32", "torch_dtype", "[transformers]")


def test_generate_stderr_holds_no_known_library_noise(model_dir, tmp_path):
    """Run as a user does (a fresh process: the warnings come at import and load); the known noise is gone."""
    import subprocess
    import sys

    out = tmp_path / "quiet.png"
    args = ["generate", "--model", model_dir, "--prompt", PROMPT, "--negative", NEGATIVE, "--steps", "1"]
    command = [sys.executable, "-m", "negguide", *map(str, [*args, "--height", "32", "--width", "32", "--out", out])]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0, result.stderr
    assert out.is_file()
    found = [noise for noise in NOISE if noise in result.stderr]
    assert not found, result.stderr


def test_generate_toyworld_in_bfloat16_has_no_empty_float32_warning(tmp_path):
    """Casting ToyWorld with .to(bfloat16) makes diffusers warn about "modules to keep in float32: []"."""
    import logging

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("diffusers.models.modeling_utils")
    logger.addHandler(handler)
    try:
        args = ["generate", "--model", "toyworld", "--prompt", "red circle", "--negative", "blue square"]
        result = _invoke([*args, "--steps", "1", "--dtype", "bfloat16", "--out", tmp_path / "bf16.png"])
    finally:
        logger.removeHandler(handler)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert not [message for message in seen if "kept in float32" in message], seen


def test_only_the_known_noise_is_silenced_and_only_during_the_command():
    import logging

    from negguide.cli.output import quiet_known_noise

    logger = logging.getLogger("diffusers.models.modeling_utils")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    noise = "There are modules in SD3Transformer2DModel that should be kept in float32: []. Casting directly ..."
    real = "There are modules in SD3Transformer2DModel that should be kept in float32: ['norm_out']. Casting ..."
    logger.addHandler(handler)
    try:
        with quiet_known_noise():
            logger.warning(noise)
            logger.warning(real)
            logger.warning("a real problem")
        logger.warning(noise)
    finally:
        logger.removeHandler(handler)
    assert seen == [real, "a real problem", noise]
