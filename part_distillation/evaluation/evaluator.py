"""The part evaluator: per-image states, then both protocols' metrics from them.

Shaped like detectron2's ``DatasetEvaluator`` (``reset`` / ``process`` / ``evaluate``),
with the per-image state returned by ``process`` so a stage can write it as a record
(evaluation is then sharded and resumable) and :func:`metrics` a pure function of states.

Two protocols, always reported side by side (PIPELINE.md "Evaluation"):

``reference``
    The released code's, for comparison with published figures: proposals whose IoU with
    every ground-truth part is <= 0.001 are dropped before AR, and part segments whose
    IoU with every ground-truth part is <= 0.1 are dropped before mIoU (both use the
    ground truth to clean the predictions), and clusters are matched to parts on the
    same split they are evaluated on.
``strict``
    No ground-truth information beyond the object mask: no filters, and clusters are
    matched on a split disjoint from the evaluation split (``match_states``); without
    one, strict mIoU is not reported (NaN) rather than silently matched on the test data.

Both also report ``bestIoU`` (percent, as the other metrics): each true part matched to
the predicted segment that overlaps it best, the mean over an object's parts, then over
objects (``segments.best_match_iou``; segments: the masks with a cluster, or every mask of
a proposal-only prediction). It needs no matching and no filter, so it is the same in
both protocols: how well the segments cut the object, whatever their cluster ids.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from part_distillation.data.part_sample import PartSample
from part_distillation.evaluation import part_miou, proposals
from part_distillation.evaluation.segments import best_match_iou
from part_distillation.masks import mask_iou

#: The reference's ground-truth IoU filters (released evaluation): proposals, part segments.
REFERENCE_PROPOSAL_MIN_GT_IOU = 0.001
REFERENCE_SEGMENT_MIN_GT_IOU = 0.1
PROTOCOLS = ("reference", "strict")


@dataclass(frozen=True)
class Prediction:
    """A model's (or a stage's records') output for one sample, at the sample's size."""

    masks: np.ndarray                    #: bool (N, H, W)
    scores: np.ndarray                   #: float (N,)
    #: int (N,) part cluster per mask (0..K-1; -1: scored for recall only); None: proposals only
    clusters: np.ndarray | None = None


def overlaps_ground_truth(masks: np.ndarray, gt_masks: np.ndarray, min_iou: float) -> np.ndarray:
    """bool (N,): masks whose best IoU with any ground-truth part is > ``min_iou`` (the leak)."""
    if len(masks) == 0 or len(gt_masks) == 0:
        return np.zeros(len(masks), dtype=bool)
    return mask_iou(masks, gt_masks).max(axis=1) > min_iou


class PartEvaluator:
    """Proposal AR and part-cluster confusion per image, for both protocols.

    ``num_clusters``: the model's part clusters per object class (K);
    ``num_parts``: the dataset's part classes (sample part ids are in [0, num_parts)).
    """

    def __init__(self, num_parts: int, num_clusters: int | None = None,
                 top_k: Sequence[int] = proposals.TOP_K):
        self.num_parts, self.num_clusters, self.top_k = int(num_parts), num_clusters, tuple(top_k)
        self.reset()

    def reset(self) -> None:
        self.states: list[dict] = []

    def process(self, sample: PartSample, prediction: Prediction) -> dict:
        """The state of one image (JSON/array values, ready to be written as a record)."""
        gt = np.asarray(sample.part_masks, dtype=bool)
        masks = np.asarray(prediction.masks, dtype=bool).reshape(-1, *sample.object_mask.shape)
        scores = np.asarray(prediction.scores, dtype=np.float64)
        if (np.asarray(sample.part_ids) >= self.num_parts).any():
            raise ValueError(f"sample {sample.key}: part ids {sorted(set(sample.part_ids))} outside "
                             f"[0, {self.num_parts})")
        keep_ref = overlaps_ground_truth(masks, gt, REFERENCE_PROPOSAL_MIN_GT_IOU)
        state = {"key": sample.key, "object_class": sample.object_class,
                 "ar_strict": proposals.image_overlaps(masks, scores, gt, self.top_k),
                 "ar_reference": proposals.image_overlaps(masks[keep_ref], scores[keep_ref], gt, self.top_k)}
        segments = masks if prediction.clusters is None else masks[np.asarray(prediction.clusters) >= 0]
        if len(gt):
            state["best_iou"] = best_match_iou(gt, segments)
        if prediction.clusters is not None:
            if self.num_clusters is None:
                raise ValueError("PartEvaluator needs num_clusters to score part clusters")
            clusters = np.asarray(prediction.clusters, dtype=np.int64)
            segment = clusters >= 0  # -1: a proposal scored for recall only
            keep_seg = segment & overlaps_ground_truth(masks, gt, REFERENCE_SEGMENT_MIN_GT_IOU)
            state["confusion_strict"] = part_miou.image_confusion(
                masks[segment], clusters[segment], gt, sample.part_ids, self.num_clusters, self.num_parts)
            state["confusion_reference"] = part_miou.image_confusion(
                masks[keep_seg], clusters[keep_seg], gt, sample.part_ids, self.num_clusters, self.num_parts)
        self.states.append(state)
        return state

    def evaluate(self, match_states: Iterable[Mapping] | None = None) -> dict:
        return metrics(self.states, match_states, top_k=self.top_k)


def _confusions(states: Iterable[Mapping], protocol: str) -> dict[str, np.ndarray]:
    key = f"confusion_{protocol}"
    return part_miou.merge({s["object_class"]: s[key]} for s in states if key in s)


def mean_best_iou(states: Iterable[Mapping]) -> float:
    """Mean best-match IoU over the states that have one, in percent (NaN: none)."""
    values = [float(s["best_iou"]) for s in states if s.get("best_iou") is not None]
    return 100.0 * float(np.mean(values)) if values else float("nan")


def metrics(states: Sequence[Mapping], match_states: Iterable[Mapping] | None = None,
            top_k: Sequence[int] = proposals.TOP_K, mapping: str = "majority") -> dict:
    """Both protocols' AR@k and mIoU from per-image states (any sharding, any order).

    ``match_states``: states of a disjoint split for the strict protocol's matching.
    """
    states = list(states)
    out: dict[str, dict] = {}
    for protocol in PROTOCOLS:
        ar = proposals.summarize([s[f"ar_{protocol}"] for s in states], top_k=top_k, areas=("all",))
        result: dict = dict(ar.ar)
        result["bestIoU"] = mean_best_iou(states)
        evaluation = _confusions(states, protocol)
        if evaluation:
            if protocol == "reference":
                matching = evaluation
            else:
                matching = _confusions(match_states, protocol) if match_states is not None else {}
            if matching:
                mappings = part_miou.match_clusters(matching, how=mapping)
                unmatched = sorted(set(evaluation) - set(mappings))
                for c in unmatched:  # no matching data: every cluster counts as never predicted -> part 0
                    mappings[c] = np.zeros(evaluation[c].shape[0] - 1, dtype=np.int64)
                mapped = {c: part_miou.apply_mapping(m, mappings[c]) for c, m in evaluation.items()}
                summary = part_miou.summarize(mapped)
                result.update(summary.as_dict())
                result["per_class_mIoU"] = summary.per_class
                if unmatched:
                    result["classes_without_matching"] = unmatched
            else:
                result.update({"C-mIoU": float("nan"), "A-mIoU": float("nan"),
                               "note": "no disjoint matching split given: strict mIoU not computed"})
        out[protocol] = result
    return out
