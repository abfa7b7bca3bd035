"""``negguide toyworld train`` and ``negguide toyworld bench`` from the command line."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from negguide.cli import main
from negguide.toyworld import load
from negguide.toyworld.bench import SWEEP


def test_train_then_continue_then_bench(tmp_path) -> None:
    runner = CliRunner()
    first, second, bench = tmp_path / "first", tmp_path / "second", tmp_path / "bench"
    result = runner.invoke(
        main, ["toyworld", "train", "--steps", "2", "--batch", "2", "--device", "cpu", "--out", str(first)]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((first / "training.json").read_text())["steps"] == 2
    args = ["toyworld", "train", "--steps", "2", "--batch", "2", "--device", "cpu", "--init", str(first)]
    args += ["--ema", "0.9", "--lr", "1e-4", "--t-mean", "0.5", "--out", str(second)]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    record = json.loads((second / "training.json").read_text())
    assert record["ema"] == 0.9 and record["lr"] == 1e-4 and record["init"]["steps"] == 2
    assert record["t_mean"] == 0.5 and record["init"]["t_mean"] == 0.0
    load(path=second)
    result = runner.invoke(main, ["toyworld", "bench", "--n", "1", "--model", str(second), "--out", str(bench)])
    assert result.exit_code == 0, result.output
    assert {p.name for p in bench.iterdir()} == {"results.json", "results.md", "tradeoff.png", "samples.png"}
    saved = json.loads((bench / "results.json").read_text())
    assert saved["n"] == 1 and len(saved["rows"]) == len(SWEEP)
    assert (bench / "results.md").read_text().strip() in result.output


def test_train_refuses_a_missing_init(tmp_path) -> None:
    result = CliRunner().invoke(main, ["toyworld", "train", "--init", str(tmp_path / "nowhere")])
    assert result.exit_code != 0 and "nowhere" in result.output


def test_bench_measures_the_given_settings_only(tmp_path) -> None:
    out = tmp_path / "bench"
    args = ["toyworld", "bench", "--n", "1", "--out", str(out), "--setting", "none"]
    args += ["--setting", "vsf scale=5 bias=0.1 layers=[0,1]", "--setting", "NAG scale=3"]
    args += ["--setting", "none guidance_scale=2", "--setting", "vsf guidance_scale=1.5 scale=12 bias=1.5"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["method"], r["params"], r["guidance_scale"]) for r in rows] == [
        ("none", {}, 0.0),
        ("vsf", {"scale": 5, "bias": 0.1, "layers": [0, 1]}, 0.0),
        ("nag", {"scale": 3}, 0.0),
        ("none", {}, 2.0),
        ("vsf", {"scale": 12, "bias": 1.5}, 1.5),
    ]
    assert "| vsf | scale=12, bias=1.5 | 1.5 |" in result.output


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("vsf scale", "expected KEY=VALUE, got 'scale'"),
        ("vsf scael=3", "unknown parameter `scael`"),
        ("vsf scale=-1", "expected `scale` >= 0.0, got -1"),
        ("none scale=3", "'none' takes no parameters besides guidance_scale"),
        ("vsf guidance_scale=-1", "expected guidance_scale to be a finite number >= 0"),
        ("none guidance_scale=inf", "got inf"),
        ("none guidance_scale=lots", "got 'lots'"),
        ("nope", "no guidance method 'nope'"),
        ("", "empty setting"),
    ],
)
def test_bench_refuses_a_bad_setting_before_loading_the_model(tmp_path, setting, message) -> None:
    out = tmp_path / "bench"
    args = ["toyworld", "bench", "--model", str(tmp_path / "not-loaded"), "--out", str(out), "--setting", setting]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output and not out.exists()
