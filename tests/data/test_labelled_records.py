"""Labelled part datasets as training records, and the few-shot subset (hand-worked cases)."""
import json
import math

import numpy as np
import pytest

from part_distillation.data.labelled_records import (RecordList, fewshot_subset, labelled_records,
                                                     part_class_labels)
from part_distillation.data.part_datasets import open_part_dataset
from part_distillation.data.part_records import PartRecordDataset, RecordFilter
from part_distillation.data.part_sample import PartSample
from part_distillation.data.synthetic import make_synthetic_dataset
from part_distillation.data.transforms import AugmentConfig
from part_distillation.masks import decode_rles


def _box(shape, y0, y1, x0, x1):
    m = np.zeros(shape, dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _two_object_image(path="img.jpg"):
    """An 8 x 8 image with two objects (Pascal-style keys ``image/object``): object 0 has
    parts 3 (rows 0-1) and 5 (rows 2-3) in columns 0-3; object 1 has part 3 in rows 4-7, columns 4-7."""
    shape = (8, 8)
    a = PartSample("im1/0", path, "cat", None, _box(shape, 0, 4, 0, 4),
                   np.stack([_box(shape, 0, 2, 0, 4), _box(shape, 2, 4, 0, 4)]), np.array([3, 5]))
    b = PartSample("im1/1", path, "dog", None, _box(shape, 4, 8, 4, 8),
                   _box(shape, 4, 8, 4, 8)[None], np.array([3]))
    return a, b


def test_one_record_per_image_with_every_objects_parts():
    a, b = _two_object_image()
    (record,), empty = labelled_records([a, b], fit_size=4)
    assert empty == 0 and record["key"] == "im1" and record["path"] == "img.jpg"
    assert record["original_size"] == [8, 8] and record["fitted_size"] == [4, 4]
    assert record["part_classes"].tolist() == [3, 5, 3]
    assert record["object_classes"] == ["cat", "dog"] and record["class_index"] == 0  # sorted: cat, dog
    assert record["object_ratio"] == pytest.approx(32 / 64)
    masks = decode_rles(record["part_masks"], (4, 4))
    # nearest to 4 x 4 halves every box
    assert np.array_equal(masks[0], _box((4, 4), 0, 1, 0, 2))
    assert np.array_equal(masks[1], _box((4, 4), 1, 2, 0, 2))
    assert np.array_equal(masks[2], _box((4, 4), 2, 4, 2, 4))


def test_semantic_merge_joins_one_part_class_over_the_image():
    a, b = _two_object_image()
    (record,), _ = labelled_records([a, b], fit_size=8, merge_parts=True)
    assert record["part_classes"].tolist() == [3, 5]
    masks = decode_rles(record["part_masks"], (8, 8))
    assert np.array_equal(masks[0], a.part_masks[0] | b.part_masks[0])
    assert np.array_equal(masks[1], a.part_masks[1])
    assert part_class_labels(record).tolist() == [3, 5]


def test_parts_lost_in_the_fitted_frame_are_dropped_and_empty_images_counted():
    shape = (8, 8)
    thin = np.zeros(shape, dtype=bool)
    thin[0, :] = True  # nearest to 4 x 4 samples the pixel centres, rows 1, 3, 5, 7: gone
    keep = PartSample("a", "a.jpg", "cat", None, _box(shape, 0, 8, 0, 8), np.stack([thin, _box(shape, 4, 8, 0, 8)]),
                      np.array([1, 2]))
    gone = PartSample("b", "b.jpg", "cat", None, _box(shape, 0, 8, 0, 8), thin[None], np.array([1]))
    none = PartSample("c", "c.jpg", "cat", None, _box(shape, 0, 8, 0, 8), np.zeros((0, 8, 8), bool),
                      np.zeros(0, np.int64))
    records, empty = labelled_records([keep, gone, none], fit_size=4)
    assert [r["key"] for r in records] == ["a"] and empty == 2
    assert records[0]["part_classes"].tolist() == [2]


def test_record_list_is_read_like_a_store_by_the_training_dataset(tmp_path):
    summary = make_synthetic_dataset(tmp_path / "syn", num_classes=2, images_per_class=2, size=48)
    split = open_part_dataset("partimagenet", tmp_path / "syn", "train")
    records, empty = labelled_records(split.samples(), fit_size=32, merge_parts=True)
    assert empty == 0 and len(records) == summary.num_images == 4
    parts = json.loads(summary.parts_json.read_text())
    for record in records:  # the json's part categories of that image, ascending
        expected = sorted({a["category_id"] for a in parts["annotations"] if str(a["image_id"]) == record["key"]})
        assert record["part_classes"].tolist() == expected
    with pytest.raises(ValueError, match="two records have the key"):
        RecordList(records + records[:1])
    dataset = PartRecordDataset([RecordList(records)], augment=AugmentConfig(size=32, min_part_ratio=0.0),
                                filter=RecordFilter(min_object_ratio=0.0, inclusive=True), labels=part_class_labels)
    assert len(dataset) == 4
    for index in range(4):
        sample = dataset[(0, index)]
        assert sample["image"].shape == (3, 32, 32) and sample["masks"].shape[1:] == (32, 32)
        assert set(sample["labels"].tolist()) <= set(records[index]["part_classes"].tolist())
        assert len(sample["labels"]) == len(sample["masks"]) >= 1


# ----------------------------------------------------------------------------- few-shot subset

def test_subset_hand_worked_cases():
    pets = {k: ["cat"] for k in "abcde"} | {k: ["dog"] for k in "fghij"}
    for seed in range(20):
        two = fewshot_subset(pets, 20, seed)  # 10 images x 20% = 2: one cat, one dog
        assert len(two) == 2 and set(two[0]) <= set("abcde") and set(two[1]) <= set("fghij")
        assert len(fewshot_subset(pets, 25, seed)) == 2  # floor(2.5)
        one = fewshot_subset(pets, 1, seed)  # floor(0.1) -> at least one image
        assert len(one) == 1
    assert fewshot_subset(pets, 100, 3) == sorted(pets)
    # one image per class and a count of 3: exactly those three, whatever the seed
    singles = {"x": ["owl"], "y": ["fox"], "z": ["bee"]} | {f"b{i}": ["bee"] for i in range(7)}
    for seed in range(10):
        assert set(fewshot_subset(singles, 30, seed)) >= {"x", "y"}
        assert len(fewshot_subset(singles, 30, seed)) == 3


def test_subset_is_a_pure_function_of_sorted_keys_percent_and_seed():
    images = {f"img{i:03d}": [f"class{i % 4}"] for i in range(40)}
    shuffled = dict(reversed(list(images.items())))
    first = fewshot_subset(images, 25, 7)
    assert first == fewshot_subset(shuffled, 25, 7) == fewshot_subset(images, 25, 7)
    assert first != fewshot_subset(images, 25, 8)
    assert first == sorted(first) and len(set(first)) == 10
    for percent in (1, 5, 12.5, 33, 50, 99, 100):
        subset = fewshot_subset(images, percent, 0)
        assert len(subset) == max(1, math.floor(40 * percent / 100))
        if len(subset) >= 4:  # every class covered when the count allows
            assert {images[k][0] for k in subset} == {f"class{c}" for c in range(4)}


def test_subset_covers_classes_of_multi_object_images_once():
    # image "m" shows both classes: choosing it covers both, the rest is drawn at random
    images = {"m": ["cat", "dog"], **{f"c{i}": ["cat"] for i in range(9)}}
    for seed in range(10):
        subset = fewshot_subset(images, 20, seed)
        assert len(subset) == 2 and "m" in subset  # the only image of a dog must be in


@pytest.mark.parametrize("percent", [0, -1, 101])
def test_subset_refuses_percentages_outside_0_100(percent):
    with pytest.raises(ValueError, match="percent"):
        fewshot_subset({"a": ["x"]}, percent, 0)
