"""The errors negguide raises. Each says what was expected, what was got, and what to do next."""

from __future__ import annotations


class NegGuideError(Exception):
    """Base class of every error negguide raises."""


class UnknownMethodError(NegGuideError, LookupError):
    """No guidance method is registered under the requested name."""


class NoAdapterError(NegGuideError, LookupError):
    """No installed adapter knows the pipeline's transformer."""


class ConfigError(NegGuideError, ValueError):
    """A method parameter or configuration file is invalid."""


class PluginError(NegGuideError):
    """A plugin registered something invalid (for example the same method name twice)."""


class NegativePromptError(NegGuideError, ValueError):
    """The negative prompt does not fit the pipeline call (for example a list of the wrong length)."""
