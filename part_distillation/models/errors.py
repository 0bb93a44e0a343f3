"""Errors every model loader shares (Mask2Former pickles, project checkpoints, Detic)."""
from __future__ import annotations

import pickle


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model (names or shapes); the message names the entries."""


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for something outside the allow-list (loading it could run code)."""
