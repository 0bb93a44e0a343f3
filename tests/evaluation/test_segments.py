"""Best-match IoU and the trivial baselines, on hand-worked cases."""
from __future__ import annotations

import numpy as np
import pytest

from part_distillation.evaluation.segments import best_match_iou, mean_best_match_iou
from part_distillation.models.baselines import color_position_labels, strip_labels


def test_best_match_iou_hand_worked():
    true = np.zeros((2, 4, 4), bool)
    true[0, :, :2] = True           # left half, 8 px
    true[1, :, 2:] = True           # right half, 8 px
    seg = np.zeros((1, 4, 4), bool)
    seg[0, :, :3] = True            # 12 px: IoU 8/12 with left, 4/16 with right
    assert best_match_iou(true, seg) == pytest.approx((8 / 12 + 4 / 16) / 2)
    assert best_match_iou(true, true) == 1.0
    assert best_match_iou(true, np.zeros((0, 4, 4), bool)) == 0.0
    assert mean_best_match_iou([1.0, 0.5]) == 0.75
    with pytest.raises(ValueError):
        best_match_iou(true, np.zeros((1, 3, 3), bool))


def test_strips_split_the_longer_side_of_the_box_inside_the_object():
    mask = np.zeros((10, 20), bool)
    mask[2:6, 4:16] = True          # box 4 x 12: longer side horizontal, strips of 3 columns
    mask[2, 4] = False
    labels = strip_labels(mask, 4)
    assert labels[~mask].max() == 0
    assert labels[3, 4:16].tolist() == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    tall = strip_labels(mask.T, 2)
    assert tall[4:10, 3].tolist() == [1] * 6 and tall[10:16, 3].tolist() == [2] * 6


def test_colour_position_kmeans_separates_two_flat_colours():
    image = np.zeros((20, 20, 3), np.uint8)
    image[:, :10] = (255, 0, 0)
    image[:, 10:] = (0, 0, 255)
    mask = np.ones((20, 20), bool)
    mask[0] = False
    labels = color_position_labels(image, mask, 2, n_init=3)
    assert labels[0].max() == 0
    assert len(np.unique(labels[1:, :10])) == 1 and len(np.unique(labels[1:, 10:])) == 1
    assert labels[5, 0] != labels[5, 19]


def test_synthetic_objects_are_in_the_fitted_frame_and_parts_tile_the_object(tmp_path):
    from part_distillation.data.synthetic import make_synthetic_dataset
    from part_distillation.evaluation.segments import synthetic_objects

    make_synthetic_dataset(tmp_path, num_classes=1, images_per_class=2, size=(40, 32), seed=4)
    items = synthetic_objects(tmp_path, "train", fit=80)
    assert len(items) == 2
    for it in items:
        assert it["fitted"] == (64, 80) and it["image"].shape == (64, 80, 3) and it["object"].shape == (64, 80)
        assert np.array_equal(it["parts"].any(0), it["object"]) and it["parts"].sum(0).max() == 1
        assert best_match_iou(it["parts"], it["parts"]) == 1.0
