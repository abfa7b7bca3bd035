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
