"""Errors every model loader shares (Mask2Former pickles, project checkpoints, Detic)."""
from __future__ import annotations


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model (names or shapes); the message names the entries."""
