"""One evaluation sample of a part dataset: an object, its mask and its ground-truth parts.

Every part dataset reader (PartImageNet, Pascal-Part, Cityscapes-Part) yields these, so
evaluation never branches on the dataset. Masks are at the image's original size; parts
of one part class are merged into one mask (over the object, as the reference merges
them per object for Pascal-Part and Cityscapes-Part).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class DatasetLayoutError(FileNotFoundError):
    """A part dataset is missing or not laid out as expected; the message names the path."""


@dataclass(frozen=True)
class PartSample:
    key: str                  #: unique within the dataset split (image id + object index)
    path: str                 #: the image file
    #: the object class that keys the part mIoU (confusion matrices, majority vote): for
    #: PartImageNet the image's ImageNet class (its wnid), as the reference; for Pascal-Part
    #: and Cityscapes-Part the dataset's object class name
    object_class: str
    wnid: str | None          #: the ImageNet synset that object class maps to (None: not mapped)
    object_mask: np.ndarray   #: bool (H, W)
    part_masks: np.ndarray    #: bool (P, H, W), one per part class present
    part_ids: np.ndarray      #: int64 (P,), the dataset's part class ids
    #: a coarser grouping the mIoU can be keyed by instead (PartImageNet's super-category);
    #: None: the dataset has none (keying by it falls back to ``object_class``)
    supercategory: str | None = None


def merge_by_part_class(masks: np.ndarray, part_ids, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Union of the masks that share a part class id; ids ascending."""
    part_ids = np.asarray(part_ids, dtype=np.int64)
    unique = np.unique(part_ids)
    merged = np.zeros((len(unique), *shape), dtype=bool)
    for i, pid in enumerate(unique):
        merged[i] = np.asarray(masks, dtype=bool)[part_ids == pid].any(axis=0)
    return merged, unique
