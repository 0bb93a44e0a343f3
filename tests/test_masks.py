"""The shared mask helpers: RLE round trips agree with pycocotools, IoU and resizing."""
from __future__ import annotations

import json

import numpy as np
import pytest

from part_distillation import masks


@pytest.fixture
def blobs():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:40, :60]
    out = []
    for _ in range(5):
        cy, cx, r = rng.integers(5, 35), rng.integers(5, 55), rng.integers(3, 12)
        out.append((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r)
    return np.stack(out)


def test_rle_round_trip_is_json_ready(blobs):
    rles = masks.encode_rles(blobs)
    assert json.loads(json.dumps(rles)) == rles
    assert all(isinstance(r["counts"], str) and r["size"] == [40, 60] for r in rles)
    np.testing.assert_array_equal(masks.decode_rles(rles), blobs)
    np.testing.assert_array_equal(masks.decode_rle(masks.encode_rle(blobs[2])), blobs[2])
    np.testing.assert_array_equal(masks.rle_area(rles), blobs.reshape(5, -1).sum(1))


def test_uncompressed_coco_rle_is_accepted():
    m = np.zeros((4, 5), bool)
    m[1:3, 2:4] = True
    counts = [9, 2, 2, 2, 5]  # column-major runs, starting with zeros
    np.testing.assert_array_equal(masks.decode_rle({"size": [4, 5], "counts": counts}), m)


def test_empty_inputs_and_bad_shapes():
    assert masks.encode_rles(np.zeros((0, 3, 4), bool)) == []
    assert masks.decode_rles([], size=(3, 4)).shape == (0, 3, 4)
    with pytest.raises(ValueError, match="size"):
        masks.decode_rles([])
    with pytest.raises(ValueError, match="2-D"):
        masks.encode_rle(np.zeros((2, 3, 4), bool))


def test_bbox_iou_resize_union(blobs):
    rles = masks.encode_rles(blobs)
    boxes = masks.rle_to_bbox(rles)
    ys, xs = np.nonzero(blobs[0])
    np.testing.assert_allclose(boxes[0], [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1])
    iou = masks.mask_iou(blobs, blobs)
    np.testing.assert_allclose(np.diag(iou), 1.0)
    a, b = blobs[0], blobs[1]
    assert iou[0, 1] == pytest.approx((a & b).sum() / (a | b).sum())
    up = masks.resize_masks(blobs, (80, 120))
    assert up.shape == (5, 80, 120)
    np.testing.assert_array_equal(up[:, ::2, ::2], blobs)
    np.testing.assert_array_equal(masks.union(blobs), blobs.any(0))


def test_label_map_miou_ignores_background_and_counts_labels_in_either_map():
    a = np.array([[0, 1, 1], [2, 2, 0]])
    b = np.array([[0, 1, 0], [2, 2, 3]])
    # label 1: 1/2, label 2: 2/2, label 3: 0/1
    assert masks.label_map_miou(a, b) == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert masks.label_map_miou(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
    with pytest.raises(ValueError, match="shape"):
        masks.label_map_miou(a, b[:1])


def test_mask_iou_is_float64_so_an_exact_threshold_is_reached():
    # 13 shared pixels over a union of 20: exactly 0.65, which float32 rounds below 0.65
    a = np.zeros((1, 4, 5), bool)
    b = np.zeros((1, 4, 5), bool)
    a[0].flat[:20] = True
    b[0].flat[:13] = True
    iou = masks.mask_iou(a, b)
    assert iou.dtype == np.float64
    assert iou[0, 0] >= 0.65


def test_masks_to_label_map_later_masks_win_and_labels_default_to_position():
    from part_distillation.masks import masks_to_label_map

    masks = np.zeros((2, 3, 4), bool)
    masks[0, 0, :2] = masks[1, 2, 3] = True
    assert masks_to_label_map(masks).tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 2]]
    masks[1, 0, 1] = True  # overlaps mask 0: the later mask wins
    assert masks_to_label_map(masks, [7, 9], background=-1).tolist() == [[7, 9, -1, -1], [-1] * 4, [-1, -1, -1, 9]]
    assert masks_to_label_map(np.zeros(0, bool), [], 5, shape=(2, 2)).tolist() == [[5, 5], [5, 5]]
    with pytest.raises(ValueError, match="must be"):
        masks_to_label_map(np.zeros(0, bool))


def test_label_map_to_masks_one_mask_per_label_present_in_order():
    from part_distillation.masks import label_map_to_masks, masks_to_label_map

    labels = np.array([[0, 2, 2], [3, 3, 0], [0, 0, 5]])
    masks, ids = label_map_to_masks(labels)
    assert ids.tolist() == [2, 3, 5] and ids.dtype == np.int64
    assert masks.dtype == bool and masks.sum((1, 2)).tolist() == [2, 2, 1]
    assert (masks_to_label_map(masks, ids) == labels).all()  # the two are inverse
    masks, ids = label_map_to_masks(labels, ids=range(1, 5))  # only these, absent ones left out
    assert ids.tolist() == [2, 3] and masks.shape == (2, 3, 3)
    masks, ids = label_map_to_masks(np.zeros((2, 3), np.int64))
    assert masks.shape == (0, 2, 3) and ids.shape == (0,)
