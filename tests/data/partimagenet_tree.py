"""Test fixture: an ImageNet-style tree with a PartImageNet-style json, laid out unlike the demo's.

What a new user brings, as the released PartImageNet is shaped (not as ``data/synthetic.py``
writes its own dataset):

- ``<root>/<split>/<wnid>/<wnid>_<n>.JPEG``: class folders named by real-looking wnids
  (``n02...``), images not square;
- ``<root>/words.txt``: ``wnid<TAB>name``;
- ``<root>/annotations/<split>.json``: one COCO json of *parts* per split. As in PartImageNet,
  ``file_name`` is the bare file name (no class folder), images carry no ``wnid`` key, the part
  categories are per **super-category** (``"Quadruped Head"``, ``supercategory`` ``Quadruped``)
  and several ImageNet classes share one super-category, so only the wnid in the file name
  says an image's class; segmentations are polygons. No separate object file: the object is
  the union of its parts.
- the splits hold different images (their pixels come from different random draws).

The objects are drawn with the synthetic renderer (``data.synthetic.render_sample``) so that a
small pipeline can learn something from them, then zoomed so that each fills much of its photo
(as ImageNet's objects do) and passes the reference's 5 %-of-the-canvas filters.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from part_distillation.data.synthetic import class_templates, render_sample

#: (wnid, class name, super-category) of the 5 classes: three share ``Quadruped``, two ``Bird``.
CLASSES = (("n02085620", "Chihuahua", "Quadruped"), ("n02088364", "beagle", "Quadruped"),
           ("n02123045", "tabby", "Quadruped"), ("n01530575", "brambling", "Bird"),
           ("n01531178", "goldfinch", "Bird"))
#: Part names of each super-category; a class's k-th template part is its super-category's k-th.
SUPER_PARTS = {"Quadruped": ("Body", "Head", "Foot", "Tail"), "Bird": ("Body", "Head", "Wing", "Foot")}
SIZE = (112, 84)  # (width, height): not square, unlike the demo's images


@dataclass(frozen=True)
class PartTree:
    root: Path
    wnids: tuple[str, ...]
    jsons: dict  #: split -> annotation json path
    images: dict  #: split -> number of images


def _polygons(mask: np.ndarray) -> list[list[float]]:
    """A part mask as COCO polygons (as PartImageNet ships them), pixel-edge outlines."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = []
    for contour in contours:
        points = contour.reshape(-1, 2).astype(float)
        if len(points) >= 3:
            out.append([float(v) for xy in points for v in (xy[0] + 0.5, xy[1] + 0.5)])
    return out


def _zoomed(sample) -> tuple[np.ndarray, np.ndarray]:
    """The sample cropped to a ``SIZE``-shaped box around its object and scaled back to ``SIZE``,
    so the object fills much of the photo, as in ImageNet (the renderer keeps objects within
    0.46 x the short side, which on this wide canvas leaves them < 10 % of the 640² canvas and
    their parts under the reference's 5 % filters)."""
    height, width = sample.labels.shape
    ys, xs = np.nonzero(sample.labels)
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    scale = min(1.0, max((ys.max() + 1 - ys.min()) / height, (xs.max() + 1 - xs.min()) / width) * 1.15)
    h, w = height * scale, width * scale
    top, left = min(max(cy - h / 2, 0), height - h), min(max(cx - w / 2, 0), width - w)
    box = (left, top, left + w, top + h)
    image = Image.fromarray(sample.image).resize((width, height), Image.BILINEAR, box=box)
    labels = Image.fromarray(sample.labels).resize((width, height), Image.NEAREST, box=box)
    return np.asarray(image), np.asarray(labels)


def make_partimagenet_tree(root: str | Path, splits: dict | None = None, seed: int = 7) -> PartTree:
    """Write the tree and one part json per split (``splits``: name -> images per class;
    default ``{"train": 2, "val": 1}``)."""
    root = Path(root)
    splits = splits or {"train": 2, "val": 1}
    templates = class_templates(len(CLASSES), parts_per_class=4, seed=seed)
    supers = list(dict.fromkeys(s for _, _, s in CLASSES))
    categories, category_of = [], {}
    for sup in supers:
        for part in SUPER_PARTS[sup]:
            category_of[sup, part] = len(categories) + 1
            categories.append({"id": len(categories) + 1, "name": f"{sup} {part}", "supercategory": sup})
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "words.txt").write_text("".join(f"{w}\t{n}\n" for w, n, _ in sorted(CLASSES)), encoding="utf-8")
    jsons, counts = {}, {}
    for split_index, (split, per_class) in enumerate(splits.items()):
        images, annotations = [], []
        for class_index, ((wnid, _, sup), template) in enumerate(zip(CLASSES, templates)):
            (root / split / wnid).mkdir(parents=True, exist_ok=True)
            for n in range(per_class):
                rng = np.random.default_rng([seed, split_index, class_index, n])
                image, labels = _zoomed(render_sample(template, SIZE, rng))
                number = 1000 * (split_index + 1) + n
                file_name = f"{wnid}_{number}.JPEG"
                Image.fromarray(image).save(root / split / wnid / file_name, quality=95)
                image_id = len(images) + 1
                images.append({"id": image_id, "file_name": file_name, "width": SIZE[0], "height": SIZE[1]})
                for k, part in enumerate(SUPER_PARTS[sup]):
                    polygons = _polygons(labels == k + 1)
                    if polygons:
                        annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                            "category_id": category_of[sup, part], "iscrowd": 0,
                                            "segmentation": polygons})
        path = root / "annotations" / f"{split}.json"
        path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
        jsons[split], counts[split] = path, len(images)
    return PartTree(root, tuple(w for w, _, _ in CLASSES), jsons, counts)
