"""A hypothesis fuzz of apply + one call on every family, in a subprocess: the process survives, every outcome is
a finite output or a NegGuideError, and the pipeline is bit-identical afterwards (tests/fuzz_apply.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = 60


@pytest.mark.parametrize("family", ["sd3", "flux", "wan"])
def test_random_input_never_crashes_never_leaks(family):
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fuzz_apply", family, str(EXAMPLES)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"exit {proc.returncode} (a negative code is a signal):\n{proc.stderr[-4000:]}"
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    outcomes = summary["outcomes"]
    assert sum(outcomes.values()) == EXAMPLES
    assert outcomes.get("output", 0) > 0 and sum(v for k, v in outcomes.items() if k != "output") > 0, outcomes
