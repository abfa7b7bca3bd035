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
        ("vsf negatives=extra:1", "unknown role 'extra' in negatives 'extra:1'; write e.g. 'companion:1,extras:0.5'"),
        ("vsf negatives=companion:1,extras:-0.5", "weight of 'extras' to be a finite number >= 0, got '-0.5'"),
        ("nag negatives=companion:1,companion:2", "role 'companion' given twice"),
        ("vsf negatives=", "expected negatives by role, got ''"),
        ("vsf negatives=null", "unknown role 'none'"),
        ("none negatives=companion", "'none' is the unguided model and takes no negatives"),
        ("vsf scael=3 negatives=companion", "unknown parameter `scael`"),
    ],
)
def test_bench_refuses_a_bad_setting_before_loading_the_model(tmp_path, setting, message) -> None:
    out = tmp_path / "bench"
    args = ["toyworld", "bench", "--model", str(tmp_path / "not-loaded"), "--out", str(out), "--setting", setting]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_a_setting_may_carry_weighted_negatives() -> None:
    from negguide.toyworld.bench import Setting
    from negguide.toyworld.cli import parse_setting

    assert parse_setting("vsf scale=3.5 negatives=companion:1,extras:0.5") == Setting(
        "vsf", {"scale": 3.5}, 0.0, "companion:1,extras:0.5"
    )
    assert parse_setting("CFG negatives=Companion+extras guidance_scale=2") == Setting(
        "cfg", {}, 2.0, "companion+extras:1"
    )
    assert parse_setting("nag scale=5").negatives == ""


def test_bench_refuses_a_sweep_and_settings_together(tmp_path) -> None:
    args = ["toyworld", "bench", "--model", str(tmp_path / "not-loaded"), "--sweep", "several", "--setting", "none"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and "pass --sweep or --setting, not both" in result.output


def test_bench_records_several_negatives(tmp_path) -> None:
    """A small run (1 image per pair, 2 steps): the rows are produced, and results.json says what each negated."""
    out = tmp_path / "bench"
    args = ["toyworld", "bench", "--n", "1", "--steps", "2", "--out", str(out), "--setting", "none"]
    args += ["--setting", "vsf scale=12 bias=1.5 negatives=companion:1,extras:0.5"]
    args += ["--setting", "nasa scale=0.5 negatives=companion+extras", "--setting", "cfg scale=4"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    assert saved["n"] == 1 and saved["steps"] == 2
    assert saved["pairs"][0] == {
        "prompt": "red circle",
        "companion": "blue square",
        "extras": ["green triangle", "yellow square", "magenta circle", "cyan triangle"],
    }
    rows = saved["rows"]
    assert [(r["method"], r["negatives"]) for r in rows] == [
        ("none", ""),
        ("vsf", "companion:1,extras:0.5"),
        ("nasa", "companion+extras:1"),
        ("cfg", ""),
    ]
    assert rows[0]["resolved"] is None
    assert rows[1]["resolved"][1] == {
        "yellow square": 1.0,
        "red circle": 0.5,
        "blue square": 0.5,
        "magenta circle": 0.5,
        "cyan triangle": 0.5,
    }
    assert rows[2]["resolved"][2] == "cyan triangle and red circle and blue square and green triangle and yellow square"
    assert rows[3]["resolved"] == ["blue square", "yellow square", "cyan triangle"]
    assert all(0 <= r[k] <= 1 for r in rows for k in ("positive", "removed", "extras_removed", "only", "clean"))
    assert "| negatives | positive | removed | extras removed | only primary | clean |" in result.output
    assert "| cfg | scale=4 | 0 | companion |" in result.output
    assert {p.name for p in out.iterdir()} == {"results.json", "results.md", "tradeoff.png", "samples.png"}
