"""The configuration error, defined below every layer so that any of them can raise it.

``config.ConfigError`` is this class; the entry point prints it as one line, never a traceback.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the key."""


__all__ = ["ConfigError"]
