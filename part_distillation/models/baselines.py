"""Trivial part segmenters that pixel grouping must beat (computes only).

* :func:`strip_labels`: the object's bounding box cut into K equal strips along its
  longer side, each strip restricted to the object.
* :func:`color_position_labels`: k-means of colour + position (RGB in [0, 1] and x, y
  divided by the box's longer side) of the object's pixels.

Both return an (H, W) int64 label map: 0 outside the object, 1..K inside.
"""
from __future__ import annotations

import numpy as np
import torch

from .kmeans import kmeans


def strip_labels(object_mask: np.ndarray, num_parts: int = 4) -> np.ndarray:
    """K equal strips of the object's box along its longer side (ties: horizontal strips of columns)."""
    object_mask = np.asarray(object_mask, dtype=bool)
    labels = np.zeros(object_mask.shape, dtype=np.int64)
    ys, xs = np.nonzero(object_mask)
    if len(ys) == 0:
        return labels
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    if x1 - x0 >= y1 - y0:
        coord, start, length = xs, x0, x1 - x0
    else:
        coord, start, length = ys, y0, y1 - y0
    labels[ys, xs] = np.minimum((coord - start) * num_parts // length, num_parts - 1) + 1
    return labels


def color_position_labels(image: np.ndarray, object_mask: np.ndarray, num_parts: int = 4, *,
                          n_init: int = 10, seed: int = 0) -> np.ndarray:
    """k-means (K clusters, ``n_init`` restarts) of RGB + xy inside the object; image (H, W, 3) uint8."""
    object_mask = np.asarray(object_mask, dtype=bool)
    labels = np.zeros(object_mask.shape, dtype=np.int64)
    ys, xs = np.nonzero(object_mask)
    if len(ys) <= num_parts:
        return labels
    side = float(max(ys.max() - ys.min(), xs.max() - xs.min()) + 1)
    points = np.concatenate([np.asarray(image)[ys, xs].astype(np.float32) / 255.0,
                             np.stack([xs, ys], 1).astype(np.float32) / side], axis=1)
    result = kmeans(torch.from_numpy(points), num_parts, n_init=n_init, seed=seed)
    labels[ys, xs] = result.labels.numpy() + 1
    return labels


__all__ = ["color_position_labels", "strip_labels"]
