"""The three evaluation datasets behind one call: samples of a split and the part class names.

``open_part_dataset(kind, root, split, ...)`` returns a :class:`PartDatasetSplit` whose
``samples()`` yields :class:`~part_distillation.data.part_sample.PartSample` and whose
``part_names[id]`` names each part class id, whatever the dataset. ``class_names`` names
the samples' object classes where the dataset has names for them (PartImageNet: wnid ->
ImageNet class name, from a words file next to the images or the dataset root; empty when
none is found, and the wnid stands for its name).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from part_distillation.data.part_sample import DatasetLayoutError, PartSample

PathLike = str | os.PathLike
KINDS = ("partimagenet", "pascal_part", "cityscapes_part")


@dataclass
class PartDatasetSplit:
    kind: str
    split: str
    part_names: list[str]
    samples: Callable[[], Iterator[PartSample]]
    class_names: dict[str, str] = field(default_factory=dict)

    @property
    def num_parts(self) -> int:
        return len(self.part_names)


def open_part_dataset(kind: str, root: PathLike, split: str, image_root: PathLike | None = None,
                      annotations_root: PathLike | None = None) -> PartDatasetSplit:
    """One split of a part dataset.

    - ``partimagenet``: ``root`` holds ``annotations/``; images under ``image_root`` (the
      ImageNet-1k ``train`` tree for the real dataset; default ``<root>/<split>``, the
      synthetic dataset's layout); ``valtest`` = val then test.
    - ``pascal_part``: ``root`` is the VOC 2012 folder; ``annotations_root`` the release's
      ``Annotations_Part`` (default ``<root>/Annotations_Part``).
    - ``cityscapes_part``: ``root`` holds ``leftImg8bit/`` and ``gtFinePanopticParts/``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"{kind}: dataset root {root} does not exist")
    if kind == "partimagenet":
        from part_distillation.data.partimagenet import PartImageNetDataset, annotation_files

        if image_root is None and split == "valtest":
            raise DatasetLayoutError("partimagenet: split 'valtest' needs image_root (the ImageNet-1k train "
                                     "folder holding the images of both val and test)")
        dataset = PartImageNetDataset(annotation_files(root, split), image_root or root / split)
        names = [""] * (max((c.id for c in dataset.categories), default=-1) + 1)
        for category in dataset.categories:
            names[category.id] = category.name
        return PartDatasetSplit(kind, split, names, dataset.samples,
                                _imagenet_class_names(image_root or root / split, root))
    if kind == "pascal_part":
        from part_distillation.data.pascal_part import PART_CLASSES, PascalPartDataset

        dataset = PascalPartDataset(root, annotations_root or root / "Annotations_Part", split)
        return PartDatasetSplit(kind, split, list(PART_CLASSES), dataset.__iter__)
    if kind == "cityscapes_part":
        from part_distillation.data.cityscapes_part import PART_CLASSES, CityscapesPartDataset

        dataset = CityscapesPartDataset(root, split)
        return PartDatasetSplit(kind, split, list(PART_CLASSES), dataset.__iter__)
    raise ValueError(f"unknown part dataset {kind!r}; expected one of {list(KINDS)}")


def _imagenet_class_names(image_root: PathLike, root: PathLike) -> dict[str, str]:
    """wnid -> class name from the first words file near the images or under the dataset root."""
    from part_distillation.data.imagenet import find_words_file, read_class_names

    for folder in (Path(image_root), Path(root)):
        found = find_words_file(folder)
        if found is not None:
            return read_class_names(found)
    return {}
