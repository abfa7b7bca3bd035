"""Shared fixtures: the network is blocked for the whole session; tiny pipelines are built once."""

from __future__ import annotations

import os
import socket

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run: a green local run is a green CI run.
settings.register_profile("negguide", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("negguide")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _refuse(*args, **kwargs):
    raise RuntimeError(f"network access attempted in a test: {args!r}")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run fastest on one thread (and a loaded 2-core machine thrashes with more)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(autouse=True, scope="session")
def block_network():
    """Any outbound connection fails loudly: proves the tests never download anything."""
    saved = socket.socket.connect, socket.socket.connect_ex, socket.create_connection
    socket.socket.connect = _refuse
    socket.socket.connect_ex = _refuse
    socket.create_connection = _refuse
    yield
    socket.socket.connect, socket.socket.connect_ex, socket.create_connection = saved


@pytest.fixture
def pm():
    """A fresh plugin manager with the built-ins and no entry points."""
    from negguide.registry import get_plugin_manager

    return get_plugin_manager(entry_points=False)


@pytest.fixture(scope="session")
def sd3_pipe():
    from negguide import tiny

    return tiny.sd3()
