"""YAML/dict configs -> GuidanceSpec, and method configs."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import negguide
from negguide.config import GuidanceSpec
from negguide.errors import ConfigError
from negguide.plugins.nag import NormalizedAttentionGuidance
from negguide.plugins.vsf import ValueSignFlip


def test_load_yaml_file(tmp_path):
    path = tmp_path / "vsf.yaml"
    path.write_text("method: vsf\nnegative_prompt: snow\nparams:\n  scale: 3.5\n  bias: 0.1\n")
    spec = negguide.load_config(path)
    assert spec == GuidanceSpec(method="vsf", negative_prompt="snow", params={"scale": 3.5, "bias": 0.1})


def test_interpolation_is_resolved(tmp_path):
    path = tmp_path / "nag.yaml"
    path.write_text("method: nag\nparams:\n  scale: 5.0\n  tau: ${.scale}\n")
    spec = negguide.load_config(str(path))
    assert spec.method == "nag" and spec.params == {"scale": 5.0, "tau": 5.0}
    assert spec.adapter == "auto"


def test_from_dict():
    spec = negguide.load_config({"method": "vsf", "params": {"scale": 3.0}})
    assert spec.params["scale"] == 3.0


@pytest.mark.parametrize(
    ("source", "match"),
    [
        ({"method": "vsf", "parms": {}}, "parms"),
        ({"params": {}}, "method"),
        ("/nonexistent/file.yaml", "not found"),
    ],
)
def test_bad_configs(source, match):
    with pytest.raises(ConfigError, match=match):
        negguide.load_config(source)


def test_spec_params_are_validated_at_load(sd3_pipe):
    """The issue on careless input: a config is validated when it loads, not later at apply."""
    with pytest.raises(ConfigError, match="vsf: expected `scale` >= 0"):
        negguide.load_config({"method": "vsf", "negative_prompt": "x", "params": {"scale": -2}})


@settings(max_examples=30, deadline=None)
@given(scale=st.floats(0, 50), bias=st.one_of(st.floats(0, 5), st.just(math.inf)), start=st.floats(0, 0.49))
def test_yaml_round_trip(scale, bias, start):
    """A config survives a YAML round trip through omegaconf."""
    from omegaconf import OmegaConf

    cfg = ValueSignFlip.make_config({"scale": scale, "bias": bias, "start": start})
    text = OmegaConf.to_yaml(OmegaConf.create({"method": "vsf", "params": cfg.model_dump()}))
    spec = negguide.load_config(OmegaConf.to_container(OmegaConf.create(text)))
    assert ValueSignFlip.make_config(spec.params) == cfg


def test_unknown_parameter_lists_known():
    with pytest.raises(ConfigError, match="unknown parameter `tua`.*`tau`"):
        NormalizedAttentionGuidance.make_config({"tua": 2})


def test_window_semantics():
    cfg = ValueSignFlip.make_config({"start": 0.25, "stop": 0.75})
    assert [cfg.active(i, 8) for i in range(8)] == [False, False, True, True, True, True, False, False]
    assert not ValueSignFlip.make_config({"enabled": False}).active(0, 8)


def test_weighted_negatives_in_a_config():
    spec = negguide.load_config({"method": "vsf", "negatives": {"snow": 1, "people": 0.5}})
    assert spec.negatives == {"snow": 1.0, "people": 0.5} and spec.negative_prompt is None


@pytest.mark.parametrize(
    ("negatives", "match"),
    [
        ({"snow": -1}, r"`negatives.snow`: Input should be greater than or equal to 0 \(got -1\)"),
        ({"snow": "1"}, r"`negatives.snow`: Input should be a valid number \(got '1'\)"),
        ({"snow": True}, r"`negatives.snow`: Input should be a valid number \(got True\)"),
        ({"snow": math.nan}, r"`negatives.snow`: Input should be a finite number"),
        ({}, r"^config: expected at least one entry in `negatives`, got an empty mapping\.$"),
    ],
)
def test_bad_weighted_negatives_in_a_config(negatives, match):
    with pytest.raises(ConfigError, match=match):
        negguide.load_config({"method": "vsf", "negatives": negatives})


def test_a_config_has_one_kind_of_negative():
    with pytest.raises(ConfigError, match=r"^config: expected either `negative_prompt` or `negatives`, got both\.$"):
        negguide.load_config({"method": "vsf", "negatives": {"a": 1.0}, "negative_prompt": "b"})


def test_apply_takes_the_configs_weighted_negatives(sd3_pipe):
    spec = negguide.load_config({"method": "nag", "negatives": {"snow": 1.0, "people": 0.5}})
    with negguide.apply(sd3_pipe, spec) as handle:
        assert [(n.text, n.weight) for n in handle.negatives] == [("snow", 1.0), ("people", 0.5)]


@pytest.mark.parametrize(
    "value",
    ["${oc.env:HOME}", "${ oc.env : HOME }", "${oc.env:HOME,snow}", "${oc.decode:'1'}", "${oc.env:${.x}}",
     "${${.r}:HOME}", "a ${oc.env:HOME} b", "${now:%Y}"],
)  # fmt: skip
def test_no_resolver_runs_so_a_config_cannot_read_the_environment(tmp_path, value, monkeypatch):
    monkeypatch.setenv("HOME", "/secret-home")
    path = tmp_path / "evil.yaml"
    path.write_text(f'method: vsf\nnegative_prompt: "{value}"\nparams: {{}}\n')
    with pytest.raises(ConfigError, match="no resolver .* runs") as info:
        negguide.load_config(path)
    assert "/secret-home" not in str(info.value)
    with pytest.raises(ConfigError, match="no resolver"):
        negguide.load_config({"method": "vsf", "negative_prompt": value, "r": "oc.env", "x": "HOME"})


def test_escaped_interpolation_stays_literal():
    spec = negguide.load_config({"method": "vsf", "negative_prompt": "\\${oc.env:HOME}"})
    assert spec.negative_prompt == "${oc.env:HOME}"


def test_config_is_validated_when_it_loads(tmp_path):
    with pytest.raises(negguide.UnknownMethodError, match="no guidance method 'vfs'"):
        negguide.load_config({"method": "vfs"})
    with pytest.raises(ConfigError, match=r"expected `adapter` to be 'auto' or an installed family .* got 'sdxl'"):
        negguide.load_config({"method": "vsf", "adapter": "sdxl"})
    with pytest.raises(ConfigError, match="unknown parameter `scael`"):
        negguide.load_config({"method": "vsf", "params": {"scael": 1.0}})
    with pytest.raises(ConfigError, match="is a directory, not a file"):
        negguide.load_config(tmp_path)
