"""The ``negguide`` group itself: ``--version``, ``--help`` and ``python -m negguide``."""

from __future__ import annotations

import json
import subprocess
import sys

import negguide
from tests.cli.helpers import _invoke


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


def test_docs_and_help_name_every_command():
    """docs/cli.md's first sentence and `negguide --help` list every command (there were four, the docs said three)."""
    from pathlib import Path

    from negguide.cli import main

    names = sorted(main.commands)
    words = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven"}
    intro = (Path(__file__).parents[2] / "docs" / "cli.md").read_text(encoding="utf-8").split("\n\n")[1]
    intro = " ".join(intro.split())
    assert f"has {words[len(names)]} commands" in intro, intro
    assert all(f"`{name}`" in intro for name in names), intro
    listed = _invoke(["--help"]).stdout
    assert all(f"negguide {name}" in listed for name in names), listed
