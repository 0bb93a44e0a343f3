"""Export a stage output as one COCO instance-segmentation json, streaming.

Written to a file, the json is produced in two passes over the records (images and
categories first, then annotations), one record at a time: memory does not grow with
the number of annotations. Without a file the whole dict is returned (small outputs).

Stages 1-3 store masks in the fitted frame (longer side 640) while ``file_name`` names
the original image; a COCO tool overlays masks on that file, so they are exported in the
original frame by default (brought back with ``ImageFrame.from_record``). The fitted frame
is exported only on request (``frame="fitted"``), and then every image entry gives that
frame's ``height``/``width``, ``"frame": "fitted"`` and the original size beside it.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

from part_distillation.masks import decode_rles, encode_rles, resize_masks_nearest, rle_area, rle_to_bbox
from part_distillation.store.errors import StoreError
from part_distillation.store.files import atomic_open
from part_distillation.store.reader import RecordStore, check_store
from part_distillation.store.schemas import STAGE_RECORDS

logger = logging.getLogger("part_distillation.store")

_CATEGORY_FIELDS = ("category_ids", "classes")
#: The frames an export can be written in.
FRAMES = ("original", "fitted")


def _image_size(record: dict) -> tuple[int, int]:
    """[h, w] of the frame of the record's masks."""
    if "height" in record and "width" in record:
        return int(record["height"]), int(record["width"])
    for field in ("fitted_size", "image_size"):
        if record.get(field) is not None:
            h, w = record[field][:2]
            return int(h), int(w)
    masks = record.get("masks") or record.get("part_masks") or []
    if masks:
        h, w = masks[0]["size"]
        return int(h), int(w)
    raise StoreError(f"record {record['key']!r} has no height/width, fitted_size, image_size or masks")


def _record_frame(record: dict) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """The record's ``(original, fitted)`` sizes when it was written in the fitted frame
    (``data/frame.py``: ``original_size`` and ``fitted_size``), else None: its masks are then in
    the frame of its ``height``/``width`` (e.g. predict's, at the image's size)."""
    if record.get("original_size") is None or record.get("fitted_size") is None:
        return None
    return tuple(record["original_size"][:2]), tuple(record["fitted_size"][:2])


def _decoded(record: dict) -> bool:
    """False for an image that did not decode (``ok`` false, or a 0 height/width)."""
    if record.get("ok") is False:
        return False
    h, w = _image_size(record)
    return h > 0 and w > 0


def _category_table(categories) -> tuple[list[dict], dict[str, int]]:
    if categories is None:
        return [], {}
    if isinstance(categories, Mapping):
        cats = [{"id": int(i), "name": str(n)} for i, n in categories.items()]
    else:
        cats = [dict(c) if isinstance(c, Mapping) else {"id": i + 1, "name": str(c)}
                for i, c in enumerate(categories)]
    return cats, {c["name"]: c["id"] for c in cats}


def coco_results(annotations: Iterable[dict]) -> list[dict]:
    """Annotations as a COCO *results* list (image_id, category_id, segmentation, score).

    Give this to ``COCO.loadRes``: with a ``bbox`` present, loadRes takes the box branch
    and sets each area to the box area, which puts masks in the wrong COCOeval area range.
    """
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": a["segmentation"],
             "score": a.get("score", 1.0)} for a in annotations]


def _labels(rec: dict, n: int, category_field: str | None, default_category: str) -> list:
    field = category_field or next((f for f in _CATEGORY_FIELDS if f in rec), None)
    if field is None:
        return [default_category] * n
    value = rec[field]
    value = value.tolist() if isinstance(value, (np.ndarray, np.generic)) else value
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


class _Exporter:
    def __init__(self, store: RecordStore, shards, category_field, categories, default_category,
                 frame: str = "original"):
        if frame not in FRAMES:
            raise ValueError(f"frame must be one of {FRAMES}, got {frame!r}")
        self.store, self.shards, self.frame = store, shards, frame
        schema = STAGE_RECORDS.get(store.stage)  # the stage's declared fields; else the generic names
        self.masks_field = schema.masks_field if schema and schema.masks_field else "masks"
        self.score_field = schema.score_field if schema else "scores"
        if category_field is None and schema is not None:
            category_field = schema.label_field
        self.category_field, self.default_category = category_field, default_category
        self.cats, self.by_name = _category_table(categories)
        self.fixed = categories is not None
        self.left_out = 0

    def records(self) -> Iterator[tuple[int, dict]]:
        """``(image id, record)`` of the images that decoded, ids 1..N in store order."""
        image_id, self.left_out = 0, 0
        for rec in self.store.iter_records(self.shards):
            if not _decoded(rec):
                self.left_out += 1
                continue
            image_id += 1
            yield image_id, rec

    def images(self) -> Iterator[dict]:
        """Pass 1: the images; checks every record and collects the category values."""
        names: set[str] = set()
        ids: set[int] = set()
        for image_id, rec in self.records():
            h, w = _image_size(rec)
            masks = list(rec.get(self.masks_field) or [])
            for m in masks:
                if [int(s) for s in m["size"]] != [h, w]:
                    raise StoreError(f"record {rec['key']!r}: mask size {m['size']} != image size {[h, w]}")
            n = len(masks)
            labels = _labels(rec, n, self.category_field, self.default_category) if n else []
            n_scores = len(np.asarray(rec[self.score_field]).reshape(-1)) if self.score_field in rec else n
            if n and (n_scores != n or len(labels) != n):
                raise StoreError(f"record {rec['key']!r}: {n} masks but {n_scores} scores and "
                                 f"{len(labels)} categories")
            for label in labels:
                if isinstance(label, str):
                    if self.fixed and label not in self.by_name:
                        raise StoreError(f"record {rec['key']!r}: category {label!r} is not in the given categories")
                    names.add(label)
                else:
                    ids.add(int(label))
            yield {"id": image_id, "file_name": str(rec.get("file_name") or rec.get("path") or rec["key"]),
                   **self._frame_fields(rec)}
        if names and ids:
            raise StoreError("category values mix ids (int) and names (str)")
        if not self.fixed:
            if names:
                self.cats = [{"id": i, "name": n} for i, n in enumerate(sorted(names), start=1)]
                self.by_name = {c["name"]: c["id"] for c in self.cats}
            else:
                self.cats = [{"id": i, "name": str(i)} for i in sorted(ids)]

    def _frame_fields(self, rec: dict) -> dict:
        """``height``/``width`` of the exported frame and which frame it is."""
        frame = _record_frame(rec)
        if frame is None:
            if self.frame == "fitted":
                raise StoreError(f"record {rec['key']!r} has no fitted frame (no original_size/fitted_size): "
                                 f"its masks are at the image's size; export it in the original frame")
            h, w = _image_size(rec)
            return {"height": h, "width": w, "frame": "original"}
        original, fitted = frame
        if self.frame == "fitted":
            return {"height": fitted[0], "width": fitted[1], "frame": "fitted",
                    "original_height": original[0], "original_width": original[1]}
        return {"height": original[0], "width": original[1], "frame": "original"}

    def _masks(self, rec: dict, masks: list[dict]) -> tuple[list[dict], tuple[int, int]]:
        """The record's masks in the exported frame, and that frame's (h, w)."""
        frame = _record_frame(rec)
        if frame is None or self.frame == "fitted":
            return masks, _image_size(rec)
        original, fitted = (tuple(int(v) for v in size) for size in frame)
        decoded = decode_rles(masks, size=_image_size(rec))  # fitted frame -> original: ImageFrame's rule
        if tuple(decoded.shape[-2:]) != fitted:
            raise StoreError(f"record {rec['key']!r}: masks of size {tuple(decoded.shape[-2:])} are not in its "
                             f"fitted frame {fitted}")
        return encode_rles(resize_masks_nearest(decoded, original)), original

    def annotations(self) -> Iterator[dict]:
        """Pass 2: the annotations (after :meth:`images`, which fixes the categories)."""
        ann_id = 0
        for image_id, rec in self.records():
            masks = list(rec.get(self.masks_field) or [])
            if not masks:
                continue
            masks, (h, w) = self._masks(rec, masks)
            n = len(masks)
            scores = (np.asarray(rec[self.score_field], dtype=np.float64).reshape(-1) if self.score_field in rec
                      else np.ones(n))
            labels = _labels(rec, n, self.category_field, self.default_category)
            areas, boxes = rle_area(masks), rle_to_bbox(masks)
            for m, s, label, area, box in zip(masks, scores, labels, areas, boxes):
                ann_id += 1
                cat_id = self.by_name[label] if isinstance(label, str) else int(label)
                yield {"id": ann_id, "image_id": image_id, "category_id": cat_id,
                       "segmentation": {"size": [h, w], "counts": m["counts"]},
                       "area": float(area), "bbox": [float(x) for x in box], "iscrowd": 0, "score": float(s)}

    def info(self) -> dict:
        return {"description": f"records of stage {self.store.stage} from {self.store.path}",
                "frame": self.frame,
                "config_fingerprint": self.store.manifest.get("config_fingerprint"),
                "code_version": self.store.manifest.get("code_version"),
                "images_left_out_not_decoded": self.left_out}


def _write_list(f, items: Iterable[dict]) -> int:
    n = 0
    for item in items:
        f.write((",\n" if n else "\n") + json.dumps(item))
        n += 1
    f.write("\n]")
    return n


def export_coco(store: RecordStore | str | os.PathLike, out_path: str | os.PathLike | None = None, *,
                category_field: str | None = None, categories=None, default_category: str = "object",
                shards: Iterable[int] | None = None, frame: str = "original") -> dict:
    """Write a stage output's records as one COCO instance-segmentation json.

    Returns the whole COCO dict when ``out_path`` is None; otherwise streams the file
    (annotations never all in memory) and returns ``{"path", "images", "annotations",
    "categories", "images_left_out"}`` with the counts and the category list.

    Record fields are read by the stage's record schema (``store/schemas.py``
    ``STAGE_RECORDS``: its ``masks_field``, ``label_field``, ``score_field``); a store of a
    stage without one is read by the generic names below.

    Record fields read:
      - ``file_name`` (else ``path``, else the key) and ``height``/``width`` (else
        ``fitted_size`` or ``image_size`` = [h, w], the frame of the masks, else the size
        of the first mask) -> one image each, with ids 1..N in store order. Images that
        did not decode (``ok`` false, or a 0 height or width) are left out and counted;
      - ``masks``: list of COCO RLE dicts -> one annotation each, with bbox and area
        computed from the RLE and ``iscrowd`` 0;
      - ``scores``: one per mask (default 1.0);
      - the category: ``record[category_field]`` (default: the first present of
        ``category_ids``, ``classes``), either one value per mask or one value for the
        whole image. Ints are category ids; strings are category names. Without a field
        every mask gets ``default_category``.

    ``frame``: ``"original"`` (default) exports the masks of a record written in the fitted
    frame (``original_size`` and ``fitted_size``) at the original image's size, which
    ``file_name`` names; ``"fitted"`` exports them as stored, each image entry then giving
    the fitted ``height``/``width``, ``"frame": "fitted"`` and ``original_height``/
    ``original_width``. Every image entry and ``info`` say which frame (``"frame"``).

    ``categories`` fixes the category list: a list of ``{"id", "name"}`` dicts, a list
    of names (ids 1..n) or a dict id -> name. Otherwise it is built from the values seen
    (names get ids 1..n in sorted order).
    """
    ex = _Exporter(check_store(store), shards, category_field, categories, default_category, frame)
    if out_path is None:
        images = list(ex.images())
        return {"info": ex.info(), "images": images, "annotations": list(ex.annotations()), "categories": ex.cats}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out_path, "w", encoding="utf-8") as f:
        f.write('{"images": [')
        n_images = _write_list(f, ex.images())
        f.write(',\n"annotations": [')
        n_anns = _write_list(f, ex.annotations())
        f.write(f',\n"categories": {json.dumps(ex.cats)},\n"info": {json.dumps(ex.info())}}}\n')
    logger.info("wrote %s: %d images, %d annotations (%d images left out: not decoded)",
                out_path, n_images, n_anns, ex.left_out)
    return {"path": str(out_path), "images": n_images, "annotations": n_anns, "categories": ex.cats,
            "images_left_out": ex.left_out}
