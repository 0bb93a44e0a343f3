"""Errors defined below every layer so that any of them can raise or catch them.

``config.ConfigError`` is :class:`ConfigError`; the entry point prints it as one line, never a
traceback. The checkpoint errors are raised by the one state-file reader (``state_file``),
which the engine and the models both use (``models.errors`` names them too).
"""
from __future__ import annotations

import pickle


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the key."""


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model (names or shapes); the message names the entries."""


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for something outside the allow-list (loading it could run code)."""


__all__ = ["CheckpointMismatchError", "ConfigError", "UnsafePickleError"]
