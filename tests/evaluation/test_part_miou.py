"""Part mIoU: a case worked by hand, the reference's mapping rules, and a brute-force check."""
import math

import numpy as np
import pytest

from part_distillation.evaluation.part_miou import (
    apply_mapping, apply_mapping_filtered, confusion, hungarian, image_confusion, majority_vote, match_clusters, merge,
    part_scores, summarize)


def _masks(labels, values):
    labels = np.asarray(labels)[None, :]  # a 1 x N image
    return np.stack([labels == v for v in values]), list(values)


# Ground truth: part 0 on pixels 0-2, part 1 on 3-5, background 6-9.
GT = [0, 0, 0, 1, 1, 1, -1, -1, -1, -1]
# Clusters: 0 on 0-1, 1 on 2-4, 2 on 5-6, background 7-9.
PRED = [0, 0, 1, 1, 1, 2, 2, -1, -1, -1]


def test_worked_by_hand():
    gt_masks, gt_parts = _masks(GT, [0, 1])
    pred_masks, clusters = _masks(PRED, [0, 1, 2])
    matching = image_confusion(pred_masks, clusters, gt_masks, gt_parts, num_clusters=3, num_parts=2)
    # rows: clusters 0,1,2,bg; columns: parts 0,1,bg
    np.testing.assert_array_equal(matching, [[2, 0, 0], [1, 2, 0], [0, 1, 1], [0, 0, 3]])
    mapping = majority_vote(matching)
    np.testing.assert_array_equal(mapping, [0, 1, 1])  # cluster 2 -> part 1 (background excluded)
    evaluation = apply_mapping(matching, mapping)
    relabelled = [mapping[c] for c in clusters]  # the same, computed on the pixels
    np.testing.assert_array_equal(evaluation, image_confusion(pred_masks, relabelled, gt_masks, gt_parts, 2, 2))
    scores = part_scores(evaluation)
    # part 0: tp 2, gt 3, pred 2 -> 2/3; part 1: tp 3, gt 3, pred 5 -> 3/5
    np.testing.assert_allclose(scores.iou, [200 / 3, 60.0])
    np.testing.assert_allclose(scores.accuracy, [200 / 3, 100.0])
    np.testing.assert_allclose(scores.iopred, [100.0, 60.0])
    summary = summarize({7: evaluation})
    assert summary.c_miou == pytest.approx((200 / 3 + 60) / 2)
    assert summary.per_class == {7: pytest.approx((200 / 3 + 60) / 2)}


def test_never_predicted_cluster_maps_to_part_0_and_hungarian_is_one_to_one():
    matrix = np.array([[5, 1, 0], [4, 3, 0], [0, 0, 0], [0, 0, 9]])  # cluster 2 never predicted
    np.testing.assert_array_equal(majority_vote(matrix), [0, 0, 0])
    np.testing.assert_array_equal(hungarian(matrix), [0, 1, 0])  # 5 + 3 beats 1 + 4
    assert set(match_clusters({3: matrix}, how="hungarian")) == {3}
    with pytest.raises(ValueError, match="unknown mapping"):
        match_clusters({3: matrix}, how="best")


def test_predicted_part_absent_from_ground_truth_counts_zero():
    # ground truth has only part 0; the prediction also puts part 1 somewhere
    gt = np.array([0, 0, 2, 2])      # 2 = background (num_parts=2)
    pred = np.array([0, 1, 2, 2])
    scores = part_scores(confusion(pred, gt, 2, 2))
    np.testing.assert_allclose(scores.iou, [50.0, 0.0])
    assert scores.miou == pytest.approx(25.0)   # (50 + 0) / 2 parts counted
    absent = part_scores(confusion(np.array([0, 0, 2, 2]), gt, 2, 2))
    assert absent.miou == pytest.approx(100.0)  # part 1 neither in GT nor predicted: not counted


def test_a_miou_counts_every_part_id_not_only_those_below_the_class_count():
    # One object class with three parts (ids 0, 1, 2): all three enter A-mIoU. The released
    # evaluator kept only part ids < number of object classes (here 1), i.e. part 0.
    gt = np.array([0, 1, 2, 3])
    pred = np.array([0, 3, 3, 3])
    summary = summarize({0: confusion(pred, gt, 3, 3)})
    assert summary.a_miou == pytest.approx(100 / 3)
    assert summary.c_miou == pytest.approx(100 / 3)


def test_c_and_a_miou_differ_as_defined():
    one = confusion(np.array([0, 1]), np.array([0, 1]), 2, 2)              # class 0: parts 0, 1 perfect
    two = confusion(np.array([2, 2, 0]), np.array([0, 1, 2]), 2, 2)        # class 1: part 0,1 missed, part 0 predicted on bg
    summary = summarize({0: one, 1: two})
    # class 0: [100, 100] -> 100; class 1: part0 iou 0 (gt 1, pred 1, tp 0), part1 0 -> 0
    assert summary.c_miou == pytest.approx(50.0)
    assert summary.a_miou == pytest.approx(50.0)
    three = confusion(np.array([0, 0, 0]), np.array([0, 0, 1]), 2, 2)      # class 2: part0 2/3, part1 0
    summary = summarize({0: one, 1: two, 2: three})
    assert summary.c_miou == pytest.approx((100 + 0 + 100 / 3) / 3)
    assert summary.a_miou == pytest.approx((100 + 100 + 0 + 0 + 200 / 3 + 0) / 6)


def test_against_brute_force_per_pixel_on_random_maps():
    rng = np.random.default_rng(0)
    num_parts = 4
    pred = rng.integers(0, num_parts + 1, size=(20, 30))
    gt = rng.integers(0, num_parts + 1, size=(20, 30))
    scores = part_scores(confusion(pred, gt, num_parts, num_parts))
    for part in range(num_parts):
        tp = fp = fn = 0
        for p, g in zip(pred.ravel(), gt.ravel()):
            tp += (p == part) and (g == part)
            fp += (p == part) and (g != part)
            fn += (p != part) and (g == part)
        assert scores.iou[part] == pytest.approx(100 * tp / (tp + fp + fn))


def test_merge_of_shards_equals_one_pass_and_refuses_other_shapes():
    rng = np.random.default_rng(3)
    images = [(int(rng.integers(0, 3)), rng.integers(0, 4, (6, 6)), rng.integers(0, 4, (6, 6))) for _ in range(10)]
    one: dict = {}
    for c, p, g in images:
        one = merge([one, {c: confusion(p, g, 3, 3)}])
    shards = [merge({c: confusion(p, g, 3, 3)} for c, p, g in images[i::3]) for i in range(3)]
    merged = merge(shards)
    assert set(merged) == set(one)
    for c in one:
        np.testing.assert_array_equal(merged[c], one[c])
    with pytest.raises(ValueError, match="different shapes"):
        merge([{0: np.zeros((3, 3))}, {0: np.zeros((4, 4))}])


def test_c_miopred_is_undefined_when_a_class_predicts_no_part_pixel_as_the_reference():
    # class "a": part 0 predicted perfectly; class "b": nothing predicted (all background)
    a = np.array([[5, 0, 0], [0, 0, 0], [0, 0, 9]])
    b = np.array([[0, 0, 0], [0, 0, 0], [4, 4, 9]])
    summary = summarize({"a": a, "b": b})
    assert math.isnan(summary.c_iopred)      # the released evaluator: mean over classes of 0/0
    assert summary.classes_without_prediction == ["b"]
    assert summary.a_iopred == pytest.approx(100.0)   # parts without prediction are skipped
    assert summary.c_miou == pytest.approx((100 / 1 + 0) / 2)


def test_filtered_mapping_drops_merged_parts_that_miss_every_ground_truth_part():
    # clusters 0 and 1 both map to part 0; together 10 pixels of which 1 on part 0 (of 20):
    # merged IoU 1 / 29 <= 0.1 -> dropped to background; cluster 2 -> part 1, IoU 8/10 kept
    matrix = np.array([[1, 0, 4], [0, 0, 5], [0, 8, 0], [19, 2, 50]])
    out = apply_mapping_filtered(matrix, np.array([0, 0, 1]), 0.1)
    np.testing.assert_array_equal(out, [[0, 0, 0], [0, 8, 0], [20, 2, 59]])
    assert out.sum() == matrix.sum()
    # each cluster alone is as bad, but the filter sees the merged part: 0.1 < 11/20 keeps it
    matrix = np.array([[6, 0, 0], [5, 0, 0], [0, 8, 0], [9, 2, 50]])
    np.testing.assert_array_equal(apply_mapping_filtered(matrix, np.array([0, 0, 1]), 0.5),
                                  apply_mapping(matrix, np.array([0, 0, 1])))
