"""Cityscapes-Part (Cityscapes Panoptic Parts) as the PartDistillation evaluation reads it.

On disk (the dataset's own release)::

    <root>/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    <root>/gtFinePanopticParts/<split>/<city>/<city>_<seq>_<frame>_gtFinePanopticParts.tif

Each label pixel is a *uid* of up to 7 decimal digits packing the Cityscapes semantic id,
the instance id and the part id (:func:`decode_uids`): ``23`` = class 23 only,
``23003`` = class 23 instance 3, ``2300304`` = class 23 instance 3 part 4 (one-digit
classes give 1, 4 and 6 digits). The dataset's own toolkit (``panoptic-parts`` 2.0rc6)
installs but fails to import on Python >= 3.10, so this small reader decodes the
documented encoding itself.

Samples are instances of human (person 24, rider 25) and vehicle (car 26, truck 27,
bus 28) classes that have at least one labelled part: the object mask is every pixel of
the instance, the parts are its pixels with part id > 0 (0 = unlabelled). Part classes
are per object class, as the reference numbers them (:data:`PART_CLASSES`, 23 classes).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
from PIL import Image

from part_distillation.data.part_sample import DatasetLayoutError, PartSample

PathLike = str | os.PathLike

#: Cityscapes semantic id -> object class, for the classes with parts.
OBJECT_CLASSES: dict[int, str] = {24: "person", 25: "rider", 26: "car", 27: "truck", 28: "bus"}
_HUMAN_PARTS = ("torso", "head", "arm", "leg")
_VEHICLE_PARTS = ("window", "wheel", "light", "license plate", "chassis")
#: Per object class, its part names in part-id order (part id 1 is the first).
PARTS_OF: dict[str, tuple[str, ...]] = {
    "person": _HUMAN_PARTS, "rider": _HUMAN_PARTS, "car": _VEHICLE_PARTS, "truck": _VEHICLE_PARTS,
    "bus": _VEHICLE_PARTS}
#: The 23 part classes ("person-torso", ...), object classes in semantic-id order.
PART_CLASSES: tuple[str, ...] = tuple(f"{o}-{p}" for o in OBJECT_CLASSES.values() for p in PARTS_OF[o])
#: Object class -> ImageNet synset (WordNet 3.0 offset); a rider is a person.
CITYSCAPES_TO_WNID: dict[str, str] = {"person": "n00007846", "rider": "n00007846", "car": "n02958343",
                                      "truck": "n04490091", "bus": "n02924116"}


def decode_uids(uids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(semantic id, instance id, part id) of each uid; -1 where a level is absent."""
    uids = np.asarray(uids, dtype=np.int64)
    if (uids < 0).any() or (uids > 9_999_999).any():
        raise ValueError("panoptic-parts uids must be in [0, 9999999]")
    sid = np.where(uids <= 99, uids, np.where(uids <= 99_999, uids // 1000, uids // 100_000))
    iid = np.where(uids <= 99, -1, np.where(uids <= 99_999, uids % 1000, (uids % 100_000) // 100))
    pid = np.where(uids <= 99_999, -1, uids % 100)
    return sid, iid, pid


class CityscapesPartDataset:
    """One split of Cityscapes-Part: an iterable of :class:`PartSample`, one per instance with parts."""

    def __init__(self, root: PathLike, split: str = "val", class_to_wnid: Mapping[str, str] = CITYSCAPES_TO_WNID):
        self.root = Path(root)
        self.labels_dir = self.root / "gtFinePanopticParts" / split
        self.images_dir = self.root / "leftImg8bit" / split
        if not self.labels_dir.is_dir():
            raise DatasetLayoutError(
                f"Cityscapes-Part: no folder {self.labels_dir}; expected <root>/gtFinePanopticParts/{split}/<city>/"
                f"*_gtFinePanopticParts.tif and <root>/leftImg8bit/{split}/<city>/*_leftImg8bit.png")
        self.label_files = sorted(self.labels_dir.glob("*/*_gtFinePanopticParts.tif"))
        self.class_to_wnid = dict(class_to_wnid)
        self.part_class_ids = {name: i for i, name in enumerate(PART_CLASSES)}

    def __iter__(self) -> Iterator[PartSample]:
        for label_file in self.label_files:
            yield from self.samples_of(label_file)

    def samples_of(self, label_file: Path) -> Iterator[PartSample]:
        try:
            uids = np.asarray(Image.open(label_file))
        except Exception as err:
            raise ValueError(f"{label_file}: not a panoptic-parts label image: {err}") from None
        sid, iid, pid = decode_uids(uids)
        stem = label_file.name[: -len("_gtFinePanopticParts.tif")]
        image = self.images_dir / label_file.parent.name / f"{stem}_leftImg8bit.png"
        for semantic_id, object_class in OBJECT_CLASSES.items():
            of_class = sid == semantic_id
            for instance in np.unique(iid[of_class]):
                if instance < 0:
                    continue  # class-level pixels without an instance
                object_mask = of_class & (iid == instance)
                part_ids, masks = [], []
                for part in np.unique(pid[object_mask]):
                    if part <= 0:
                        continue
                    if part > len(PARTS_OF[object_class]):
                        raise ValueError(f"{label_file}: part id {part} for a {object_class} "
                                         f"(known 1..{len(PARTS_OF[object_class])})")
                    part_ids.append(self.part_class_ids[f"{object_class}-{PARTS_OF[object_class][part - 1]}"])
                    masks.append(object_mask & (pid == part))
                if not masks:
                    continue
                yield PartSample(key=f"{stem}/{semantic_id}_{instance}", path=str(image), object_class=object_class,
                                 wnid=self.class_to_wnid.get(object_class), object_mask=object_mask,
                                 part_masks=np.stack(masks), part_ids=np.asarray(part_ids, np.int64))
