"""``negguide toyworld train`` and ``negguide toyworld bench`` from the command line."""

from __future__ import annotations

import json

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
    args += ["--ema", "0.9", "--lr", "1e-4", "--out", str(second)]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    record = json.loads((second / "training.json").read_text())
    assert record["ema"] == 0.9 and record["lr"] == 1e-4 and record["init"]["steps"] == 2
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
