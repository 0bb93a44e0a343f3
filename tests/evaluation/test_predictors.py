"""The predictors the evaluation scores: the strip baseline on hand-worked cases, records, models."""
from __future__ import annotations

import numpy as np
import pytest

from part_distillation.data.part_sample import PartSample
from part_distillation.evaluation.evaluator import PartEvaluator, Prediction, metrics
from part_distillation.evaluation.predictors import ColourKMeansPredictor, ModelPredictor, StripsPredictor


def _sample(parts: list[np.ndarray], key="a") -> PartSample:
    return PartSample(key=key, path=f"/x/{key}.png", object_class="thing", wnid="n1",
                      object_mask=np.any(parts, axis=0), part_masks=np.stack(parts),
                      part_ids=np.arange(len(parts), dtype=np.int64))


def _object() -> np.ndarray:
    mask = np.zeros((8, 10), dtype=bool)
    mask[2:6, 1:9] = True   # 4 rows x 8 columns: strips cut the columns
    return mask


def _halves(direction: str) -> list[np.ndarray]:
    obj = _object()
    first, second = obj.copy(), obj.copy()
    if direction == "left_right":
        first[:, 5:] = False
        second[:, :5] = False
    else:
        first[4:] = False
        second[:4] = False
    return [first, second]


def _scores(predictor, sample) -> dict:
    evaluator = PartEvaluator(num_parts=2, num_clusters=predictor.num_clusters, top_k=(1, 10),
                              ar_settings=predictor.ar_settings)
    evaluator.process(sample, predictor(sample))
    result = metrics(evaluator.states, top_k=(1, 10))["reference"]
    return {**result["one-label"], "C-mIoU": result["C-mIoU"], "bestIoU": result["bestIoU"]}


def test_strips_on_hand_worked_cases():
    left_right = _sample(_halves("left_right"))
    two = StripsPredictor(2)(left_right)
    assert two.masks.shape == (2, 8, 10) and two.clusters.tolist() == [0, 1]
    np.testing.assert_array_equal(two.masks[0], left_right.part_masks[0])   # columns 1-4
    # 2 strips = the two halves exactly: the top-1 proposal finds one of the 2 parts, the top 10 both
    scores = _scores(StripsPredictor(2), left_right)
    assert scores["AR@1"] == pytest.approx(50.0) and scores["AR@10"] == pytest.approx(100.0)
    assert scores["C-mIoU"] == pytest.approx(100.0)
    # 4 strips of 2 columns: IoU with a half = 8 / 16 = 0.5, a hit at threshold 0.50 only (1 of 10)
    assert _scores(StripsPredictor(4), left_right)["AR@10"] == pytest.approx(10.0)
    # top/bottom halves against column strips: IoU 8 / 24 = 1/3 < 0.5, no hit
    assert _scores(StripsPredictor(2), _sample(_halves("top_bottom")))["AR@10"] == pytest.approx(0.0)


def test_strips_of_an_empty_object_predict_nothing():
    sample = PartSample(key="e", path="/x/e.png", object_class="thing", wnid=None,
                        object_mask=np.zeros((5, 5), bool), part_masks=np.zeros((0, 5, 5), bool),
                        part_ids=np.zeros(0, np.int64))
    got = StripsPredictor(3)(sample)
    assert got.masks.shape == (0, 5, 5) and len(got.clusters) == 0


class _FakeModel:
    """A stand-in for ``inference.TrainedModel``: fixed proposals, records what it was given."""

    def __init__(self, kind, masks, class_wnids=("n0", "n1")):
        self.kind, self.masks, self.class_wnids = kind, masks, class_wnids
        self.parts_per_class = 2 if kind == "part_distillation" else None
        self.one_label = True
        self.calls = []

    def class_index(self, wnid):
        return self.class_wnids.index(wnid) if wnid in self.class_wnids else None

    def predict(self, image, object_mask, object_class=None, *, with_overlapping=False, to_original=True):
        self.calls.append((image.shape, object_mask.sum(), object_class))
        n = len(self.masks)
        return Prediction(masks=self.masks, scores=np.linspace(1, 0.5, n), clusters=np.arange(n, dtype=np.int64))


def test_model_predictor_gives_the_object_and_its_class_index():
    sample = _sample(_halves("left_right"))
    image = np.zeros((8, 10, 3), np.uint8)
    masks = np.stack(_halves("left_right") * 3)   # 6 proposals
    proposal = ModelPredictor(_FakeModel("proposal", masks), "proposal", num_clusters=4, load_image=lambda p: image)
    got = proposal(sample)
    assert got.clusters.tolist() == [0, 1, 2, 3, -1, -1]   # beyond the top 4: recall only
    assert proposal.model.calls == [((8, 10, 3), sample.object_mask.sum(), None)]
    pd = ModelPredictor(_FakeModel("part_distillation", masks[:2], class_wnids=("n0", "n1")), "pd",
                        load_image=lambda p: image)
    assert pd.num_clusters == 2
    pd(sample)
    assert pd.model.calls[-1][2] == 1   # wnid n1 -> training class 1
    unknown = ModelPredictor(_FakeModel("part_distillation", masks[:2], class_wnids=("n7",)), "pd",
                             load_image=lambda p: image)
    assert unknown(sample) is None and unknown.last_skip == "object_class_not_in_model"


def test_recall_only_masks_are_left_out_of_the_segmentation():
    sample = _sample(_halves("left_right"))
    masks = np.stack(_halves("left_right"))
    evaluator = PartEvaluator(num_parts=2, num_clusters=1, top_k=(10,))
    state = evaluator.process(sample, Prediction(masks=masks, scores=np.array([1.0, 0.5]),
                                                 clusters=np.array([0, -1])))
    # cluster 0 covers the left half (16 pixels of part 0); the right half is background for the segmentation
    assert state["confusion_strict"].tolist() == [[16, 0, 0], [0, 16, 48]]
    assert metrics([state], top_k=(10,))["strict"]["one-label"]["AR@10"] == pytest.approx(100.0)


def test_colour_kmeans_finds_parts_that_differ_in_colour_and_strips_do_not():
    sample = _sample(_halves("top_bottom"))   # strips cut the columns: they miss these parts
    image = np.zeros((8, 10, 3), np.uint8)
    image[sample.part_masks[0]] = (250, 20, 20)
    image[sample.part_masks[1]] = (20, 20, 250)
    predictor = ColourKMeansPredictor(2, load_image=lambda path: image)
    got = predictor(sample)
    assert predictor.label == "colour_kmeans" and sorted(got.clusters.tolist()) == [0, 1]
    assert not (got.masks & ~sample.object_mask).any()   # only the object's pixels are clustered
    assert sorted(got.masks.sum((1, 2)).tolist()) == [16, 16]
    assert _scores(predictor, sample)["bestIoU"] == pytest.approx(100.0)
    assert _scores(StripsPredictor(2), sample)["bestIoU"] == pytest.approx(100 / 3)
    with pytest.raises(ValueError, match="image of size"):
        ColourKMeansPredictor(2, load_image=lambda path: image[:4])(sample)


def test_colour_kmeans_is_proposal_type_and_clusters_at_the_test_resolution():
    from part_distillation.data.frame import ImageFrame

    parts = _halves("top_bottom")
    top = PartSample(key="img/0", path="/x/img.png", object_class="thing", wnid="n1", object_mask=parts[0],
                     part_masks=parts[0][None], part_ids=np.array([0]))
    bottom = PartSample(key="img/1", path="/x/img.png", object_class="thing", wnid="n1", object_mask=parts[1],
                        part_masks=parts[1][None], part_ids=np.array([1]))
    image = np.zeros((8, 10, 3), np.uint8)
    image[parts[0]], image[parts[1]] = (250, 20, 20), (20, 20, 250)
    predictor = ColourKMeansPredictor(2, load_image=lambda path: image)
    assert predictor.proposal_type
    frame = ImageFrame.fit((8, 10), size=20)   # x 2 per axis
    got = predictor(top, frame)
    assert got.masks.shape[1:] == (16, 20) and got.masks.any(0).sum() == 4 * parts[0].sum()
    # an image of two objects: clustered once more on their union, where colour splits the two
    union = predictor.image_prediction([top, bottom], [predictor(top), predictor(bottom)])
    assert sorted(union.masks.sum((1, 2)).tolist()) == [16, 16]
    evaluator = PartEvaluator(num_parts=2, num_clusters=2, top_k=(1, 10), ar_settings=predictor.ar_settings)
    states = evaluator.process_image([top, bottom], [predictor(top), predictor(bottom)], union)
    # bestIoU is per object, of its own prediction: one colour, so k-means cuts it by position
    # into two 4 x 4 halves (IoU 0.5), not the union's clusters (which match each object exactly)
    assert "best_iou" not in states[0] and [s["best_iou"] for s in states[1:]] == pytest.approx([0.5, 0.5])
    assert metrics(states, top_k=(1, 10))["strict"]["overlapping"]["AR@10"] == pytest.approx(100.0)
