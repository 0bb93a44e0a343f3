"""Object masks given with a dataset, read from a COCO-style json.

Two kinds of file are read:
- an object file (the synthetic dataset's ``annotations/objects_<split>.json``, any COCO
  instance json): every annotation is one object, its category names the class;
- a part file (PartImageNet's json, ``parts=True``): the object is the union of the image's
  part masks; its class is the image's ImageNet class (its wnid: the image's ``wnid`` key,
  else the ``n01234567_`` prefix of its file name, else the image's folder in the tree), as
  the evaluator keys it. The parts' ``supercategory`` (Quadruped, ...) is kept as the name
  only: several ImageNet classes share one, so it never names the class.

Images are matched to a tree's keys (``<wnid>/<file>``) by ``file_name``, or by the bare
file name when the json stores only that (PartImageNet). Masks stay RLEs, in the frame of
the json's image size, until a caller decodes them.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from pycocotools import mask as _coco

from part_distillation.data.partimagenet import segmentation_rle, wnid_from_file_name

_WNID = re.compile(r"^n\d{8}$")


@dataclass(frozen=True)
class AnnotatedObjects:
    """The given objects of one image."""

    size: tuple[int, int]  #: (h, w) of the image the masks were drawn on
    rles: tuple[dict, ...]  #: one COCO RLE per object
    names: tuple[str, ...]  #: category name per object (the object class)
    wnids: tuple[str | None, ...]  #: WordNet id per object, when the category (or image) gives one
    #: the one object is the whole image's (a part file): its class is the image's wnid, taken
    #: from the tree key when the json gives none
    whole_image: bool = False


class ObjectAnnotations:
    """Given object masks by image, looked up by tree key (``<wnid>/<file>``) or file name."""

    def __init__(self, by_file: Mapping[str, AnnotatedObjects], source: str = "annotations"):
        self.source = source
        self._by_file = dict(by_file)
        self._by_basename = {os.path.basename(k): v for k, v in self._by_file.items()}

    def __len__(self) -> int:
        return len(self._by_file)

    def get(self, key: str) -> AnnotatedObjects | None:
        found = self._by_file.get(key)
        return found if found is not None else self._by_basename.get(os.path.basename(key))


def wnid_of_key(key: str) -> str | None:
    """The ImageNet class of an image from its key or path: the ``n01234567_`` prefix of the
    file name, else the nearest folder named like a wnid; None when neither is there."""
    found = wnid_from_file_name(key)
    if found is not None:
        return found
    folders = str(key).replace("\\", "/").split("/")[:-1]
    return next((part for part in reversed(folders) if _WNID.match(part)), None)


def read_object_annotations(path: str | os.PathLike, parts: bool = False) -> ObjectAnnotations:
    """Read a COCO json of objects (``parts=False``) or of parts whose union is the object."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"object annotation file {path} not found (stage.annotations)")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"{path} is not a COCO json (needs 'images' and 'annotations')")
    categories = {int(c["id"]): c for c in data.get("categories", [])}
    images = {int(im["id"]): im for im in data["images"]}
    per_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        per_image.setdefault(int(ann["image_id"]), []).append(ann)
    by_file: dict[str, AnnotatedObjects] = {}
    for image_id, anns in per_image.items():
        image = images.get(image_id)
        if image is None:
            raise ValueError(f"{path}: annotation of unknown image id {image_id}")
        h, w = int(image["height"]), int(image["width"])
        rles = [segmentation_rle(a["segmentation"], h, w) for a in anns]
        rles = [_coco.frPyObjects(r, h, w) if isinstance(r.get("counts"), list) else r for r in rles]
        cats = [categories.get(int(a["category_id"]), {}) for a in anns]
        if parts:  # one object: the union of the parts, of the image's class (its wnid)
            merged = _coco.merge([_as_bytes(r) for r in rles])
            first = cats[0] if cats else {}
            name = str(first.get("supercategory") or first.get("name", "")).strip()
            wnid = image.get("wnid") or wnid_of_key(str(image["file_name"]))
            objects = AnnotatedObjects((h, w), (_as_text(merged),), (name,), (wnid,), whole_image=True)
        else:
            objects = AnnotatedObjects((h, w), tuple(_as_text(_as_bytes(r)) for r in rles),
                                       tuple(str(c.get("name", "")) for c in cats),
                                       tuple(c.get("wnid") for c in cats))
        by_file[str(image["file_name"])] = objects
    return ObjectAnnotations(by_file, source=str(path))


def _as_bytes(rle: dict) -> dict:
    counts = rle["counts"]
    return {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def _as_text(rle: dict) -> dict:
    counts = rle["counts"]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}
