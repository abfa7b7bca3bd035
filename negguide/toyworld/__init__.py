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
#: ToyWorld-Turbo, the distilled few-step student: its transformer, its sampler's scheduler and its training
#: record (the other components are the teacher's, see ``negguide.toyworld.distill``)
TURBO_DIR = Path(__file__).parent / "weights_turbo"
#: the shipped models by name: the teacher and its distilled student
VARIANTS = ("teacher", "turbo")

__all__ = ["TURBO_DIR", "VARIANTS", "WEIGHTS_DIR", "demo_pipeline", "load"]


def load(
    device: str | torch.device | None = None, path: str | Path | None = None, variant: str | None = None
) -> ToyWorldPipeline:
    """Load a trained ToyWorld pipeline (offline), in eval mode with the progress bar off.

    ``load()`` is the shipped teacher, ``load("turbo")`` (or ``load(variant="turbo")``) its distilled few-step
    student ToyWorld-Turbo (run it with ``guidance_scale=0`` and 1-4 steps), ``load(path=DIR)`` a saved pipeline.

    Args:
        device: where to put it (default: CPU). A variant name given here (``load("turbo")``) is read as ``variant``.
        path: a ``save_pretrained`` directory (default: the weights shipped with negguide).
        variant: ``"teacher"`` (default) or ``"turbo"``; not together with ``path``.
    """
    from negguide.errors import NegGuideError
    from negguide.toyworld.pipeline import ToyWorldPipeline

    if isinstance(device, str) and device in VARIANTS and variant is None:
        device, variant = None, device
    if variant is not None and variant not in VARIANTS:
        raise NegGuideError(
            f"toyworld: expected a model variant in {', '.join(map(repr, VARIANTS))}, got {variant!r}; "
            "pass path=DIR for a saved pipeline."
        )
    if variant is not None and path is not None:
        raise NegGuideError(
            f"toyworld: expected a variant or a path, got both (variant={variant!r}, path={str(path)!r}); "
            "pass one of them."
        )
    path = Path(path) if path is not None else WEIGHTS_DIR
    turbo = variant == "turbo"
    if turbo and not (TURBO_DIR / "transformer" / "config.json").is_file():
        raise NegGuideError(
            f"toyworld: expected the ToyWorld-Turbo transformer in {TURBO_DIR / 'transformer'}, got none; "
            "reinstall negguide, or distil one with `negguide toyworld distill --out DIR` and pass path=DIR."
        )
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
        extra: dict[str, Any] = {}
        if turbo:
            from diffusers import SD3Transformer2DModel

            extra["transformer"] = SD3Transformer2DModel.from_pretrained(
                TURBO_DIR / "transformer", local_files_only=True
            )
            if (TURBO_DIR / "scheduler").is_dir():  # the student's own sampler (distill --shift-terminal)
                from negguide.toyworld.pipeline import TerminalFlowMatchScheduler

                extra["scheduler"] = TerminalFlowMatchScheduler.from_pretrained(
                    TURBO_DIR, subfolder="scheduler", local_files_only=True
                )
        pipe = ToyWorldPipeline.from_pretrained(path, local_files_only=True, **extra)
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
