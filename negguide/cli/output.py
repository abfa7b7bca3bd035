"""What the commands share: the one-line user error, known library noise, tables, PNGs; JSON values, versions and
pictures from `negguide.records`, re-exported.

numpy and PIL are imported inside the helpers that need them, so the commands' ``--help`` stays fast.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from negguide.records import first_picture
from negguide.records import jsonable
from negguide.records import one_line
from negguide.records import pictures
from negguide.records import show
from negguide.records import to_pil
from negguide.records import versions

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


def save_png(picture: Any, path: Path, text: dict[str, str]) -> None:
    """Write ``picture`` as a PNG with ``text`` as international text chunks."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_itxt(key, value)
    picture.save(path, format="PNG", pnginfo=info)


def file_stem(name: str) -> str:
    """A method name made safe for a file name."""
    return re.sub(r"[^\w.-]", "_", name)


def format_table(rows: list[list[str]]) -> str:
    """Left-aligned columns two spaces apart; the first row is the header."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)
