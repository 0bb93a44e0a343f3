"""Errors every model loader shares (Mask2Former pickles, project checkpoints, Detic).

Defined in ``part_distillation.errors`` (below every layer: the state-file reader under the
engine raises them too) and named here for the model code.
"""
from __future__ import annotations

from part_distillation.errors import CheckpointMismatchError, UnsafePickleError

__all__ = ["CheckpointMismatchError", "UnsafePickleError"]
