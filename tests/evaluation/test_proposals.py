"""Proposal AR: hand-worked cases and an independent IoU (pycocotools)."""
import numpy as np
import pytest
from pycocotools import mask as coco_mask

from part_distillation.evaluation.proposals import IOU_THRESHOLDS, greedy_match, image_overlaps, summarize


def test_thresholds_are_the_ten_of_the_paper():
    np.testing.assert_allclose(IOU_THRESHOLDS, [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95])


def test_greedy_takes_the_best_pair_first_not_the_best_assignment():
    # The best pair (0.9) is taken first, leaving 0.1 for the second part; a one-to-one
    # optimum would have given 0.8 + 0.85.
    iou = np.array([[0.9, 0.8], [0.85, 0.1]])
    np.testing.assert_allclose(greedy_match(iou), [0.9, 0.1])


def test_greedy_one_proposal_covers_one_part_only():
    np.testing.assert_allclose(greedy_match(np.array([[0.7, 0.6, 0.9]])), [0.0, 0.0, 0.9])


def test_ar_worked_by_hand():
    # Matched IoUs 0.5, 0.74, 1.0, 0.0: recall 75% at 0.50, 50% at 0.55-0.70, 25% at 0.75-0.95.
    state = {"overlaps": np.array([[0.5, 0.74, 1.0, 0.0]], np.float32), "gt_areas": np.array([10, 10, 10, 10])}
    summary = summarize([state], top_k=(1,), areas=("all",))
    assert summary.recalls["AR@1"] == pytest.approx([75, 50, 50, 50, 50, 25, 25, 25, 25, 25])
    assert summary.ar["AR@1"] == pytest.approx(40.0)


def _random_masks(rng, n, shape=(24, 32)):
    masks = np.zeros((n, *shape), bool)
    for m in masks:
        y0, x0 = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
        m[y0:y0 + rng.integers(3, 12), x0:x0 + rng.integers(3, 16)] = True
    return masks


def test_image_overlaps_against_pycocotools_iou_and_brute_force_greedy():
    rng = np.random.default_rng(0)
    pred, gt = _random_masks(rng, 12), _random_masks(rng, 5)
    scores = rng.random(12)
    state = image_overlaps(pred, scores, gt, top_k=(1, 3, 12))
    order = np.argsort(-scores)
    rle = lambda ms: [coco_mask.encode(np.asfortranarray(m.astype(np.uint8))) for m in ms]
    for row, k in enumerate((1, 3, 12)):
        iou = np.array(coco_mask.iou(rle(pred[order[:k]]), rle(gt), [0] * len(gt)))
        expected = np.zeros(len(gt))
        used_p, used_g = set(), set()
        pairs = sorted(((iou[p, g], p, g) for p in range(iou.shape[0]) for g in range(iou.shape[1])), reverse=True)
        for value, p, g in pairs:  # greedy over the sorted list of all pairs
            if p in used_p or g in used_g:
                continue
            expected[g] = value
            used_p.add(p)
            used_g.add(g)
        np.testing.assert_allclose(state["overlaps"][row], expected, atol=1e-6)
    np.testing.assert_array_equal(state["gt_areas"], gt.reshape(5, -1).sum(1))


def test_image_without_proposals_counts_its_parts_as_misses():
    gt = _random_masks(np.random.default_rng(1), 3)
    perfect = image_overlaps(gt, np.ones(3), gt, top_k=(10,))
    empty = image_overlaps(np.zeros((0, *gt.shape[1:]), bool), np.zeros(0), gt, top_k=(10,))
    summary = summarize([perfect, empty], top_k=(10,), areas=("all",))
    assert summary.num_gt == 6
    assert summary.ar["AR@10"] == pytest.approx(50.0)


def test_merging_shards_equals_one_pass():
    rng = np.random.default_rng(2)
    states = [image_overlaps(_random_masks(rng, 8), rng.random(8), _random_masks(rng, 4)) for _ in range(9)]
    one = summarize(states)
    shards = [states[0:3], states[3:7], states[7:]]
    merged = summarize([s for shard in reversed(shards) for s in shard])
    assert merged.ar == pytest.approx(one.ar, nan_ok=True)


def test_area_buckets_split_parts_by_size():
    state = {"overlaps": np.array([[1.0, 0.0]], np.float32), "gt_areas": np.array([100, 5000])}
    summary = summarize([state], top_k=(1,), areas=("all", "small", "medium", "large"))
    assert summary.ar["AR_small@1"] == pytest.approx(100.0)   # 100 px <= 32^2
    assert summary.ar["AR_medium@1"] == pytest.approx(0.0)    # 5000 px in (32^2, 96^2]
    assert np.isnan(summary.ar["AR_large@1"])
    assert summary.ar["AR@1"] == pytest.approx(50.0)


def test_an_iou_of_exactly_065_is_a_hit_at_065():
    # proposal covers 13 of the part's 20 pixels and nothing else: IoU 0.65 exactly
    gt = np.zeros((1, 4, 5), bool)
    gt[0].flat[:20] = True
    proposal = np.zeros((1, 4, 5), bool)
    proposal[0].flat[:13] = True
    summary = summarize([image_overlaps(proposal, np.ones(1), gt, top_k=(1,))], top_k=(1,), areas=("all",))
    # hits at 0.50, 0.55, 0.60 and 0.65: 4 of 10 thresholds
    assert summary.recalls["AR@1"] == pytest.approx([100] * 4 + [0] * 6)
