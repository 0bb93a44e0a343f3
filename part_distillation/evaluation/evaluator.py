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
    same split they are evaluated on. As the released model code does it, the 0.1 filter
    drops cluster segments for the matching pass, but in the evaluation pass it drops the
    *part* segments: clusters are mapped to parts and merged per part first, then a merged
    part with IoU <= 0.1 to every ground-truth part is dropped. That needs the mapping,
    known only once every image is seen, so it is applied at merge time to each image's
    unfiltered clusters x parts confusion (which holds every area and intersection the
    IoUs need): the per-image state stays mapping-free and evaluation shardable.
``strict``
    No ground-truth information beyond the object mask: no filters, and clusters are
    matched on a split disjoint from the evaluation split (``match_states``); without
    one, strict mIoU is not reported (NaN) rather than silently matched on the test data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from part_distillation.data.part_sample import PartSample
from part_distillation.evaluation import part_miou, proposals
from part_distillation.masks import mask_iou

#: The reference's ground-truth IoU filters (released evaluation): proposals, part segments.
REFERENCE_PROPOSAL_MIN_GT_IOU = 0.001
REFERENCE_SEGMENT_MIN_GT_IOU = 0.1
PROTOCOLS = ("reference", "strict")
#: What keys the part mIoU (a confusion matrix and a majority vote per key): ``imagenet_class``
#: the sample's ``object_class`` (PartImageNet: the image's wnid, as the reference);
#: ``supercategory`` its coarser group (PartImageNet's 11 super-categories; the object class
#: for datasets without one).
OBJECT_KEYS = ("imagenet_class", "supercategory")


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
                 "supercategory": sample.supercategory or sample.object_class,
                 "ar_strict": proposals.image_overlaps(masks, scores, gt, self.top_k),
                 "ar_reference": proposals.image_overlaps(masks[keep_ref], scores[keep_ref], gt, self.top_k)}
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


def object_key_of(state: Mapping, object_key: str = "imagenet_class") -> str:
    """The object class a state counts under for ``object_key`` (see :data:`OBJECT_KEYS`)."""
    if object_key not in OBJECT_KEYS:
        raise ValueError(f"unknown object key {object_key!r}; expected one of {list(OBJECT_KEYS)}")
    if object_key == "supercategory":
        return state.get("supercategory") or state["object_class"]
    return state["object_class"]


def _confusions(states: Iterable[Mapping], protocol: str, object_key: str = "imagenet_class"
                ) -> dict[str, np.ndarray]:
    key = f"confusion_{protocol}"
    return part_miou.merge({object_key_of(s, object_key): s[key]} for s in states if key in s)


def metrics(states: Sequence[Mapping], match_states: Iterable[Mapping] | None = None,
            top_k: Sequence[int] = proposals.TOP_K, mapping: str = "majority",
            object_key: str = "imagenet_class") -> dict:
    """Both protocols' AR@k and mIoU from per-image states (any sharding, any order).

    ``match_states``: states of a disjoint split for the strict protocol's matching;
    ``object_key``: what keys the confusion matrices and the majority vote
    (:data:`OBJECT_KEYS`; the result says which under ``"object_key"``).
    """
    states = list(states)
    if match_states is not None:
        match_states = list(match_states)
    out: dict[str, dict] = {}
    for protocol in PROTOCOLS:
        ar = proposals.summarize([s[f"ar_{protocol}"] for s in states], top_k=top_k, areas=("all",))
        result: dict = dict(ar.ar)
        evaluation = _confusions(states, protocol, object_key)
        if evaluation:
            if protocol == "reference":
                matching = evaluation
            else:
                matching = _confusions(match_states, protocol, object_key) if match_states is not None else {}
            if matching:
                mappings = part_miou.match_clusters(matching, how=mapping)
                unmatched = sorted(set(evaluation) - set(mappings))
                for c in unmatched:  # no matching data: every cluster counts as never predicted -> part 0
                    mappings[c] = np.zeros(evaluation[c].shape[0] - 1, dtype=np.int64)
                if protocol == "reference":  # map, merge per part, then the 0.1 filter, image by image
                    mapped = part_miou.merge(
                        {object_key_of(s, object_key): part_miou.apply_mapping_filtered(
                            s["confusion_strict"], mappings[object_key_of(s, object_key)],
                            REFERENCE_SEGMENT_MIN_GT_IOU)} for s in states if "confusion_strict" in s)
                else:
                    mapped = {c: part_miou.apply_mapping(m, mappings[c]) for c, m in evaluation.items()}
                summary = part_miou.summarize(mapped)
                result.update(summary.as_dict())
                result["per_class_mIoU"] = summary.per_class
                if summary.classes_without_prediction:  # why C-mIoPred is undefined (as the reference's)
                    result["classes_without_prediction"] = summary.classes_without_prediction
                if unmatched:
                    result["classes_without_matching"] = unmatched
            else:
                result.update({"C-mIoU": float("nan"), "A-mIoU": float("nan"),
                               "note": "no disjoint matching split given: strict mIoU not computed"})
        out[protocol] = result
    out["object_key"] = object_key
    out["skipped"] = skip_counts(states)
    return out


def skip_counts(states: Iterable[Mapping]) -> dict[str, int]:
    """How many samples each skip reason left without a prediction (scored as finding nothing)."""
    counts: dict[str, int] = {}
    for state in states:
        if state.get("skip"):
            counts[state["skip"]] = counts.get(state["skip"], 0) + 1
    return dict(sorted(counts.items()))
