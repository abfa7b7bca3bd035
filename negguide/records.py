"""Pictures and records as the commands and `negguide.compare` write them: PIL images from pipeline results,
plain JSON values, library versions, one-line exception text.

A leaf module: it imports nothing from negguide (numpy and PIL only inside the helpers that need them), so
the library (`negguide.sweep`) and the command line (`negguide.cli.output` re-exports these) share it
without an import cycle.
"""

from __future__ import annotations

import math
import sys
from typing import Any

__all__ = ["first_picture", "jsonable", "one_line", "pictures", "show", "to_pil", "versions"]


def first_picture(result: Any, with_frame: bool = False) -> Any:
    """The first prompt's image as PIL (for a video, its middle frame, and that frame's index)."""
    found, frame = _pictures(result, limit=1)
    return (found[0], frame) if with_frame else found[0]


def pictures(result: Any) -> list[Any]:
    """Every image of a pipeline's result as PIL, in batch order (for videos, each one's middle frame)."""
    return _pictures(result)[0]


def _pictures(result: Any, limit: int | None = None) -> tuple[list[Any], int | None]:
    images = getattr(result, "images", None)
    if images is not None:
        return [to_pil(picture) for picture in list(images)[:limit]], None
    videos = list(result.frames)[:limit]
    frame = len(videos[0]) // 2
    return [to_pil(video[frame]) for video in videos], frame


def to_pil(value: Any) -> Any:
    """A PIL image from PIL, a tensor or an array (channels first or last, floats in [0, 1] or uint8)."""
    import numpy as np
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if hasattr(value, "detach"):
        value = value.detach().float().cpu().numpy()
    array = np.asarray(value)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array)


def versions() -> dict[str, str]:
    """negguide's, torch's, diffusers' and transformers' versions, and Python's."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version

    found = {}
    for package in ("negguide", "torch", "diffusers", "transformers"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    found["python"] = ".".join(map(str, sys.version_info[:3]))
    return found


def jsonable(value: Any) -> Any:
    """Plain JSON values; non-finite floats become the strings 'inf', '-inf', 'nan' (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def show(value: Any) -> str:
    """A parameter value as shown in tables and labels (``None`` for null)."""
    return "None" if value is None else str(value)


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line`` of an exception, cut to ``limit`` characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0].rstrip(".") if len(lines[0]) <= limit else lines[0][: limit - 3].rstrip() + "..."
    return f"{type(exc).__name__}: {text}"
