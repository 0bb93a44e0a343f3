"""Quality of class-agnostic part segments against true parts (stages 2 and 3).

``best_match_iou``: for one object, each true part is matched to the produced segment
that overlaps it best (IoU); the object's score is the mean over its true parts. A
dataset's score is the mean over objects. Segments may be fewer or more than the true
parts; a true part no segment touches scores 0. The same function scores the stage and
its baselines (``models/baselines.py``), so the figures compare like with like.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np

from part_distillation.data.frame import ImageFrame
from part_distillation.data.images import load_rgb
from part_distillation.masks import decode_rle, mask_iou


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


def mean_best_match_iou(scores: Iterable[float]) -> float:
    """The mean over objects (NaN for none)."""
    scores = list(scores)
    return float(np.mean(scores)) if scores else float("nan")


def synthetic_objects(root: str | Path, split: str = "train", fit: int = 640) -> list[dict]:
    """The synthetic dataset's objects in the fitted frame: per image ``key``, ``image`` (h, w, 3)
    uint8, ``object`` (h, w) bool, ``parts`` (P, h, w) bool true parts present, ``fitted`` (h, w)."""
    root = Path(root)
    parts = json.loads((root / "annotations" / f"{split}.json").read_text())
    objects = json.loads((root / "annotations" / f"objects_{split}.json").read_text())
    obj_of = {a["image_id"]: a for a in objects["annotations"]}
    parts_of: dict[int, list] = {}
    for ann in parts["annotations"]:
        parts_of.setdefault(ann["image_id"], []).append(ann)
    items = []
    for image in objects["images"]:
        rgb = load_rgb(root / split / image["file_name"])
        frame = ImageFrame.fit(rgb.shape[:2], size=fit)
        obj = frame.masks_to_fitted(decode_rle(obj_of[image["id"]]["segmentation"]))
        true = frame.masks_to_fitted(np.stack([decode_rle(a["segmentation"]) for a in parts_of[image["id"]]]))
        keep = true.any((1, 2))
        items.append({"key": image["file_name"], "image": np.array(frame.fit_image(rgb)), "object": obj,
                      "parts": true[keep], "fitted": frame.fitted})
    return items


__all__ = ["best_match_iou", "mean_best_match_iou", "synthetic_objects"]
