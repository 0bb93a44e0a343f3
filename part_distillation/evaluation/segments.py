"""Quality of class-agnostic part segments against true parts (stages 2 and 3).

``best_match_iou``: for one object, each true part is matched to the produced segment
that overlaps it best (IoU); the object's score is the mean over its true parts. A
dataset's score is the mean over objects. Segments may be fewer or more than the true
parts; a true part no segment touches scores 0. The same function scores the stage and
its baselines (``models/baselines.py``), so the figures compare like with like.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from part_distillation.masks import mask_iou


def best_match_iou(true_parts: np.ndarray, segments: np.ndarray) -> float:
    """Mean over true parts (P, H, W) of the best IoU with any segment (S, H, W)."""
    true_parts = np.asarray(true_parts, dtype=bool)
    segments = np.asarray(segments, dtype=bool)
    if true_parts.ndim != 3 or segments.ndim != 3 or true_parts.shape[1:] != segments.shape[1:]:
        raise ValueError(f"need (P, H, W) and (S, H, W) of one size, got {true_parts.shape} and {segments.shape}")
    if len(true_parts) == 0:
        raise ValueError("an object without true parts cannot be scored")
    if len(segments) == 0:
        return 0.0
    return float(mask_iou(true_parts, segments).max(1).mean())


def labels_to_segments(labels: np.ndarray) -> np.ndarray:
    """(H, W) int label map (0 = none) -> (S, H, W) bool, one per label present."""
    ids = [i for i in np.unique(labels) if i > 0]
    return np.stack([labels == i for i in ids]) if ids else np.zeros((0, *labels.shape), bool)


def mean_best_match_iou(scores: Iterable[float]) -> float:
    """The mean over objects (NaN for none)."""
    scores = list(scores)
    return float(np.mean(scores)) if scores else float("nan")


__all__ = ["best_match_iou", "labels_to_segments", "mean_best_match_iou"]
