"""One guided call under a memory cap, in a fresh interpreter: the O(L) tests of the attention paths and of each
video family. A script run by ``run_capped`` starts with ``PRELUDE``: ``cap_address_space(budget)`` (the address
space capped at what the process uses plus ``budget``: a larger allocation fails) and ``peak_rss()``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

PRELUDE = r"""
import resource


def vm_size():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024


def cap_address_space(budget):
    resource.setrlimit(resource.RLIMIT_AS, (vm_size() + budget, resource.getrlimit(resource.RLIMIT_AS)[1]))


def peak_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

"""


def run_capped(script: str, *args: Any, timeout: int = 300) -> dict[str, Any]:
    """Run ``PRELUDE + script`` with ``args`` (``sys.argv[1:]``, as strings); the JSON its last line prints."""
    proc = subprocess.run([sys.executable, "-c", PRELUDE + script, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=dict(os.environ))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
