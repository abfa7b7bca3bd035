"""The errors negguide raises. Each says what was expected, what was got, and what to do next."""

from __future__ import annotations

import sys
import warnings

#: packages whose frames a warning skips, so that it points at the caller's line
_INTERNAL = ("negguide", "diffusers", "torch", "transformers", "contextlib")


class NegGuideError(Exception):
    """Base class of every error negguide raises."""


class UnknownMethodError(NegGuideError, LookupError):
    """No guidance method is registered under the requested name."""


class UnknownJudgeError(NegGuideError, LookupError):
    """No judge is registered under the requested name."""


class NoAdapterError(NegGuideError, LookupError):
    """No installed adapter knows the pipeline's transformer."""


class ConfigError(NegGuideError, ValueError):
    """A method parameter or configuration file is invalid."""


class PromptSetError(NegGuideError, ValueError):
    """A prompt set (NegGenBench's JSON format) cannot be read: not a list, or an item lacks a field."""


class PluginError(NegGuideError):
    """A plugin registered something invalid (for example the same method name twice)."""


class NegativePromptError(NegGuideError, ValueError):
    """The negative prompt does not fit the pipeline call (for example a list of the wrong length)."""


class NegGuideWarning(UserWarning):
    """Something negguide did not refuse but that is almost certainly not what was meant (it runs unguided)."""


def warn(message: str) -> None:
    """Issue a ``NegGuideWarning`` attributed to the first frame outside negguide, diffusers and torch."""
    level, frame = 2, sys._getframe(1)  # stacklevel 2 is the frame that called warn()
    while frame is not None and (frame.f_globals.get("__name__") or "").split(".")[0] in _INTERNAL:
        frame = frame.f_back
        level += 1
    warnings.warn(message, NegGuideWarning, stacklevel=level)
