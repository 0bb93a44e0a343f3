"""Training records from a part dataset's ground truth (the supervised and few-shot baselines).

The baselines train on labelled parts instead of pseudo-labels, with the same engine,
augmentation and loss as stages 4 and 6. So the labelled split is converted into the
in-memory form of the records those stages train on (``data/part_records.py``): one
record per image with ``key``, ``path``, ``original_size``/``fitted_size`` (the image
fitted to ``fit_size``), ``part_masks`` (RLE, fitted frame), ``object_ratio`` and
``class_index``, plus ``part_classes`` (the dataset's part class id of each mask) and
``object_classes`` (the object classes shown). A :class:`RecordList` of them is a record
source :class:`~part_distillation.data.part_records.PartRecordDataset` reads like a store.

One image is one training example: the parts of all its annotated objects (Pascal-Part
and Cityscapes-Part have several per image), each object's parts merged per part class
by the reader; ``merge_parts=True`` (the semantic baseline: the reference's merged
ground truth) merges them per part class over the whole image. Masks empty in the fitted
frame are dropped; an image left without parts is not a training example.

:func:`fewshot_subset` picks the few-shot images: a pure function of the image keys
(sorted first), their object classes, the percentage and the seed.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from part_distillation.masks import encode_rles

from .frame import ImageFrame
from .part_sample import PartSample, merge_by_part_class


def image_key(sample: PartSample) -> str:
    """The image a sample's object is in: its key before ``/`` (the readers' ``image/object`` keys;
    PartImageNet's keys are image ids)."""
    return sample.key.split("/", 1)[0]


def labelled_records(samples: Iterable[PartSample], *, fit_size: int, merge_parts: bool = False,
                     object_classes: Sequence[str] | None = None) -> tuple[list[dict[str, Any]], int]:
    """Group ``samples`` by image into training records; returns ``(records, images_without_parts)``.

    ``class_index`` is the index of the image's first object class in ``object_classes``
    (default: the sorted object classes of the samples).
    """
    by_image: dict[str, list[PartSample]] = {}
    for sample in samples:
        by_image.setdefault(image_key(sample), []).append(sample)
    if object_classes is None:
        object_classes = sorted({s.object_class for group in by_image.values() for s in group})
    class_index = {name: i for i, name in enumerate(object_classes)}
    records, empty = [], 0
    for key, group in by_image.items():
        record = _image_record(key, group, fit_size, merge_parts, class_index)
        if record is None:
            empty += 1
        else:
            records.append(record)
    return records, empty


def _image_record(key: str, group: list[PartSample], fit_size: int, merge_parts: bool,
                  class_index: Mapping[str, int]) -> dict[str, Any] | None:
    shape = tuple(group[0].object_mask.shape)
    for sample in group:
        if tuple(sample.object_mask.shape) != shape or sample.path != group[0].path:
            raise ValueError(f"image {key!r}: its objects disagree on the image ({sample.path}, size "
                             f"{sample.object_mask.shape} vs {group[0].path}, {shape})")
    masks = np.concatenate([np.asarray(s.part_masks, dtype=bool).reshape(-1, *shape) for s in group])
    ids = np.concatenate([np.asarray(s.part_ids, dtype=np.int64).reshape(-1) for s in group])
    if merge_parts and len(ids):
        masks, ids = merge_by_part_class(masks, ids, shape)
    frame = ImageFrame.fit(shape, size=fit_size)
    fitted = frame.masks_to_fitted(masks) if len(masks) else np.zeros((0, *frame.fitted), dtype=bool)
    present = fitted.any(axis=(1, 2))
    if not present.any():
        return None
    objects = np.zeros(shape, dtype=bool)
    for sample in group:
        objects |= np.asarray(sample.object_mask, dtype=bool)
    classes = list(dict.fromkeys(s.object_class for s in group))
    return {"key": key, "path": group[0].path, **frame.as_record(),
            "part_masks": encode_rles(fitted[present]), "part_classes": ids[present],
            "object_ratio": float(objects.mean()), "class_index": class_index[classes[0]],
            "object_classes": classes}


def part_class_labels(record: Mapping[str, Any]) -> np.ndarray:
    """The semantic baseline's targets: each part's dataset part class id."""
    return np.asarray(record["part_classes"], dtype=np.int64)


class RecordList:
    """In-memory training records, read like a record store (``iter_records``, ``get``, ``in``)."""

    def __init__(self, records: Iterable[Mapping[str, Any]], name: str = "labelled records"):
        self.name = name
        self._by_key: dict[str, Mapping[str, Any]] = {}
        for record in records:
            if record["key"] in self._by_key:
                raise ValueError(f"{name}: two records have the key {record['key']!r}")
            self._by_key[record["key"]] = record

    def __len__(self) -> int:
        return len(self._by_key)

    def __contains__(self, key: str) -> bool:
        return key in self._by_key

    def __str__(self) -> str:
        return f"{self.name} ({len(self)} images)"

    def iter_records(self) -> Iterator[Mapping[str, Any]]:
        return iter(list(self._by_key.values()))

    def get(self, key: str) -> Mapping[str, Any]:
        return self._by_key[key]


def fewshot_subset(images: Mapping[str, Sequence[str]], percent: float, seed: int) -> list[str]:
    """The few-shot images: ``floor(N * percent / 100)`` (at least 1) of the N image keys of
    ``images`` (key -> the object classes it shows), returned sorted.

    Covers every object class first when the count allows (else as many as it allows):
    the classes in a seeded random order, each not yet covered gets one seeded random image
    showing it; the rest is a seeded random draw from the remaining images. A pure function
    of the sorted keys, their classes, ``percent`` and ``seed`` (numpy's PCG64 generator).
    """
    if not 0 < percent <= 100:
        raise ValueError(f"percent must be in (0, 100], got {percent}")
    keys = sorted(images)
    if not keys:
        raise ValueError("no labelled images to choose a few-shot subset from")
    count = min(len(keys), max(1, math.floor(len(keys) * percent / 100 + 1e-9)))
    rng = np.random.default_rng(int(seed))
    classes = sorted({c for k in keys for c in images[k]})
    chosen: list[str] = []
    covered: set[str] = set()
    for name in (classes[i] for i in rng.permutation(len(classes))):
        if len(chosen) == count:
            break
        if name in covered:
            continue
        showing = [k for k in keys if name in images[k] and k not in chosen]
        pick = showing[int(rng.integers(len(showing)))]
        chosen.append(pick)
        covered.update(images[pick])
    taken = set(chosen)
    rest = [k for k in keys if k not in taken]
    chosen += [rest[i] for i in rng.permutation(len(rest))[:count - len(chosen)]]
    return sorted(chosen)


__all__ = ["RecordList", "fewshot_subset", "image_key", "labelled_records", "part_class_labels"]
