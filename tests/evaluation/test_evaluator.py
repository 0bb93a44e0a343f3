"""Both protocols from per-image states: the reference's ground-truth filters and matching split."""
import math

import numpy as np
import pytest

from part_distillation.data.part_sample import PartSample
from part_distillation.evaluation.evaluator import (PartEvaluator, Prediction, image_groups, metrics,
                                                    union_sample)


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
    assert result["strict"]["one-label"]["AR@1"] == pytest.approx(0.0)
    assert result["reference"]["one-label"]["AR@1"] == pytest.approx(50.0)   # LEFT found, RIGHT missed


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


def test_reference_filters_part_segments_after_mapping_and_merging():
    # A segment outside the object (IoU 0 with every part) labelled cluster 1. Matching pass:
    # the 0.1 filter drops it, so cluster 1's row is empty and it maps to part 0. Evaluation
    # pass, as the released model code: clusters mapped and merged per part first, then the
    # filter: part 0 = LEFT + the outside segment, IoU 50/54 > 0.1, kept whole.
    outside = _box((12, 12), 10, 12, 10, 12)
    big = lambda m: np.pad(m, ((0, 2), (0, 2)))
    sample = PartSample(key="a", path="a.jpg", object_class="fish", wnid=None, object_mask=big(LEFT | RIGHT),
                        part_masks=np.stack([big(LEFT), big(RIGHT)]), part_ids=np.array([0, 1]))
    evaluator = PartEvaluator(num_parts=2, num_clusters=2)
    evaluator.process(sample, Prediction(masks=np.stack([big(LEFT), outside]), scores=np.ones(2),
                                         clusters=np.array([0, 1])))
    reference = evaluator.evaluate()["reference"]
    assert reference["C-mIoU"] == pytest.approx((100 * 50 / 54 + 0) / 2)
    strict = metrics(evaluator.states, match_states=evaluator.states)["strict"]
    assert strict["C-mIoU"] == pytest.approx((100 * 50 / 54 + 0) / 2)


def test_reference_drops_a_merged_part_that_misses_every_part():
    # cluster 0 on LEFT (-> part 0) in image a; in image b only the outside segment, cluster 0:
    # merged part 0 of image b has IoU 0 with every part: dropped, part 0 stays perfect.
    outside = _box((12, 12), 10, 12, 10, 12)
    big = lambda m: np.pad(m, ((0, 2), (0, 2)))
    evaluator = PartEvaluator(num_parts=2, num_clusters=2)
    for key, mask in (("a", big(LEFT)), ("b", outside)):
        sample = PartSample(key=key, path=f"{key}.jpg", object_class="fish", wnid=None,
                            object_mask=big(LEFT | RIGHT), part_masks=np.stack([big(LEFT), big(RIGHT)]),
                            part_ids=np.array([0, 1]))
        evaluator.process(sample, Prediction(masks=mask[None], scores=np.ones(1), clusters=np.array([0])))
    reference = evaluator.evaluate()["reference"]
    assert reference["per_class_mIoU"]["fish"] == pytest.approx((100 * 50 / 100 + 0) / 2)


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
        assert again[protocol]["one-label"]["AR@10"] == pytest.approx(whole[protocol]["one-label"]["AR@10"])
        assert again[protocol]["C-mIoU"] == pytest.approx(whole[protocol]["C-mIoU"])


def test_part_ids_outside_the_dataset_are_refused():
    evaluator = PartEvaluator(num_parts=1)
    with pytest.raises(ValueError, match="outside"):
        evaluator.process(_sample("a"), Prediction(masks=np.zeros((0, *SHAPE), bool), scores=np.zeros(0)))


def test_an_image_of_several_objects_has_one_ar_state_and_a_confusion_per_object():
    """Two fish of one image, each one half: per object the top-1 proposal finds its fish (AR@1 100
    each); per image the two compete for one slot (AR@1 50), while each object keeps its confusion."""
    left = PartSample(key="img/0", path="img.jpg", object_class="fish", wnid=None, object_mask=LEFT,
                      part_masks=LEFT[None], part_ids=np.array([0]))
    right = PartSample(key="img/1", path="img.jpg", object_class="fish", wnid=None, object_mask=RIGHT,
                       part_masks=RIGHT[None], part_ids=np.array([0]))
    other = _sample("other")
    assert [[s.key for s in g] for g in image_groups([left, right, other])] == [["img/0", "img/1"], ["other"]]
    union = union_sample([left, right])
    assert union.key == "image:img.jpg" and union.object_mask.all() and union.part_masks.shape == (2, *SHAPE)
    predictions = [Prediction(masks=m[None], scores=np.ones(1), clusters=np.zeros(1, np.int64)) for m in (LEFT, RIGHT)]
    per_object = PartEvaluator(num_parts=1, num_clusters=1, top_k=(1,))
    for sample, prediction in zip((left, right), predictions):
        per_object.process(sample, prediction)
    assert metrics(per_object.states, top_k=(1,))["strict"]["one-label"]["AR@1"] == pytest.approx(100.0)
    per_image = PartEvaluator(num_parts=1, num_clusters=1, top_k=(1,))
    states = per_image.process_image([left, right], predictions)   # pooled: no image prediction
    assert [s["key"] for s in states] == ["image:img.jpg", "img/0", "img/1"]
    assert "confusion_strict" not in states[0] and all("ar_strict" not in s for s in states[1:])
    result = metrics(states, top_k=(1,))
    assert result["strict"]["one-label"]["AR@1"] == pytest.approx(50.0)
    assert result["reference"]["C-mIoU"] == metrics(per_object.states, top_k=(1,))["reference"]["C-mIoU"]
    # a proposal predictor's own prediction on the union: both AR settings
    both = PartEvaluator(num_parts=1, num_clusters=1, top_k=(1,), ar_settings=("overlapping", "one-label"))
    image = Prediction(masks=np.stack([LEFT, RIGHT]), scores=np.array([0.6, 0.5]),
                       overlapping=Prediction(masks=np.stack([LEFT | RIGHT, LEFT]), scores=np.array([0.9, 0.5])))
    result = metrics(both.process_image([left, right], predictions, image), top_k=(1,))["strict"]
    assert result["one-label"]["AR@1"] == pytest.approx(50.0)
    assert result["overlapping"]["AR@1"] == pytest.approx(5.0)   # both fish as one: IoU 0.5 with one of them
    with pytest.raises(ValueError, match="ar_settings"):
        PartEvaluator(num_parts=1, ar_settings=("one_label",))


def test_the_instances_of_a_cityscapes_image_are_one_image_for_ar(tmp_path):
    from PIL import Image

    from part_distillation.data.cityscapes_part import CityscapesPartDataset

    city = tmp_path / "gtFinePanopticParts" / "val" / "lindau"
    city.mkdir(parents=True)
    for frame, car in (("000019", 2600201), ("000020", 2600301)):
        labels = np.full((4, 6), 7, np.int32)
        labels[0:2, 0:2] = 2400101   # person 1: torso
        labels[2:4, 3:6] = car       # a car: window
        Image.fromarray(labels, mode="I").save(city / f"lindau_000000_{frame}_gtFinePanopticParts.tif")
    groups = list(image_groups(CityscapesPartDataset(tmp_path, "val")))
    assert [[s.key for s in g] for g in groups] == [["lindau_000000_000019/24_1", "lindau_000000_000019/26_2"],
                                                    ["lindau_000000_000020/24_1", "lindau_000000_000020/26_3"]]
    union = union_sample(groups[0])
    assert union.object_mask.sum() == 4 + 6 and union.part_masks.shape == (2, 4, 6)


def test_miou_is_keyed_by_imagenet_class_supercategory_on_request():
    # Two ImageNet classes of one super-category whose cluster 0 means different parts:
    # keyed by class each cluster maps to its own part; pooled, class b's are mislabelled.
    evaluator = PartEvaluator(num_parts=2, num_clusters=2)
    for key, wnid, order in [("a1", "n001", [LEFT, RIGHT]), ("a2", "n001", [LEFT, RIGHT]),
                             ("b1", "n002", [RIGHT, LEFT])]:
        sample = PartSample(key=key, path=f"{key}.jpg", object_class=wnid, wnid=wnid, object_mask=LEFT | RIGHT,
                            part_masks=np.stack([LEFT, RIGHT]), part_ids=np.array([0, 1]),
                            supercategory="Quadruped")
        evaluator.process(sample, Prediction(masks=np.stack(order), scores=np.ones(2), clusters=np.array([0, 1])))
    by_class = metrics(evaluator.states)
    assert by_class["object_key"] == "imagenet_class"
    assert by_class["reference"]["C-mIoU"] == pytest.approx(100.0)
    assert set(by_class["reference"]["per_class_mIoU"]) == {"n001", "n002"}
    pooled = metrics(evaluator.states, object_key="supercategory")
    assert pooled["reference"]["C-mIoU"] == pytest.approx(50.0)   # per part: tp 100 of 150 predicted, 150 true
    assert set(pooled["reference"]["per_class_mIoU"]) == {"Quadruped"}


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
