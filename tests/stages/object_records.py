"""Stage-1 records for tests of later stages, written from the synthetic dataset's object json.

``write_object_records`` turns ``annotations/objects_<split>.json`` (one true object mask
per image, made by ``data/synthetic.py``) into an ``OBJECT_MASKS`` output exactly as an
object-mask source would write it: masks and boxes in the fitted frame, both sizes
recorded, score 1.0, the image's own class predicted.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from part_distillation.data.frame import ImageFrame
from part_distillation.data.imagenet import list_image_tree
from part_distillation.masks import decode_rle, encode_rle
from part_distillation.store import RecordStore, ShardWriter
from part_distillation.store.schemas import OBJECT_MASKS


def write_object_records(data_root: str | Path, output: str | Path, split: str = "train",
                         num_shards: int = 1, fit_size: int = 640) -> RecordStore:
    """An OBJECT_MASKS store at ``output`` from the synthetic dataset at ``data_root``."""
    data_root = Path(data_root)
    tree = list_image_tree(data_root, split=split)
    by_key = {ref.key: ref for ref in tree.images}
    objects = json.loads((data_root / "annotations" / f"objects_{split}.json").read_text())
    anns = {a["image_id"]: a for a in objects["annotations"]}
    writers = [ShardWriter(output, i, num_shards, stage="detic_labeling", config={"source": "annotations"},
                           schema=OBJECT_MASKS) for i in range(num_shards)]
    try:
        for n, image in enumerate(sorted(objects["images"], key=lambda im: im["file_name"])):
            ref = by_key[image["file_name"]]
            frame = ImageFrame.fit((image["height"], image["width"]), size=fit_size)
            mask = frame.masks_to_fitted(decode_rle(anns[image["id"]]["segmentation"]))
            ys, xs = np.nonzero(mask)
            writers[n % num_shards].write({
                "key": ref.key, "path": ref.path, "wnid": ref.wnid, "class_index": ref.class_index,
                "class_name": tree.names[ref.class_index], **frame.as_record(), "source": "annotations",
                "masks": [encode_rle(mask)],
                "boxes": np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=np.float64),
                "scores": np.array([1.0]), "pred_classes": np.array([ref.class_index]),
                "pred_class_names": [tree.names[ref.class_index]],
            })
    finally:
        for writer in writers:
            writer.close()
    return RecordStore(output)
