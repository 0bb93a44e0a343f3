"""What a model (or a stage's records) predicts for one sample: the type that inference produces
and the evaluation scores, below both so neither imports the other for it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: AR settings: the top-k proposal masks as they are (the published AR), one label per pixel.
AR_SETTINGS = ("overlapping", "one-label")


@dataclass(frozen=True)
class Prediction:
    """A model's (or a stage's records') output for one sample, at the sample's size."""

    masks: np.ndarray                    #: bool (N, H, W)
    scores: np.ndarray                   #: float (N,)
    #: int (N,) part cluster per mask (0..K-1; -1: scored for recall only); None: proposals only
    clusters: np.ndarray | None = None
    #: the same forward pass's proposals without one label per pixel (a proposal model's
    #: ``overlapping`` AR setting); None: the masks above are the only set (they do not overlap)
    overlapping: "Prediction | None" = None

    def ar_masks(self, setting: str) -> tuple[np.ndarray, np.ndarray]:
        """(masks, scores) scored for AR in ``setting`` (one of :data:`AR_SETTINGS`)."""
        if setting not in AR_SETTINGS:
            raise ValueError(f"AR setting must be one of {AR_SETTINGS}, got {setting!r}")
        chosen = self.overlapping if setting == "overlapping" and self.overlapping is not None else self
        return np.asarray(chosen.masks, dtype=bool), np.asarray(chosen.scores, dtype=np.float64)
