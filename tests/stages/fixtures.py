"""Stage-2 records written by hand, for the tests of stage 3 (and the collage tool).

Part segments come from the synthetic dataset's true parts (``annotations/<split>.json``
made by ``data/synthetic.py``), degraded like stage 2's output so the CRF has work:
the label map sampled on a coarse grid (stride ``coarse``) and shifted by ``shift``
pixels, kept inside the object. Part ids are the part's index in its class + 1.

Also a command line, so a test can write the input from another process while stage 3
follows it: ``python -m tests.stages.fixtures <dataset> <split> <store> --delay S``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from part_distillation.data.frame import ImageFrame
from part_distillation.data.images import load_rgb
from part_distillation.masks import decode_rle, encode_rle, encode_rles
from part_distillation.store import ShardWriter

STAGE2_CONFIG = {"stage": {"name": "pixel_grouping", "made_by": "tests.stages.fixtures"}}


def true_part_labels(dataset: Path, split: str = "train") -> Iterator[dict]:
    """Per image: path, wnid, class index and name, original size, true labels (H, W) int
    (0 = background, part index within the class + 1) in the original frame."""
    parts = json.loads((dataset / "annotations" / f"{split}.json").read_text())
    names = [line.split("\t")[1].strip() for line in (dataset / "words.txt").read_text().splitlines()]
    wnids = [line.split("\t")[0] for line in (dataset / "words.txt").read_text().splitlines()]
    categories = {c["id"]: c for c in parts["categories"]}
    first_part = {}
    for c in parts["categories"]:
        first_part.setdefault(c["wnid"], c["id"])
    by_image: dict[int, list] = {}
    for ann in parts["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    for image in parts["images"]:
        labels = np.zeros((image["height"], image["width"]), dtype=np.int64)
        for ann in by_image.get(image["id"], []):
            category = categories[ann["category_id"]]
            labels[decode_rle(ann["segmentation"])] = ann["category_id"] - first_part[category["wnid"]] + 1
        class_index = wnids.index(image["wnid"])
        yield {"key": image["file_name"], "path": str(dataset / split / image["file_name"]),
               "wnid": image["wnid"], "class_index": class_index, "class_name": names[class_index],
               "labels": labels}


def degrade(labels: np.ndarray, coarse: int = 8, shift: int = 3) -> np.ndarray:
    """Stage-2-like labels: nearest samples on a ``coarse`` grid, shifted by ``shift`` (y and x),
    restricted to the object (labels > 0)."""
    h, w = labels.shape
    rows = np.minimum((np.arange(h) // coarse) * coarse + coarse // 2, h - 1)
    cols = np.minimum((np.arange(w) // coarse) * coarse + coarse // 2, w - 1)
    blocky = labels[rows[:, None], cols[None, :]]
    shifted = np.roll(blocky, (shift, shift), axis=(0, 1))
    return np.where(labels > 0, shifted, 0)


def part_segments_record(item: dict, labels: np.ndarray, fit_size: int, part_ids=None) -> dict:
    """A PART_SEGMENTS record of one image from its labels (original frame)."""
    frame = ImageFrame.fit(item["labels"].shape, size=fit_size)
    ids = sorted(int(i) for i in np.unique(labels) if i > 0) if part_ids is None else list(part_ids)
    masks = frame.masks_to_fitted(np.stack([labels == i for i in ids])) if ids else np.zeros((0, *frame.fitted), bool)
    obj = frame.masks_to_fitted(item["labels"][None] > 0)[0]
    return {"key": item["key"], "path": item["path"], "wnid": item["wnid"], "class_index": item["class_index"],
            "class_name": item["class_name"], **frame.as_record(), "object_mask": encode_rle(obj),
            "object_score": 1.0, "object_ratio": float(obj.mean()), "part_masks": encode_rles(masks),
            "part_ids": np.asarray(ids, dtype=np.int64)}


def write_stage2(dataset: Path, store: Path, split: str = "train", fit_size: int = 128, coarse: int = 8,
                 shift: int = 3, num_shards: int = 1, limit: int | None = None, delay: float = 0.0,
                 pause_after: int | None = None, resume_when: Path | None = None,
                 close_when: Path | None = None) -> list[str]:
    """Write degraded part segments of the dataset as a stage-2 output; returns the keys.

    Records go to shard ``i % num_shards``, ``delay`` seconds apart. To test readers that
    follow a growing output: after ``pause_after`` records wait until the file
    ``resume_when`` exists, and keep the shards open until ``close_when`` exists.
    """
    writers = [ShardWriter(store, i, num_shards, stage="pixel_grouping", config=STAGE2_CONFIG,
                           code_version="test") for i in range(num_shards)]
    keys = []
    try:
        for n, item in enumerate(true_part_labels(dataset, split)):
            if limit is not None and n >= limit:
                break
            if n == pause_after and resume_when is not None:
                _wait_for_file(resume_when)
            record = part_segments_record(item, degrade(item["labels"], coarse, shift), fit_size)
            writers[n % num_shards].write(record)
            keys.append(record["key"])
            time.sleep(delay)
        if close_when is not None:
            _wait_for_file(close_when)
    finally:
        for w in writers:
            w.close()
    return keys


def _wait_for_file(path: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


def fitted_image(record: dict) -> np.ndarray:
    """The record's image in its fitted frame."""
    return ImageFrame.from_record(record).fit_image(load_rgb(record["path"]))


def main() -> None:
    parser = argparse.ArgumentParser(description="write degraded stage-2 records of a synthetic dataset")
    parser.add_argument("dataset", type=Path)
    parser.add_argument("split")
    parser.add_argument("store", type=Path)
    parser.add_argument("--fit-size", type=int, default=128)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--pause-after", type=int, default=None)
    parser.add_argument("--resume-when", type=Path, default=None)
    parser.add_argument("--close-when", type=Path, default=None)
    args = parser.parse_args()
    write_stage2(args.dataset, args.store, args.split, fit_size=args.fit_size, num_shards=args.shards,
                 delay=args.delay, pause_after=args.pause_after, resume_when=args.resume_when,
                 close_when=args.close_when)


if __name__ == "__main__":
    main()
