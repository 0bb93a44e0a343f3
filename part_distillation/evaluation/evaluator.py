"""The part evaluator: per-image states, then both protocols' metrics from them.

Shaped like detectron2's ``DatasetEvaluator`` (``reset`` / ``process`` / ``evaluate``),
with the per-image state returned by ``process`` so a stage can write it as a record
(evaluation is then sharded and resumable) and :func:`metrics` a pure function of states.

Two protocols, always reported side by side (docs/evaluation.md#protocols):

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

Proposal AR comes in two settings (docs/evaluation.md#protocols), reported side by side for
proposal-type predictors: ``overlapping`` (the top-k masks as they are: the published
stage-one AR) and ``one-label`` (one label per pixel); other predictors have their masks
as they are, labelled ``one-label``. AR is per image: all objects of an image together,
their parts the ground truth and one prediction on the union of their masks (proposals)
or their predictions pooled (class-conditioned models), top-k per image, as the reference
scores Pascal-Part and Cityscapes-Part; mIoU stays per object (:meth:`PartEvaluator.process_image`).

Both protocols also report ``bestIoU`` (percent, as the other metrics): each true part
matched to the predicted segment that overlaps it best, the mean over an object's parts,
then over objects (``segments.best_match_iou``). It is per object, as mIoU (an object's
own prediction, never the one on the union of an image's objects), and scores the masks
mIoU scores: those with a cluster (a proposal model: its top ``num_clusters`` one-label
masks; the rest, -1, count for recall only), or every mask of a proposal-only prediction.
It needs no matching and no filter, so it is the same in both protocols: how well the
segments cut the object, whatever their cluster ids.
"""
from __future__ import annotations

from dataclasses import replace
from itertools import groupby
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

from part_distillation.data.part_sample import PartSample
from part_distillation.evaluation import part_miou, proposals
from part_distillation.evaluation.segments import best_match_iou, mean_best_match_iou
from part_distillation.masks import mask_iou
from part_distillation.prediction import AR_SETTINGS, Prediction  # noqa: F401 (evaluation's input type)

#: The reference's ground-truth IoU filters (released evaluation): proposals, part segments.
REFERENCE_PROPOSAL_MIN_GT_IOU = 0.001
REFERENCE_SEGMENT_MIN_GT_IOU = 0.1
PROTOCOLS = ("reference", "strict")
#: The AR setting of a predictor whose masks are its only set (part segmentations).
DEFAULT_AR_SETTINGS = ("one-label",)
#: What keys the part mIoU (a confusion matrix and a majority vote per key): ``imagenet_class``
#: the sample's ``object_class`` (PartImageNet: the image's wnid, as the reference);
#: ``supercategory`` its coarser group (PartImageNet's 11 super-categories; the object class
#: for datasets without one).
OBJECT_KEYS = ("imagenet_class", "supercategory")


def image_key(sample: PartSample) -> str:
    """The image a sample (an object) belongs to: its image file."""
    return f"image:{sample.path}"


def image_groups(samples: Iterable[PartSample]) -> Iterator[list[PartSample]]:
    """The samples of each image together (the datasets yield the objects of an image in a row)."""
    for _, group in groupby(samples, key=lambda s: s.path):
        yield list(group)


def union_sample(samples: Sequence[PartSample]) -> PartSample:
    """All objects of one image as one sample: object mask = their union, every object's parts
    (each object's own, not merged across objects); key :func:`image_key`. Object class and
    synset are the first object's (a proposal predictor uses neither)."""
    first = samples[0]
    if len(samples) == 1:
        return first
    return replace(first, key=image_key(first), object_mask=np.any([s.object_mask for s in samples], axis=0),
                   part_masks=np.concatenate([np.asarray(s.part_masks, dtype=bool) for s in samples]),
                   part_ids=np.concatenate([np.asarray(s.part_ids, dtype=np.int64) for s in samples]))


def pooled_prediction(predictions: Sequence[Prediction]) -> Prediction:
    """The per-object predictions of one image as one set (per-image AR of a class-conditioned model)."""
    if len(predictions) == 1:
        return predictions[0]
    return Prediction(masks=np.concatenate([np.asarray(p.masks, dtype=bool) for p in predictions]),
                      scores=np.concatenate([np.asarray(p.scores, dtype=np.float64) for p in predictions]))


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
                 top_k: Sequence[int] = proposals.TOP_K, ar_settings: Sequence[str] = DEFAULT_AR_SETTINGS):
        self.num_parts, self.num_clusters, self.top_k = int(num_parts), num_clusters, tuple(top_k)
        unknown = [s for s in ar_settings if s not in AR_SETTINGS]
        if unknown or not ar_settings:
            raise ValueError(f"ar_settings must be among {AR_SETTINGS}, got {list(ar_settings)}")
        self.ar_settings = tuple(ar_settings)
        self.reset()

    def reset(self) -> None:
        self.states: list[dict] = []

    def process(self, sample: PartSample, prediction: Prediction) -> dict:
        """The state of one image holding one object (JSON/array values, ready to be written as a record)."""
        return self.process_image([sample], [prediction])[0]

    def process_image(self, samples: Sequence[PartSample], predictions: Sequence[Prediction],
                      image_prediction: Prediction | None = None) -> list[dict]:
        """The states of one image's objects (``samples``, each with its ``predictions``).

        mIoU is per object (a confusion per sample); AR is per image: ground truth = every
        object's parts, predictions = ``image_prediction`` (made on the union of the object
        masks: :func:`union_sample`), default the objects' predictions pooled. One object:
        one state holding both, keyed by the sample; several: an image state (AR, keyed by
        :func:`image_key`) then a state per object (confusions, best-match IoU).
        """
        samples, predictions = list(samples), list(predictions)
        if len(samples) != len(predictions) or not samples:
            raise ValueError(f"{len(samples)} samples and {len(predictions)} predictions of one image")
        for sample in samples:
            if (np.asarray(sample.part_ids) >= self.num_parts).any():
                raise ValueError(f"sample {sample.key}: part ids {sorted(set(sample.part_ids))} outside "
                                 f"[0, {self.num_parts})")
        image = union_sample(samples)
        ar = self._ar_state(image, image_prediction or pooled_prediction(predictions))
        objects = [{"key": s.key, "object_class": s.object_class,
                    "supercategory": s.supercategory or s.object_class, **self._object_state(s, p)}
                   for s, p in zip(samples, predictions)]
        states = [{**objects[0], **ar}] if len(samples) == 1 else [{"key": image.key, **ar}, *objects]
        self.states.extend(states)
        return states

    def _ar_state(self, sample: PartSample, prediction: Prediction) -> dict:
        gt = np.asarray(sample.part_masks, dtype=bool)
        state: dict = {"ar_strict": {}, "ar_reference": {}}
        for setting in self.ar_settings:
            masks, scores = prediction.ar_masks(setting)
            masks = masks.reshape(-1, *sample.object_mask.shape)
            keep_ref = overlaps_ground_truth(masks, gt, REFERENCE_PROPOSAL_MIN_GT_IOU)
            state["ar_strict"][setting] = proposals.image_overlaps(masks, scores, gt, self.top_k)
            state["ar_reference"][setting] = proposals.image_overlaps(masks[keep_ref], scores[keep_ref], gt,
                                                                      self.top_k)
        return state

    def _object_state(self, sample: PartSample, prediction: Prediction) -> dict:
        """One object's best-match IoU and, for a prediction with clusters, its confusions."""
        gt = np.asarray(sample.part_masks, dtype=bool)
        masks = np.asarray(prediction.masks, dtype=bool).reshape(-1, *sample.object_mask.shape)
        state: dict = {}
        if len(gt):
            segments = masks if prediction.clusters is None else masks[np.asarray(prediction.clusters) >= 0]
            state["best_iou"] = best_match_iou(gt, segments)
        if prediction.clusters is None:
            return state
        if self.num_clusters is None:
            raise ValueError("PartEvaluator needs num_clusters to score part clusters")
        clusters = np.asarray(prediction.clusters, dtype=np.int64)
        segment = clusters >= 0  # -1: a proposal scored for recall only
        keep_seg = segment & overlaps_ground_truth(masks, gt, REFERENCE_SEGMENT_MIN_GT_IOU)
        state["confusion_strict"] = part_miou.image_confusion(
            masks[segment], clusters[segment], gt, sample.part_ids, self.num_clusters, self.num_parts)
        state["confusion_reference"] = part_miou.image_confusion(
            masks[keep_seg], clusters[keep_seg], gt, sample.part_ids, self.num_clusters, self.num_parts)
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


def _ar_states(states: Iterable[Mapping], protocol: str) -> dict[str, list]:
    """Per AR setting, the AR states of ``protocol`` (a state without AR is an object of a
    several-object image; a state of the earlier one-setting layout counts as ``one-label``)."""
    out: dict[str, list] = {}
    for state in states:
        ar = state.get(f"ar_{protocol}")
        if ar is None:
            continue
        for setting, value in ({"one-label": ar} if "overlaps" in ar else ar).items():
            out.setdefault(setting, []).append(value)
    return out


def mean_best_iou(states: Iterable[Mapping]) -> float:
    """Mean best-match IoU over the states that have one, in percent (NaN: none)."""
    return 100.0 * mean_best_match_iou(float(s["best_iou"]) for s in states if s.get("best_iou") is not None)


def metrics(states: Sequence[Mapping], match_states: Iterable[Mapping] | None = None,
            top_k: Sequence[int] = proposals.TOP_K, mapping: str = "majority",
            object_key: str = "imagenet_class") -> dict:
    """Both protocols' AR@k and mIoU from per-image states (any sharding, any order).

    ``match_states``: states of a disjoint split for the strict protocol's matching;
    ``object_key``: what keys the confusion matrices and the majority vote
    (:data:`OBJECT_KEYS`; the result says which under ``"object_key"``). Per protocol:
    ``{"overlapping": {"AR@k": ...}, "one-label": {...}, "C-mIoU": ..., ...}`` (an AR
    setting only where the states have it).
    """
    states = list(states)
    if match_states is not None:
        match_states = list(match_states)
    out: dict[str, dict] = {}
    for protocol in PROTOCOLS:
        by_setting = _ar_states(states, protocol)
        result: dict = {setting: dict(proposals.summarize(by_setting[setting], top_k=top_k, areas=("all",)).ar)
                        for setting in AR_SETTINGS if setting in by_setting}
        result["bestIoU"] = mean_best_iou(states)
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
