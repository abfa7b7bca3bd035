"""What the commands share: the one-line user error, known library noise, tables, JSON values, versions, PNGs.

numpy and PIL are imported inside the helpers that need them, so the commands' ``--help`` stays fast.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

__all__ = [
    "KNOWN_NOISE",
    "CLIError",
    "file_stem",
    "first_picture",
    "format_table",
    "jsonable",
    "nonempty_negative",
    "one_line",
    "pictures",
    "quiet_known_noise",
    "save_png",
    "show",
    "to_pil",
    "versions",
]


class CLIError(click.ClickException):
    """A user error, shown as one line ``error: ...`` on stderr, without a traceback."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        lines = [line.strip() for line in str(message).splitlines() if line.strip()]
        super().__init__("; ".join([line.rstrip(".") for line in lines[:-1]] + lines[-1:]))
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


_NO_ACCELERATE = re.compile(r"Cannot initialize model with low cpu memory usage because `accelerate` was not found")

#: library log messages that tell a command-line user nothing to act on: (logger, pattern the message starts with).
#: Exact loggers and messages only: every other record of these loggers, and every other logger, still shows.
KNOWN_NOISE: tuple[tuple[str, re.Pattern[str]], ...] = (
    # transformers >= 5 without torchvision falls back to the PIL image processors; negguide uses none of them
    (
        "transformers.utils.import_utils",
        re.compile(r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+Pil`"),
    ),
    # diffusers without accelerate loads with a little more memory; nothing else changes
    ("diffusers.pipelines.pipeline_utils", _NO_ACCELERATE),
    ("diffusers.models.modeling_utils", _NO_ACCELERATE),
    # a cast with .to(dtype) warns about the modules to keep in float32 even when there are none
    ("diffusers.models.modeling_utils", re.compile(r"There are modules in \w+ that should be kept in float32: \[\]\.")),
)


class _KnownNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(record.name == name and pattern.match(message) for name, pattern in KNOWN_NOISE)


@contextlib.contextmanager
def quiet_known_noise() -> Iterator[None]:
    """Drop the `KNOWN_NOISE` log records while the block runs (a command); restore the loggers after it."""
    noise = _KnownNoise()
    loggers = [logging.getLogger(name) for name in dict.fromkeys(name for name, _ in KNOWN_NOISE)]
    for logger in loggers:
        logger.addFilter(noise)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(noise)


def nonempty_negative(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """The ``--negative`` option's check: absent is fine, empty or only whitespace is a user error.

    The library only warns about an empty negative (it guides with nothing); on the command line it is a typo.
    """
    if value is not None and not value.strip():
        raise CLIError(
            f"expected a non-empty --negative (what the picture should not show), got {value!r}; "
            "pass the text to steer away from, e.g. --negative snow"
        )
    return value


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


def save_png(picture: Any, path: Path, text: dict[str, str]) -> None:
    """Write ``picture`` as a PNG with ``text`` as international text chunks."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_itxt(key, value)
    picture.save(path, format="PNG", pnginfo=info)


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


def file_stem(name: str) -> str:
    """A method name made safe for a file name."""
    return re.sub(r"[^\w.-]", "_", name)


def format_table(rows: list[list[str]]) -> str:
    """Left-aligned columns two spaces apart; the first row is the header."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)
