"""Pascal-Part (Chen et al. 2014) on VOC 2012, as the PartDistillation evaluation reads it.

On disk (the dataset's own release, nothing converted)::

    <voc>/JPEGImages/<id>.jpg
    <voc>/ImageSets/Main/val.txt          one image id per line (the split list)
    <parts>/<id>.mat                      MATLAB struct ``anno`` with ``objects``: per object
                                          ``class``, ``class_ind``, ``mask``, ``parts``
                                          (per part ``part_name``, ``mask``)

Read with ``scipy.io.loadmat``. Each object with at least one part is one sample
(objects without parts are dropped, as in the reference). A part's raw name is the
prefix before ``_`` (``door_1`` -> ``door``) grouped into a base name with left/right
and the like dropped (``lfleg`` -> ``leg``), per object class, giving the reference's 50
part classes (:data:`PART_CLASSES`; ids are shared across object classes: "head" is one
class). ``table`` is renamed ``diningtable``.

Object classes map to ImageNet synsets with :data:`VOC_TO_WNID` (WordNet 3.0 offsets,
present in ImageNet-21k). The reference fed the VOC class index (0-19) straight into an
ImageNet head, which selects unrelated ImageNet classes; this reader gives the synset so
the caller can look up the model's own class index (pass another mapping for a model
trained on other classes, e.g. ImageNet-1k).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from part_distillation.data.part_sample import DatasetLayoutError, PartSample, merge_by_part_class

PathLike = str | os.PathLike

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")

#: VOC class -> ImageNet synset (WordNet 3.0 noun offset) of the same concept.
VOC_TO_WNID: dict[str, str] = {
    "aeroplane": "n02691156", "bicycle": "n02834778", "bird": "n01503061", "boat": "n02858304",
    "bottle": "n02876657", "bus": "n02924116", "car": "n02958343", "cat": "n02121808", "chair": "n03001627",
    "cow": "n01887787", "diningtable": "n03201208", "dog": "n02084071", "horse": "n02374451",
    "motorbike": "n03790512", "person": "n00007846", "pottedplant": "n03991062", "sheep": "n02411705",
    "sofa": "n04256520", "train": "n04468005", "tvmonitor": "n03211117",
}


def _parts(spec: str) -> dict[str, str]:
    """'raw:group raw ...' -> {raw: group}; a raw name without ':' is its own group."""
    out = {}
    for item in spec.split():
        raw, _, group = item.partition(":")
        out[raw] = group.replace("+", " ") or raw
    return out


_VEHICLE = _parts("frontside:front leftside:side rightside:side backside:back roofside:roof leftmirror:mirror "
                  "rightmirror:mirror fliplate:license+plate bliplate:license+plate door wheel headlight window")
_FELINE = _parts("head leye:eye reye:eye lear:ear rear:ear nose torso neck lfleg:leg lfpa:paw rfleg:leg "
                 "rfpa:paw lbleg:leg lbpa:paw rbleg:leg rbpa:paw tail")
_BOVINE = _parts("head leye:eye reye:eye lear:ear rear:ear muzzle lhorn:horn rhorn:horn torso neck "
                 "lfuleg:leg lflleg:leg rfuleg:leg rflleg:leg lbuleg:leg lblleg:leg rbuleg:leg rblleg:leg tail")

#: Per object class: raw part name (prefix before '_') -> part class (the reference's grouping).
PART_GROUPS: dict[str, dict[str, str]] = {
    "aeroplane": _parts("body stern lwing:wing rwing:wing tail engine wheel"),
    "bicycle": _parts("fwheel:wheel bwheel:wheel saddle:seat handlebar chainwheel headlight"),
    "bird": _parts("head leye:eye reye:eye beak torso neck lwing:wing rwing:wing lleg:leg lfoot:foot rleg:leg "
                   "rfoot:foot tail"),
    "boat": {},
    "bottle": _parts("cap body"),
    "bus": _VEHICLE,
    "car": _VEHICLE,
    "cat": _FELINE,
    "chair": {},
    "cow": _BOVINE,
    "diningtable": {},
    "dog": {**_FELINE, "muzzle": "muzzle"},
    "horse": {**_BOVINE, **_parts("lfho:hoof rfho:hoof lbho:hoof rbho:hoof")},
    "motorbike": _parts("fwheel:wheel bwheel:wheel handlebar saddle:seat headlight"),
    "person": _parts("head leye:eye reye:eye lear:ear rear:ear lebrow:eyebrow rebrow:eyebrow nose mouth hair "
                     "torso neck llarm:arm luarm:arm lhand:hand rlarm:arm ruarm:arm rhand:hand llleg:leg "
                     "luleg:leg lfoot:foot rlleg:leg ruleg:leg rfoot:foot"),
    "pottedplant": _parts("pot plant"),
    "sheep": _BOVINE,
    "sofa": {},
    "train": _parts("head:locomotive hfrontside:locomotive_front hleftside:locomotive_side "
                    "hrightside:locomotive_side hbackside:locomotive_backside hroofside:locomotive_roof headlight "
                    "coach:coach_car cfrontside:coach_front cleftside:coach_side crightside:coach_side "
                    "cbackside:coach_backside croofside:coach_roof"),
    "tvmonitor": _parts("screen"),
}

#: The 50 part classes, ids in order of first appearance over the classes in VOC order.
PART_CLASSES: tuple[str, ...] = tuple(dict.fromkeys(g for c in VOC_CLASSES for g in PART_GROUPS[c].values()))


class PascalPartDataset:
    """One split of Pascal-Part: an iterable of :class:`PartSample`, one per object with parts."""

    def __init__(self, voc_root: PathLike, parts_root: PathLike, split: str = "val",
                 class_to_wnid: Mapping[str, str] = VOC_TO_WNID):
        self.voc_root, self.parts_root = Path(voc_root), Path(parts_root)
        split_file = self.voc_root / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            raise DatasetLayoutError(
                f"Pascal-Part: no split list {split_file}; expected a VOC 2012 folder with JPEGImages/ and "
                f"ImageSets/Main/{split}.txt (data.voc_root)")
        if not self.parts_root.is_dir():
            raise DatasetLayoutError(f"Pascal-Part: no annotation folder {self.parts_root}; expected the "
                                     f"release's Annotations_Part/ with one <id>.mat per image")
        self.image_ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
        self.class_to_wnid = dict(class_to_wnid)
        self.part_class_ids = {name: i for i, name in enumerate(PART_CLASSES)}

    def __iter__(self) -> Iterator[PartSample]:
        for image_id in self.image_ids:
            mat = self.parts_root / f"{image_id}.mat"
            if not mat.is_file():  # images of the split without part annotation have no file
                continue
            yield from self.samples_of(image_id, mat)

    def samples_of(self, image_id: str, mat: Path) -> Iterator[PartSample]:
        """The samples (objects with parts) of one annotation file."""
        for index, (object_class, object_mask, parts) in enumerate(read_annotation(mat)):
            if not parts:
                continue
            groups = PART_GROUPS[object_class]
            ids = []
            for raw, _ in parts:
                base = raw.split("_")[0]
                if base not in groups:
                    raise ValueError(f"{mat}: part {raw!r} of a {object_class} is not a Pascal-Part part name "
                                     f"(known: {sorted(groups)})")
                ids.append(self.part_class_ids[groups[base]])
            masks, part_ids = merge_by_part_class(np.stack([m for _, m in parts]), ids, object_mask.shape)
            yield PartSample(key=f"{image_id}/{index}", path=str(self.voc_root / "JPEGImages" / f"{image_id}.jpg"),
                             object_class=object_class, wnid=self.class_to_wnid.get(object_class),
                             object_mask=object_mask, part_masks=masks, part_ids=part_ids)


def read_annotation(path: PathLike) -> list[tuple[str, np.ndarray, list[tuple[str, np.ndarray]]]]:
    """[(object class, bool mask, [(raw part name, bool mask), ...]), ...] of one ``.mat`` file."""
    import scipy.io

    try:
        anno = scipy.io.loadmat(str(path))["anno"][0, 0]
        objects = anno["objects"]
    except Exception as err:  # scipy raises several types for a bad file
        raise ValueError(f"{path}: not a Pascal-Part annotation (a MATLAB struct 'anno' with 'objects'): "
                         f"{err}") from None
    out = []
    for obj in np.ravel(objects):
        name = _text(obj["class"])
        name = "diningtable" if name == "table" else name
        if name not in PART_GROUPS:
            raise ValueError(f"{path}: unknown object class {name!r}")
        parts = []
        raw_parts = obj["parts"]
        for part in (np.ravel(raw_parts) if raw_parts.size else []):
            parts.append((_text(part["part_name"]), np.asarray(part["mask"]).astype(bool)))
        out.append((name, np.asarray(obj["mask"]).astype(bool), parts))
    return out


def _text(value) -> str:
    """A MATLAB char array as loadmat returns it (nested arrays of one str)."""
    while isinstance(value, np.ndarray):
        value = value.ravel()[0]
    return str(value)
