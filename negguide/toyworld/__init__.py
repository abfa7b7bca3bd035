"""ToyWorld: a small text-to-image world where negative-prompt adherence can be measured offline.

A word-level ``StableDiffusion3Pipeline`` (``ToyWorldPipeline``) trained from scratch on 32x32 scenes of
coloured shapes, where each primary object nearly always comes with a companion that captions usually omit.
Prompt the primary, give the companion as the negative, and count how often it disappears::

    pipe, prompt, negative, kwargs = negguide.toyworld.demo_pipeline()
    with negguide.apply(pipe, "vsf", negative_prompt=negative):
        images = pipe(prompt, **kwargs).images

See ``docs/toyworld.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

if TYPE_CHECKING:
    import torch

    from negguide.toyworld.pipeline import ToyWorldPipeline

#: the committed, trained pipeline (``save_pretrained`` layout)
WEIGHTS_DIR = Path(__file__).parent / "weights"

__all__ = ["WEIGHTS_DIR", "demo_pipeline", "load"]


def load(device: str | torch.device | None = None, path: str | Path | None = None) -> ToyWorldPipeline:
    """Load the trained ToyWorld pipeline (offline), in eval mode with the progress bar off.

    Args:
        device: where to put it (default: CPU).
        path: a ``save_pretrained`` directory (default: the weights shipped with negguide).
    """
    from negguide.errors import NegGuideError
    from negguide.toyworld.pipeline import ToyWorldPipeline

    path = Path(path) if path is not None else WEIGHTS_DIR
    if not (path / "model_index.json").is_file():
        raise NegGuideError(
            f"toyworld: expected a saved ToyWorld pipeline (model_index.json) in {path}, got none; "
            "train one with `negguide toyworld train --out DIR` and pass path=DIR."
        )
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    verbosity = diffusers_logging.get_verbosity()
    bars = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity_error()  # "text_encoder_3 None cannot be saved/loaded" chatter
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        pipe = ToyWorldPipeline.from_pretrained(path, local_files_only=True)
    finally:
        diffusers_logging.set_verbosity(verbosity)
        if bars[0]:
            diffusers_logging.enable_progress_bar()
        if bars[1]:
            transformers_logging.enable_progress_bar()
    pipe.set_progress_bar_config(disable=True)
    if device is not None:
        pipe.to(device)
    return pipe


def demo_pipeline() -> tuple[ToyWorldPipeline, str, str, dict[str, Any]]:
    """The demo: the trained pipeline, prompt ``"red circle"``, negative ``"blue square"`` and call kwargs.

    Without guidance the model draws a blue square next to the red circle about 9 times in 10 (the
    training data's habit); a working negative prompt removes it.
    """
    from negguide.toyworld.pipeline import CALL_KWARGS

    return load(), "red circle", "blue square", dict(CALL_KWARGS)
