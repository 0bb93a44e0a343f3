"""Training samples from stage records (PART_SEGMENTS of stages 2/3, PART_LABELS of stage 5).

:class:`PartRecordDataset` lists the records of one or several record sets (the reference
trained on the union of two) that pass the load filters, and maps a sample id
``(epoch, index)`` to a training sample with :func:`map_record`, in the manner of
detectron2's ``DatasetMapper``: record -> ``{key, image, masks, labels}``. The
augmentation's random draws come from ``numpy.random.default_rng([seed, epoch, index])``
only, so workers hold no state and a resumed run sees the same samples
(``engine/sampler.py``). :func:`collate` batches samples for Mask2Former with the model
layer's normalisation and padding; targets are padded exactly like the input.

Load filters (docs/method.md#stage-4 and #stage-6): ``object_ratio`` > ``min_object_ratio``
(stage 4, strict) or >= (stage 6, ``inclusive=True``); for PART_LABELS parts whose
``part_ratios`` is below ``min_part_ratio`` are dropped at load. Both of a PART_LABELS
record's ratios are over the square canvas (stage 5 writes them as the reference does),
so "5%" means 5% of the 640² canvas, not of the object. Records left with no part are
not used.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from part_distillation.masks import decode_rles
from part_distillation.store import RecordStore
from part_distillation.store.errors import EmptyInputError

from .batching import preprocess_images
from .frame import ImageFrame
from .images import load_rgb
from .transforms import AugmentConfig, augment_with_retries, fit


@dataclass(frozen=True)
class RecordFilter:
    """Which records (and parts) are loaded for training."""

    min_object_ratio: float = 0.05
    inclusive: bool = False  # stage 4: object_ratio > min; stage 6: >= min
    min_part_ratio: float | None = None  # PART_LABELS: drop parts with part_ratios < min

    def keep_object(self, record: Mapping[str, Any]) -> bool:
        ratio = float(record["object_ratio"])
        return ratio >= self.min_object_ratio if self.inclusive else ratio > self.min_object_ratio

    def part_indices(self, record: Mapping[str, Any]) -> np.ndarray:
        n = len(record["part_masks"])
        if self.min_part_ratio is not None and "area_ratios" in record:
            raise ValueError(f"record {record.get('key')!r} has area_ratios (part / object area), written by an "
                             f"older part_ranking; stage 6 filters on part_ratios (part / canvas area): rerun "
                             f"part_ranking into a new stage.output")
        if self.min_part_ratio is None or "part_ratios" not in record:
            return np.arange(n)
        return np.flatnonzero(np.asarray(record["part_ratios"], dtype=np.float64) >= self.min_part_ratio)


def class_agnostic_labels(record: Mapping[str, Any]) -> np.ndarray:
    """Stage 4: every part is the one foreground class 0."""
    return np.zeros(len(record["part_masks"]), dtype=np.int64)


def cluster_labels(record: Mapping[str, Any]) -> np.ndarray:
    """Stage 6: a part's class is its cluster id within the object class (0..K-1)."""
    return np.asarray(record["cluster_ids"], dtype=np.int64)


def map_record(record: Mapping[str, Any], rng: np.random.Generator, augment: AugmentConfig,
               labels: np.ndarray, parts: np.ndarray | None = None,
               image: np.ndarray | None = None) -> dict[str, Any]:
    """One record -> ``{key, image (3, S, S) uint8, masks (N, S, S) bool, labels (N,) int64,
    class_index, weak}`` with S = ``augment.size``.

    ``parts`` selects the parts to use (load filter); ``image`` is the decoded original
    image (read from ``record["path"]`` when not given).
    """
    frame = ImageFrame.from_record(record)
    if image is None:
        image = load_rgb(record["path"])
    if tuple(image.shape[:2]) != frame.original:
        raise ValueError(f"{record['path']}: decoded size {image.shape[:2]} differs from the record's "
                         f"original_size {frame.original} (record {record.get('key')!r})")
    parts = np.arange(len(record["part_masks"])) if parts is None else parts
    masks = decode_rles([record["part_masks"][i] for i in parts], frame.fitted)
    if masks.shape[1:] != frame.fitted:
        raise ValueError(f"record {record.get('key')!r}: part masks are {masks.shape[1:]}, "
                         f"expected the fitted size {frame.fitted}")
    fitted_image, fitted_masks = fit(frame.fit_image(image), masks, augment.size)
    out = augment_with_retries(fitted_image, fitted_masks, rng, augment)
    return {
        "key": record["key"],
        "image": torch.from_numpy(np.ascontiguousarray(out.image)).permute(2, 0, 1).contiguous(),
        "masks": torch.from_numpy(np.ascontiguousarray(out.masks)),
        "labels": torch.from_numpy(np.asarray(labels)[parts][out.kept].astype(np.int64)),
        "class_index": int(record["class_index"]),
        "weak": out.weak,
    }


@dataclass
class PartRecordDataset(torch.utils.data.Dataset):
    """The training records of ``inputs`` (record-store folders, or in-memory record sources
    with ``iter_records()``, ``get(key)`` and ``key in source``, e.g.
    ``data.labelled_records.RecordList``), indexed 0..len-1.

    ``dataset[(epoch, index)]`` is the mapped sample; its augmentation depends only on
    ``(seed, epoch, index)``.
    """

    inputs: Sequence[str | os.PathLike]
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    filter: RecordFilter = field(default_factory=RecordFilter)
    labels: Callable[[Mapping[str, Any]], np.ndarray] = class_agnostic_labels
    seed: int = 0

    def __post_init__(self):
        if not self.inputs:
            raise ValueError("no training record sets given (stage.input)")
        self.stores = [path if hasattr(path, "iter_records") else RecordStore(path) for path in self.inputs]
        self.entries: list[tuple[int, str]] = []
        self.filtered_out = 0
        for store_index, store in enumerate(self.stores):
            for record in store.iter_records():
                try:
                    parts = self.filter.part_indices(record)
                except ValueError as err:
                    raise ValueError(f"{getattr(store, 'path', store)}: {err}") from None
                if self.filter.keep_object(record) and len(parts):
                    self.entries.append((store_index, record["key"]))
                else:
                    self.filtered_out += 1
        for store in self.stores:  # build each store's key index here, once, before workers fork
            _ = "" in store  # a key lookup builds the index
        if not self.entries:
            raise EmptyInputError(
                f"no training record passes the filters in {[str(p) for p in self.inputs]} "
                f"({self.filtered_out} filtered out: object_ratio / part ratio too small); check that the "
                f"previous stage wrote parts, or lower stage.min_object_area_ratio / stage.min_part_area_ratio")

    def __len__(self) -> int:
        return len(self.entries)

    def record(self, index: int) -> dict:
        store_index, key = self.entries[index]
        return self.stores[store_index].get(key)

    def __getitem__(self, sample_id: tuple[int, int]) -> dict[str, Any]:
        epoch, index = sample_id
        record = self.record(index)
        rng = np.random.default_rng([int(self.seed), int(epoch), int(index)])
        return map_record(record, rng, self.augment, self.labels(record), self.filter.part_indices(record))


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Samples -> ``{keys, pixel_values (B, 3, H, W) float32 normalised and zero-padded to a
    multiple of 32, image_sizes, targets: [{labels (N,) int64, masks (N, H, W) float32}],
    class_indices (B,) int64, images: the uint8 images}``; masks padded with 0 to (H, W)."""
    batch = preprocess_images([s["image"] for s in samples])
    height, width = batch.padded_size
    targets = []
    for s in samples:
        masks = s["masks"].float()
        padded = masks.new_zeros((masks.shape[0], height, width))
        padded[:, :masks.shape[1], :masks.shape[2]] = masks
        targets.append({"labels": s["labels"], "masks": padded})
    return {"keys": [s["key"] for s in samples], "pixel_values": batch.pixel_values,
            "image_sizes": batch.image_sizes, "targets": targets,
            "class_indices": torch.tensor([s["class_index"] for s in samples], dtype=torch.int64),
            "images": [s["image"] for s in samples]}


__all__ = ["PartRecordDataset", "RecordFilter", "class_agnostic_labels", "cluster_labels", "collate",
           "map_record"]
