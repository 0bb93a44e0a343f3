"""Test fixtures: PART_SEGMENTS (stage 3) and PART_LABELS (stage 5) records written from the synthetic
dataset's true part masks, in the fitted frame, through the real store writer."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from part_distillation.data.frame import ImageFrame
from part_distillation.data.synthetic import make_synthetic_dataset
from part_distillation.masks import decode_rle, encode_rle, encode_rles
from part_distillation.store import ShardWriter
from part_distillation.stages.part_ranking import canvas_ratios
from part_distillation.store.schemas import PART_LABELS, PART_SEGMENTS


def _synthetic_parts(root, *, num_classes, images_per_class, size, fit_size, seed):
    """Generate a synthetic split under ``root``; yield per image its record fields common to
    PART_SEGMENTS and PART_LABELS, the fitted part masks (P, H, W) bool and each part's index
    within its class (0-based: one part category per (class, part))."""
    summary = make_synthetic_dataset(root, num_classes=num_classes, images_per_class=images_per_class,
                                     size=size, seed=seed, image_format="PNG")
    coco = json.loads(Path(summary.parts_json).read_text())
    categories = {c["id"]: c for c in coco["categories"]}
    by_image = defaultdict(list)
    for ann in coco["annotations"]:
        by_image[ann["image_id"]].append(ann)
    wnids = list(summary.wnids)
    for image in coco["images"]:
        anns = sorted(by_image[image["id"]], key=lambda a: a["category_id"])
        if not anns:
            continue
        frame = ImageFrame.fit((image["height"], image["width"]), size=fit_size)
        fitted = frame.masks_to_fitted(np.stack([decode_rle(a["segmentation"]) for a in anns]))
        obj = fitted.any(0)
        class_index = wnids.index(image["wnid"])
        first_category = min(c for c, cat in categories.items() if cat["wnid"] == image["wnid"])
        fields = {"key": image["file_name"], "path": str(Path(summary.image_dir) / image["file_name"]),
                  "wnid": image["wnid"], "class_index": class_index,
                  "class_name": summary.class_names[class_index], **frame.as_record(),
                  "object_mask": encode_rle(obj), "object_ratio": float(obj.sum() / obj.size)}
        yield fields, fitted, np.array([a["category_id"] - first_category for a in anns], dtype=np.int64)


def write_part_segments(root: str | Path, out: str | Path, *, num_classes: int = 2, images_per_class: int = 4,
                        size: int = 96, fit_size: int = 128, seed: int = 0) -> Path:
    """Generate a synthetic split under ``root`` and write its parts as PART_SEGMENTS under ``out``."""
    with ShardWriter(out, 0, 1, stage="dense_crf", config={"fixture": "synthetic", "seed": seed},
                     code_version="test", schema=PART_SEGMENTS) as writer:
        for fields, fitted, part_index in _synthetic_parts(root, num_classes=num_classes, size=size, seed=seed,
                                                           images_per_class=images_per_class, fit_size=fit_size):
            writer.write({**fields, "object_score": 1.0, "part_masks": encode_rles(fitted),
                          "part_ids": part_index + 1})
    return Path(out)


def write_part_labels(root: str | Path, out: str | Path, *, num_classes: int = 2, images_per_class: int = 4,
                      size: int = 96, fit_size: int = 128, seed: int = 0) -> Path:
    """Generate a synthetic split under ``root`` and write its parts as PART_LABELS (stage 5's
    output) under ``out``: a part's cluster id is its index within its object class."""
    with ShardWriter(out, 0, 1, stage="part_ranking", config={"fixture": "synthetic", "seed": seed},
                     code_version="test", schema=PART_LABELS) as writer:
        for fields, fitted, part_index in _synthetic_parts(root, num_classes=num_classes, size=size, seed=seed,
                                                           images_per_class=images_per_class, fit_size=fit_size):
            ratios = canvas_ratios(fitted, ImageFrame.from_record(fields))  # stage 5's denominators
            writer.write({**fields, **ratios, "part_masks": encode_rles(fitted), "cluster_ids": part_index,
                          "scores": np.ones(len(fitted))})
    return Path(out)
