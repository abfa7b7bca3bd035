"""Guidance under diffusers' context parallelism (``enable_parallelism``), on two CPU processes (gloo).

Each case of tests/context_parallel_worker.py guides a tiny pipeline whose transformer is sharded over two ranks
(Ulysses or ring) and compares it with the same guided call in one process: the sharded guided output equals it
(float32 rounding), and the guidance changes the output far more than that. Flux shards its text with the image
tokens (negguide pads the negatives to a multiple of the ranks and gathers keys, values and text queries); Wan
keeps its text whole.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.context_parallel_worker import CASES


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp") / "results.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    command += ["--master_port", str(_free_port()), "-m", "tests.context_parallel_worker", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-6000:]
    return {tuple(r["case"]): r for r in json.loads(out.read_text())}


@pytest.mark.parametrize("case", CASES, ids=["-".join(c).replace(" ", "_") for c in CASES])
def test_sharded_guided_output_equals_one_process(results, case):
    r = results[case]
    assert r["diff"] < 1e-5, r
    assert r["effect"] > 1e-3, r  # the guidance does something, far above the sharding's rounding


@pytest.mark.parametrize("case", CASES, ids=["-".join(c).replace(" ", "_") for c in CASES])
def test_remove_keeps_the_parallel_processors(results, case):
    r = results[case]
    assert r["restored"] and r["parallel_config_kept"], r
    if r["unguided_after_remove"] is not None:
        assert r["unguided_after_remove"] == 0.0, r  # bit-identical to the sharded pipeline before apply
