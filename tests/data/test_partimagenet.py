"""The PartImageNet reader, on the synthetic dataset and on a hand-written polygon json."""
from __future__ import annotations

import json

import numpy as np
import pytest

from part_distillation.data.partimagenet import PartImageNetDataset
from part_distillation.data.synthetic import make_synthetic_dataset


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("pin"), num_classes=2, images_per_class=3, size=48,
                                  seed=5, parts_per_class=3)


def test_reads_synthetic_parts_and_objects(synthetic):
    with_objects = PartImageNetDataset(synthetic.parts_json, synthetic.image_dir, objects_file=synthetic.objects_json)
    parts_only = PartImageNetDataset(synthetic.parts_json, synthetic.image_dir)
    assert len(with_objects) == 6
    assert with_objects.object_classes == synthetic.class_names
    first_class = synthetic.class_names[0]
    assert [c.part for c in with_objects.parts_of(first_class)][0] == "body"
    assert all(c.object_class == first_class for c in with_objects.parts_of(first_class))
    for image in with_objects:
        assert image.wnid in synthetic.wnids
        assert image.object_class == synthetic.class_names[synthetic.wnids.index(image.wnid)]
        assert with_objects.load_image(image.id).shape == (48, 48, 3)
        parts = with_objects.part_masks(image.id)
        assert parts.masks.shape[1:] == (48, 48) and parts.masks.dtype == bool
        assert len(parts.category_ids) == len(parts.masks) > 0
        assert all(with_objects.category(c).object_class == image.object_class for c in parts.category_ids)
        assert (parts.masks.sum((1, 2)) > 0).all()
        obj = with_objects.object_mask(image.id)
        assert np.array_equal(obj, parts.masks.any(0))
        assert np.array_equal(obj, parts_only.object_mask(image.id))


def test_polygons_bare_file_names_and_no_object_file(tmp_path):
    wnid = "n01440764"
    (tmp_path / "images" / wnid).mkdir(parents=True)
    data = {
        "images": [{"id": 0, "file_name": f"{wnid}_1.JPEG", "width": 20, "height": 10},
                   {"id": 1, "file_name": f"{wnid}_2.JPEG", "width": 20, "height": 10}],
        "categories": [{"id": 0, "name": "Fish Head", "supercategory": "Fish"},
                       {"id": 1, "name": "Fish Body", "supercategory": "Fish"}],
        "annotations": [
            {"id": 0, "image_id": 0, "category_id": 0, "segmentation": [[0, 0, 5, 0, 5, 10, 0, 10]], "iscrowd": 0},
            {"id": 1, "image_id": 0, "category_id": 1, "segmentation": [[10, 0, 20, 0, 20, 10, 10, 10], [1, 1]],
             "iscrowd": 0},
            {"id": 2, "image_id": 0, "category_id": 1, "segmentation": [], "iscrowd": 0},
        ],
    }
    path = tmp_path / "test.json"
    path.write_text(json.dumps(data))
    dataset = PartImageNetDataset(path, tmp_path / "images")
    assert dataset.object_classes == ("Fish",)
    assert [c.part for c in dataset.categories] == ["Head", "Body"]
    image = dataset.image(0)
    assert image.path == str(tmp_path / "images" / wnid / f"{wnid}_1.JPEG")
    assert image.wnid == wnid and image.object_class == "Fish"
    parts = dataset.part_masks(0)
    assert parts.category_ids.tolist() == [0, 1, 1]
    assert parts.masks[0, :, :5].all() and not parts.masks[0, :, 6:].any()
    assert parts.masks[1, :, 10:].all() and not parts.masks[1, :, :9].any()
    assert not parts.masks[2].any()
    assert dataset.object_mask(0).sum() == parts.masks[0].sum() + parts.masks[1].sum()
    empty = dataset.part_masks(1)
    assert empty.masks.shape == (0, 10, 20) and dataset.image(1).object_class is None
    assert not dataset.object_mask(1).any()


def test_rejects_annotations_of_unknown_categories(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 2, "height": 2}],
                                "categories": [],
                                "annotations": [{"id": 1, "image_id": 1, "category_id": 9, "segmentation": []}]}))
    with pytest.raises(ValueError, match="unknown category"):
        PartImageNetDataset(path, tmp_path)


def test_valtest_concatenates_val_and_test_without_id_collisions(tmp_path):
    from part_distillation.data.partimagenet import annotation_files

    categories = [{"id": 1, "name": "Fish Head", "supercategory": "Fish"},
                  {"id": 2, "name": "Fish Tail", "supercategory": "Fish"}]
    square = [[0, 0, 4, 0, 4, 4, 0, 4]]
    for split, file_name in (("val", "n01440764_1.JPEG"), ("test", "n01440764_2.JPEG")):
        folder = tmp_path / "annotations" / split
        folder.mkdir(parents=True)
        # both files number their only image and annotation 0: the reader must keep them apart
        (folder / f"{split}.json").write_text(json.dumps({
            "images": [{"id": 0, "file_name": file_name, "width": 8, "height": 8}],
            "annotations": [{"id": 0, "image_id": 0, "category_id": 1 if split == "val" else 2,
                             "segmentation": square}],
            "categories": categories}))
    files = annotation_files(tmp_path, "valtest")
    assert [f.parent.name for f in files] == ["val", "test"]
    valtest = PartImageNetDataset(files, tmp_path / "train")
    assert [im.file_name for im in valtest] == ["n01440764_1.JPEG", "n01440764_2.JPEG"]
    assert len({im.id for im in valtest}) == 2
    samples = list(valtest.samples())
    assert [list(s.part_ids) for s in samples] == [[1], [2]]
    assert all(s.object_class == "n01440764" == s.wnid and s.supercategory == "Fish" for s in samples)
    assert all(s.part_masks.shape == (1, 8, 8) and s.part_masks[0].sum() == 16 for s in samples)
    with pytest.raises(FileNotFoundError, match="split 'train'"):
        annotation_files(tmp_path, "train")


def test_concatenation_refuses_different_categories(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "A x"}]}))
    b.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "B x"}]}))
    with pytest.raises(ValueError, match="categories differ"):
        PartImageNetDataset([a, b], tmp_path)


def test_samples_are_keyed_by_the_images_imagenet_class(tmp_path):
    make_synthetic_dataset(tmp_path, num_classes=2, images_per_class=1, size=32, seed=0, parts_per_class=2)
    dataset = PartImageNetDataset(tmp_path / "annotations" / "train.json", tmp_path / "train")
    samples = list(dataset.samples())
    assert [s.object_class for s in samples] == [s.wnid for s in samples]
    assert all(s.supercategory == dataset.category(int(s.part_ids[0])).object_class for s in samples)
