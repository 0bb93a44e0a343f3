"""Reader for PartImageNet-style COCO json: images, part categories, part and object masks.

PartImageNet names each part category "<Object> <Part>" with ``supercategory`` the
object class (Quadruped, Biped, ...); each image shows one object, whose class is the
supercategory of its parts. Evaluation needs, per image, the ground-truth part masks
with their categories and the object mask (given at test time). Masks are decoded only
when asked for: the json of a split holds tens of thousands of them.

Segmentations may be polygons (as PartImageNet ships them), uncompressed or compressed
RLE. The object mask comes from a separate COCO object file when one is given (as the
synthetic generator writes, matched by ``file_name``), else it is the union of the
image's part masks.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from pycocotools import mask as _coco

from part_distillation.data.images import load_rgb
from part_distillation.data.part_sample import PartSample, merge_by_part_class
from part_distillation.masks import decode_rle, decode_rles

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
_WNID_PREFIX = re.compile(r"^(n\d{8})_")


@dataclass(frozen=True)
class PartCategory:
    id: int
    name: str            #: full category name, e.g. "Quadruped Head"
    part: str            #: the part alone, e.g. "Head"
    object_class: str    #: the supercategory, e.g. "Quadruped"


@dataclass(frozen=True)
class PartImage:
    id: int
    file_name: str
    path: str            #: resolved against the image root
    width: int
    height: int
    object_class: str | None  #: supercategory of its parts; None when it has none annotated
    wnid: str | None          #: ImageNet class, from a ``wnid`` key or the file name


@dataclass(frozen=True)
class PartMasks:
    """Ground-truth parts of one image."""

    masks: np.ndarray         #: bool (N, H, W)
    category_ids: np.ndarray  #: int64 (N,)


class PartImageNetDataset:
    """One split of a PartImageNet-style dataset, read from its COCO json."""

    def __init__(self, annotation_file: PathLike | Sequence[PathLike], image_root: PathLike,
                 objects_file: PathLike | None = None):
        files = [annotation_file] if isinstance(annotation_file, (str, os.PathLike)) else list(annotation_file)
        self.annotation_file = Path(files[0])
        self.image_root = Path(image_root)
        data = _concatenate([_read_json(Path(f)) for f in files], files)

        self.categories: tuple[PartCategory, ...] = tuple(_part_category(c) for c in data.get("categories", []))
        self._category_by_id = {c.id: c for c in self.categories}
        if len(self._category_by_id) != len(self.categories):
            raise ValueError(f"{annotation_file}: duplicate category ids")
        #: object classes in order of first appearance among the categories
        self.object_classes: tuple[str, ...] = tuple(dict.fromkeys(c.object_class for c in self.categories))

        self._annotations: dict[int, list[dict]] = {}
        for ann in data.get("annotations", []):
            if ann.get("category_id") not in self._category_by_id:
                raise ValueError(f"{annotation_file}: annotation {ann.get('id')} has unknown category "
                                 f"{ann.get('category_id')}")
            self._annotations.setdefault(int(ann["image_id"]), []).append(ann)

        images = []
        for entry in data.get("images", []):
            image_id = int(entry["id"])
            classes = {self._category_by_id[a["category_id"]].object_class for a in self._annotations.get(image_id, [])}
            if len(classes) > 1:
                logger.warning("%s: image %s has parts of several object classes %s", annotation_file, image_id,
                               sorted(classes))
            file_name = str(entry["file_name"])
            images.append(PartImage(id=image_id, file_name=file_name, path=self._resolve(file_name),
                                    width=int(entry["width"]), height=int(entry["height"]),
                                    object_class=min(classes) if classes else None,
                                    wnid=entry.get("wnid") or wnid_from_file_name(file_name)))
        self.images: tuple[PartImage, ...] = tuple(images)
        self._image_by_id = {im.id: im for im in self.images}
        if len(self._image_by_id) != len(self.images):
            raise ValueError(f"{annotation_file}: duplicate image ids")
        unknown = set(self._annotations) - set(self._image_by_id)
        if unknown:
            raise ValueError(f"{annotation_file}: annotations refer to {len(unknown)} unknown image ids")

        self._object_segmentations: dict[int, list] | None = None
        if objects_file is not None:
            self._object_segmentations = _object_segmentations(Path(objects_file), self._image_by_id.values())

    # -------------------------------------------------------------------- lookups
    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> PartImage:
        return self.images[index]

    def __iter__(self) -> Iterator[PartImage]:
        return iter(self.images)

    def image(self, image_id: int) -> PartImage:
        return self._image_by_id[image_id]

    def category(self, category_id: int) -> PartCategory:
        return self._category_by_id[category_id]

    def parts_of(self, object_class: str) -> tuple[PartCategory, ...]:
        """Part categories of one object class, in json order."""
        return tuple(c for c in self.categories if c.object_class == object_class)

    def annotations(self, image_id: int) -> list[dict]:
        """The raw part annotations of an image (segmentation not decoded)."""
        return list(self._annotations.get(image_id, []))

    # -------------------------------------------------------------------- pixels
    def load_image(self, image_id: int, **load_kwargs) -> np.ndarray:
        """The image as uint8 RGB, through the project's decoder (``load_rgb`` keywords pass on)."""
        return load_rgb(self.image(image_id).path, **load_kwargs)

    def part_masks(self, image_id: int) -> PartMasks:
        """Decode the part masks of one image, at the size the json gives it."""
        image = self.image(image_id)
        anns = self._annotations.get(image_id, [])
        rles = [segmentation_rle(a["segmentation"], image.height, image.width) for a in anns]
        masks = decode_rles(rles, size=(image.height, image.width))
        return PartMasks(masks=masks, category_ids=np.asarray([a["category_id"] for a in anns], dtype=np.int64))

    def object_mask(self, image_id: int) -> np.ndarray:
        """The object's mask: from the objects file if given, else the union of its parts."""
        image = self.image(image_id)
        if self._object_segmentations is not None:
            segmentations = self._object_segmentations.get(image_id, [])
            if not segmentations:
                logger.warning("no object mask for image %s (%s) in the objects file", image_id, image.file_name)
            masks = [decode_rle(segmentation_rle(s, image.height, image.width)) for s in segmentations]
        else:
            masks = list(self.part_masks(image_id).masks)
        out = np.zeros((image.height, image.width), dtype=bool)
        for mask in masks:
            out |= mask
        return out

    def samples(self) -> Iterator[PartSample]:
        """Every image with parts as a :class:`PartSample` (parts merged per part category
        over the whole image, as the reference merges them for PartImageNet). Its object
        class is the image's ImageNet class (wnid; the super-category when the image has
        no wnid), as the reference keys the mIoU (``class_code_to_class_id[wnid]``); the
        super-category rides along as ``supercategory``."""
        for image in self.images:
            if image.object_class is None:
                continue
            parts = self.part_masks(image.id)
            masks, ids = merge_by_part_class(parts.masks, parts.category_ids, (image.height, image.width))
            yield PartSample(key=str(image.id), path=image.path, object_class=image.wnid or image.object_class,
                             wnid=image.wnid, object_mask=self.object_mask(image.id), part_masks=masks, part_ids=ids,
                             supercategory=image.object_class)

    def _resolve(self, file_name: str) -> str:
        """``root/file_name``; a bare ImageNet name falls back to ``root/<wnid>/file_name``."""
        direct = self.image_root / file_name
        wnid = wnid_from_file_name(file_name)
        if "/" not in file_name and wnid is not None and not direct.exists():
            return str(self.image_root / wnid / file_name)
        return str(direct)


def annotation_files(root: PathLike, split: str) -> list[Path]:
    """The json file(s) of a split under a PartImageNet root; ``valtest`` = val then test.

    Accepts the release's ``annotations/<split>/<split>.json`` and a flat
    ``annotations/<split>.json`` (as the synthetic dataset writes).
    """
    names = ["val", "test"] if split == "valtest" else [split]
    files = []
    for name in names:
        candidates = [Path(root) / "annotations" / name / f"{name}.json", Path(root) / "annotations" / f"{name}.json"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"PartImageNet: no annotation file for split {name!r} under {root}; expected "
                                    f"{candidates[0]} or {candidates[1]}")
        files.append(found)
    return files


def _concatenate(datasets: list[dict], files: list) -> dict:
    """One COCO dict from several of the same categories; image and annotation ids of later
    files are shifted past the earlier ones' so they never collide."""
    if len(datasets) == 1:
        return datasets[0]
    categories = datasets[0].get("categories", [])
    out = {"images": [], "annotations": [], "categories": categories}
    image_offset = ann_offset = 0
    for data, path in zip(datasets, files):
        if data.get("categories", []) != categories:
            raise ValueError(f"{path}: its categories differ from {files[0]}'s; cannot concatenate the splits")
        out["images"] += [{**im, "id": int(im["id"]) + image_offset} for im in data["images"]]
        out["annotations"] += [{**a, "id": int(a.get("id", 0)) + ann_offset, "image_id": int(a["image_id"]) + image_offset}
                               for a in data.get("annotations", [])]
        image_offset = max([int(im["id"]) for im in out["images"]], default=0) + 1
        ann_offset = max([int(a["id"]) for a in out["annotations"]], default=0) + 1
    return out


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or "images" not in data:
        raise ValueError(f"{path} is not a COCO json (no 'images')")
    return data


def _part_category(entry: dict) -> PartCategory:
    name = str(entry["name"])
    object_class = str(entry.get("supercategory") or name.split(" ", 1)[0])
    part = entry.get("part")
    if part is None:
        part = name[len(object_class):].strip() if name.startswith(object_class + " ") else name
    return PartCategory(id=int(entry["id"]), name=name, part=str(part), object_class=object_class)


def wnid_from_file_name(file_name: str) -> str | None:
    match = _WNID_PREFIX.match(os.path.basename(file_name))
    return match.group(1) if match else None


def _object_segmentations(path: Path, images) -> dict[int, list]:
    """Object segmentations keyed by the part file's image ids, matched through file names."""
    data = _read_json(path)
    id_by_name = {im.file_name: im.id for im in images}
    remap = {}
    for entry in data["images"]:
        if entry["file_name"] in id_by_name:
            remap[int(entry["id"])] = id_by_name[entry["file_name"]]
    out: dict[int, list] = {}
    for ann in data.get("annotations", []):
        image_id = remap.get(int(ann["image_id"]))
        if image_id is not None:
            out.setdefault(image_id, []).append(ann["segmentation"])
    missing = len(id_by_name) - len(out)
    if missing:
        logger.warning("%s: %d images of the part file have no object mask", path, missing)
    return out


def segmentation_rle(segmentation, height: int, width: int) -> dict:
    """Any COCO segmentation (polygons, uncompressed or compressed RLE) as one RLE."""
    if isinstance(segmentation, dict):
        return segmentation  # masks.decode_rle reads both RLE forms
    polygons = [p for p in segmentation if len(p) >= 6]  # fewer than 3 points cover nothing
    if not polygons:
        return _coco.encode(np.zeros((height, width, 1), dtype=np.uint8, order="F"))[0]
    return _coco.merge(_coco.frPyObjects(polygons, height, width))
