"""Mask helpers every stage shares: COCO RLE encoding, resizing, areas and IoU.

RLEs are stored as plain dicts ``{"size": [h, w], "counts": str}`` (COCO compressed
form, counts as text) so they serialise to JSON and COCO tools read them directly.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from pycocotools import mask as _coco

RLE = dict


def resize_masks_nearest(masks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest resize of a bool (..., H, W) stack to ``shape`` (pixel-centre sampling): the one
    rule masks change frames by (``data/frame.py``, the store's COCO export)."""
    masks = np.asarray(masks)
    h, w = masks.shape[-2:]
    th, tw = int(shape[0]), int(shape[1])
    if (h, w) == (th, tw):
        return masks.astype(bool)
    rows = np.minimum(((np.arange(th) + 0.5) * h / th).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(tw) + 0.5) * w / tw).astype(np.int64), w - 1)
    return masks[..., rows[:, None], cols[None, :]].astype(bool)


def encode_rle(mask: np.ndarray) -> RLE:
    """Encode one binary (H, W) mask as a JSON-ready COCO RLE."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"encode_rle expects a 2-D mask, got shape {mask.shape}")
    rle = _coco.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def encode_rles(masks: np.ndarray | Sequence[np.ndarray]) -> list[RLE]:
    """Encode a stack (N, H, W) of binary masks."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"encode_rles expects (N, H, W) masks, got shape {masks.shape}")
    if len(masks) == 0:
        return []
    rles = _coco.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")} for r in rles]


def _to_coco(rle: RLE) -> dict:
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE as in some COCO json files
        return _coco.frPyObjects(rle, int(rle["size"][0]), int(rle["size"][1]))
    return {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def decode_rle(rle: RLE) -> np.ndarray:
    """Decode one RLE to a bool (H, W) mask."""
    return _coco.decode(_to_coco(rle)).astype(bool)


def decode_rles(rles: Sequence[RLE], size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode RLEs to a bool (N, H, W) stack; ``size`` gives (H, W) when the list is empty."""
    if len(rles) == 0:
        if size is None:
            raise ValueError("decode_rles needs size=(h, w) for an empty list")
        return np.zeros((0, *size), dtype=bool)
    return _coco.decode([_to_coco(r) for r in rles]).transpose(2, 0, 1).astype(bool)


def rle_area(rles: RLE | Sequence[RLE]) -> np.ndarray:
    """Pixel count of each RLE, without decoding."""
    if isinstance(rles, dict):
        rles = [rles]
    return np.asarray(_coco.area([_to_coco(r) for r in rles]), dtype=np.int64)


def rle_to_bbox(rles: Sequence[RLE]) -> np.ndarray:
    """Boxes (N, 4) in XYWH, as COCO stores them."""
    if len(rles) == 0:
        return np.zeros((0, 4))
    return np.asarray(_coco.toBbox([_to_coco(r) for r in rles]), dtype=np.float64).reshape(-1, 4)


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (N, M) float64 between two stacks of binary masks of the same (H, W).

    The ratio is float64: IoUs are compared with thresholds such as 0.65, and
    float32(0.65) < 0.65 would turn an exact hit into a miss. The pixel counts are exact
    integers either way: float32 while a mask has fewer than 2**24 pixels (half the memory
    of the flattened stacks), float64 beyond."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    pixels = int(np.prod(a.shape[1:])) if a.ndim > 1 else 0
    dtype = np.float32 if pixels < 2 ** 24 else np.float64
    a = a.reshape(len(a), -1).astype(dtype)
    b = b.reshape(len(b), -1).astype(dtype)
    inter = (a @ b.T).astype(np.float64)
    union = a.sum(1, dtype=np.float64)[:, None] + b.sum(1, dtype=np.float64)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def resize_masks(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool (N, H, W) stack to ``size`` = (h, w)."""
    masks = np.asarray(masks, dtype=bool)
    h, w = masks.shape[-2:]
    th, tw = size
    rows = np.minimum((np.arange(th) + 0.5) * h / th, h - 1).astype(np.int64)
    cols = np.minimum((np.arange(tw) + 0.5) * w / tw, w - 1).astype(np.int64)
    return masks[..., rows[:, None], cols[None, :]]


def union(masks: Iterable[np.ndarray]) -> np.ndarray:
    """Pixel-wise OR of binary masks."""
    out = None
    for m in masks:
        out = np.asarray(m, dtype=bool) if out is None else out | m
    if out is None:
        raise ValueError("union of no masks")
    return out


def masks_to_label_map(masks: np.ndarray, labels: Sequence[int] | None = None, background: int = 0,
                       shape: tuple[int, int] | None = None) -> np.ndarray:
    """Bool masks (N, H, W) -> an int64 (H, W) label map: mask i's pixels get ``labels[i]``
    (default ``i + 1``), uncovered pixels ``background``; where masks overlap the later one
    wins. ``shape`` gives (H, W) when there are no masks."""
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        if shape is None:
            raise ValueError(f"masks must be (N, H, W), got {masks.shape}")
        masks = masks.reshape(0, *shape)
    labels = range(1, len(masks) + 1) if labels is None else labels
    out = np.full(masks.shape[1:] if shape is None else tuple(shape), background, dtype=np.int64)
    for mask, label in zip(masks, labels):
        out[mask] = int(label)
    return out


def label_map_to_masks(label_map: np.ndarray, ids: Iterable[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """An (H, W) int label map -> (bool masks (S, H, W), their labels (S,) int64): one mask per
    label of ``ids`` present in the map, in that order (default: every label > 0, ascending)."""
    label_map = np.asarray(label_map)
    present = np.unique(label_map)
    wanted = present[present > 0] if ids is None else np.asarray(list(ids), dtype=np.int64)
    wanted = wanted[np.isin(wanted, present)].astype(np.int64)
    masks = label_map[None] == wanted[:, None, None] if len(wanted) else np.zeros((0, *label_map.shape), bool)
    return masks, wanted


def label_map_miou(a: np.ndarray, b: np.ndarray, background: int = 0) -> float:
    """Mean IoU between two integer label maps over the labels present in either.

    ``background`` is left out; two maps with no other label agree fully (1.0).
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: {a.shape} vs {b.shape}")
    ious = []
    for label in np.union1d(np.unique(a), np.unique(b)):
        if label == background:
            continue
        in_a, in_b = a == label, b == label
        ious.append(np.logical_and(in_a, in_b).sum() / np.logical_or(in_a, in_b).sum())
    return float(np.mean(ious)) if ious else 1.0
