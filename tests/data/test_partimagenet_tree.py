"""The new-dataset fixture (``tests/data/partimagenet_tree.py``) is what it claims to be: read by
the PartImageNet reader with every image found, classes sharing a super-category, disjoint splits."""
from __future__ import annotations

import os

from part_distillation.data.imagenet import list_image_tree
from part_distillation.data.partimagenet import PartImageNetDataset
from tests.data.partimagenet_tree import CLASSES, make_partimagenet_tree


def test_partimagenet_tree_is_a_partimagenet_layout_unlike_the_demo(tmp_path):
    tree = make_partimagenet_tree(tmp_path / "parts")
    assert tree.images == {"train": 10, "val": 5}
    train = PartImageNetDataset(tree.jsons["train"], tmp_path / "parts" / "train")
    val = PartImageNetDataset(tree.jsons["val"], tmp_path / "parts" / "val")
    assert set(train.object_classes) == {"Quadruped", "Bird"}  # 5 classes, 2 super-categories
    for dataset in (train, val):
        assert all("/" not in im.file_name for im in dataset)  # bare names, as PartImageNet
        assert all(os.path.isfile(im.path) for im in dataset)  # found in <wnid>/
        assert {im.wnid for im in dataset} == {w for w, _, _ in CLASSES}
        samples = list(dataset.samples())
        assert len(samples) == len(dataset) and all(s.part_masks.any(axis=(1, 2)).all() for s in samples)
        assert all(len(s.part_ids) >= 2 for s in samples)
        # objects fill much of the photo, as in ImageNet: well above the reference's stage-6 filter
        # (object >= 5 % of the square canvas of the longer side), so the pipeline can train on them
        assert all(s.part_masks.any(0).sum() / max(s.part_masks.shape[1:]) ** 2 >= 0.15 for s in samples)
    assert not {im.path for im in train} & {im.path for im in val}  # disjoint splits
    listed = list_image_tree(tmp_path / "parts", split="train")
    assert list(listed.wnids) == sorted(w for w, _, _ in CLASSES) and len(listed) == 10
    assert dict(zip(listed.wnids, listed.names))["n02088364"] == "beagle"
