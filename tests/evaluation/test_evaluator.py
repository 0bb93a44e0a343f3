"""Both protocols from per-image states: the reference's ground-truth filters and matching split."""
import math

import numpy as np
import pytest

from part_distillation.data.part_sample import PartSample
from part_distillation.evaluation.evaluator import PartEvaluator, Prediction, metrics


def _box(shape, y0, y1, x0, x1):
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


SHAPE = (10, 10)
LEFT, RIGHT = _box(SHAPE, 0, 10, 0, 5), _box(SHAPE, 0, 10, 5, 10)


def _sample(key, object_class="fish"):
    return PartSample(key=key, path=f"{key}.jpg", object_class=object_class, wnid=None,
                      object_mask=LEFT | RIGHT, part_masks=np.stack([LEFT, RIGHT]), part_ids=np.array([0, 1]))


def test_reference_drops_proposals_that_miss_every_part_before_ar():
    # The top-scoring proposal lies on no part (IoU 0): it takes the only AR@1 slot under
    # the strict protocol; the reference protocol drops it first, using the ground truth.
    evaluator = PartEvaluator(num_parts=2, top_k=(1,))
    evaluator.process(_sample("a"), Prediction(masks=np.stack([np.zeros(SHAPE, bool), LEFT]),
                                               scores=np.array([0.9, 0.5])))
    result = evaluator.evaluate()
    assert result["strict"]["AR@1"] == pytest.approx(0.0)
    assert result["reference"]["AR@1"] == pytest.approx(50.0)   # LEFT found, RIGHT missed


def test_reference_matches_on_the_evaluation_split_strict_needs_another():
    evaluator = PartEvaluator(num_parts=2, num_clusters=2)
    # clusters swapped relative to part ids: cluster 0 on RIGHT, cluster 1 on LEFT
    evaluator.process(_sample("a"), Prediction(masks=np.stack([RIGHT, LEFT]), scores=np.ones(2),
                                               clusters=np.array([0, 1])))
    result = evaluator.evaluate()
    assert result["reference"]["C-mIoU"] == pytest.approx(100.0)
    assert math.isnan(result["strict"]["C-mIoU"]) and "disjoint" in result["strict"]["note"]
    # a matching split where the model used the clusters the other way round
    other = PartEvaluator(num_parts=2, num_clusters=2)
    other.process(_sample("b"), Prediction(masks=np.stack([LEFT, RIGHT]), scores=np.ones(2),
                                           clusters=np.array([0, 1])))
    strict = evaluator.evaluate(match_states=other.states)["strict"]
    assert strict["C-mIoU"] == pytest.approx(0.0)   # mapping learnt elsewhere does not fit


def test_reference_drops_segments_that_barely_touch_the_parts_before_miou():
    # A segment outside the object (IoU 0 with every part) labelled cluster 1, which
    # majority-votes to part 0 (its row is all background): under the strict protocol it
    # is a false positive of part 0; the reference protocol removes it first.
    outside = _box((12, 12), 10, 12, 10, 12)
    big = lambda m: np.pad(m, ((0, 2), (0, 2)))
    sample = PartSample(key="a", path="a.jpg", object_class="fish", wnid=None, object_mask=big(LEFT | RIGHT),
                        part_masks=np.stack([big(LEFT), big(RIGHT)]), part_ids=np.array([0, 1]))
    evaluator = PartEvaluator(num_parts=2, num_clusters=2)
    evaluator.process(sample, Prediction(masks=np.stack([big(LEFT), outside]), scores=np.ones(2),
                                         clusters=np.array([0, 1])))
    reference = evaluator.evaluate()["reference"]
    # reference: cluster 0 -> part 0 perfect; part 1 missed -> (100 + 0) / 2
    assert reference["C-mIoU"] == pytest.approx(50.0)
    strict = metrics(evaluator.states, match_states=evaluator.states)["strict"]
    # strict: the outside segment maps to part 0 (all-zero row) -> part 0 IoU 50/54
    assert strict["C-mIoU"] == pytest.approx((100 * 50 / 54 + 0) / 2)


def test_sharded_states_give_the_same_metrics():
    rng = np.random.default_rng(0)
    evaluator = PartEvaluator(num_parts=2, num_clusters=3, top_k=(1, 10))
    for i in range(8):
        masks = rng.random((4, *SHAPE)) > 0.5
        evaluator.process(_sample(str(i), object_class=f"c{i % 3}"),
                          Prediction(masks=masks, scores=rng.random(4), clusters=rng.integers(0, 3, 4)))
    whole = metrics(evaluator.states, match_states=evaluator.states, top_k=(1, 10))
    shards = evaluator.states[5:] + evaluator.states[:5]
    again = metrics(shards, match_states=shards, top_k=(1, 10))
    for protocol in ("reference", "strict"):
        assert again[protocol]["AR@10"] == pytest.approx(whole[protocol]["AR@10"])
        assert again[protocol]["C-mIoU"] == pytest.approx(whole[protocol]["C-mIoU"])


def test_part_ids_outside_the_dataset_are_refused():
    evaluator = PartEvaluator(num_parts=1)
    with pytest.raises(ValueError, match="outside"):
        evaluator.process(_sample("a"), Prediction(masks=np.zeros((0, *SHAPE), bool), scores=np.zeros(0)))


def test_best_match_iou_takes_each_part_to_its_best_segment_whatever_the_clusters():
    top = _box(SHAPE, 0, 5, 0, 10)
    evaluator = PartEvaluator(num_parts=2, num_clusters=2, top_k=(1,))
    # LEFT exactly (IoU 1); RIGHT's best segment is the top half (IoU 25 / 75); recall-only masks do not count
    evaluator.process(_sample("a"), Prediction(masks=np.stack([LEFT, top, RIGHT]), scores=np.ones(3),
                                               clusters=np.array([1, 1, -1])))
    evaluator.process(_sample("b"), Prediction(masks=np.zeros((0, *SHAPE), bool), scores=np.zeros(0),
                                               clusters=np.zeros(0, np.int64)))
    assert [s["best_iou"] for s in evaluator.states] == pytest.approx([(1 + 1 / 3) / 2, 0.0])
    result = evaluator.evaluate()
    assert result["reference"]["bestIoU"] == result["strict"]["bestIoU"] == pytest.approx(100 * (2 / 3) / 2)
    proposals_only = PartEvaluator(num_parts=2, top_k=(1,))   # no clusters: every mask is a segment
    proposals_only.process(_sample("c"), Prediction(masks=np.stack([LEFT, RIGHT]), scores=np.ones(2)))
    assert proposals_only.evaluate()["strict"]["bestIoU"] == pytest.approx(100.0)
    assert math.isnan(metrics([])["strict"]["bestIoU"])
