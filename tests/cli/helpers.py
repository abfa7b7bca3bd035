"""What the command-line tests share: invoking ``negguide`` in-process, and comparing its pictures.

Commands run in-process with click's CliRunner on the tiny offline SD3 pipeline. Pictures are
checked against the library run directly (``negguide.apply`` on the same weights), not against the
CLI's own output.
"""

from __future__ import annotations

import numpy as np
import torch
from click.testing import CliRunner
from PIL import Image

import negguide
from negguide.cli import main

BUILTINS = ("cfg", "nag", "nasa", "vsf")
PROMPT, NEGATIVE = "a red fox in a forest", "snow"


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)  # click < 8.2 mixes stderr into output by default
    except TypeError:
        return CliRunner()


def _invoke(args):
    return _runner().invoke(main, [str(a) for a in args])


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _reference(pipe, method=None, negative=NEGATIVE, steps=2, seed=0, **call) -> np.ndarray:
    """The picture the library itself makes with ``method`` (None: the untouched pipeline), as uint8 levels."""
    kwargs = {"num_inference_steps": steps, "generator": torch.Generator().manual_seed(seed), "output_type": "np"}
    kwargs.update(call)
    if method is None:
        out = pipe(PROMPT, **kwargs)
    else:
        name, params = method
        with negguide.apply(pipe, name, negative_prompt=negative, **params):
            out = pipe(PROMPT, **kwargs)
    return (np.clip(out.images[0], 0.0, 1.0) * 255).round().astype(np.int16)


def _assert_same_picture(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= 1  # one quantisation level for rounding differences
