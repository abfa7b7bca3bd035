"""Method parameters written as ``KEY=VALUE`` text, as the command line takes them.

Shared by ``negguide generate --param`` and ``negguide toyworld bench --setting``. A leaf module: it
imports nothing from negguide, and click only when it reports a bad value, so any command can use it
without an import cycle.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["parse_param", "parse_params"]


def parse_param(text: str, option: str = "--param") -> tuple[str, Any]:
    """Split ``KEY=VALUE`` and read the value as int, float, bool, inf, null or a JSON list, else text.

    Args:
        text: one ``KEY=VALUE`` item; spaces around the key and the value are dropped.
        option: the command-line option named in error messages.

    Returns:
        The key and its value.

    Raises:
        click.BadParameter: ``text`` has no ``=`` or no key, or its value starts like JSON and is not.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise _bad(f"expected KEY=VALUE, got {text!r}", option)
    raw = raw.strip()
    lowered = raw.lower()
    words = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
    words |= {"null": None, "none": None, "~": None}
    words |= {"inf": math.inf, "+inf": math.inf, "infinity": math.inf, "-inf": -math.inf, "-infinity": -math.inf}
    if lowered in words:
        return key, words[lowered]
    for read in (int, float):
        try:
            return key, read(raw)
        except ValueError:
            pass
    if raw.startswith(("[", "{")):
        try:
            return key, json.loads(raw)
        except json.JSONDecodeError as exc:
            raise _bad(f"{key}: {raw!r} is not valid JSON ({exc.msg})", option) from None
    return key, raw


def parse_params(items: tuple[str, ...], option: str = "--param") -> dict[str, Any]:
    """Read several ``KEY=VALUE`` items (see `parse_param`) into a dict; a later key wins.

    Args:
        items: the option's values, in command-line order.
        option: the command-line option named in error messages.

    Returns:
        The parameters by key.
    """
    return dict(parse_param(item, option) for item in items)


def _bad(message: str, option: str) -> Exception:
    import click  # only on error: reading parameters needs no click

    return click.BadParameter(message, param_hint=f"'{option}'")
