"""Turning Mask2Former outputs into masks: written once, used by every stage and evaluator.

Pure functions on torch tensors (numpy arrays are accepted and converted). Mask inputs
named ``mask_logits`` are the model's pre-sigmoid mask predictions; ``masks`` are bool.

* :func:`instance_inference` is upstream Mask2Former's instance inference: softmax class
  scores without the no-object column, top-k over all (query, class) pairs, masks brought
  to the image (upsample to the padded input, crop the padding, resize to the output
  size), binarised at logit > 0, and each score multiplied by the mean mask probability
  inside its mask.
  It stays for the COCO model.
* :func:`part_inference` is PartDistillation's inference, one function for every stage
  (docs/method.md#inference): top-k (query, class) pairs by score with **no** mask-score
  factor; mask logits restricted to the object before binarising (or, for the ranking
  stage's cluster pass, after the filters); one label per pixel (argmax of score x
  sigmoid(mask) inside the union of positive logits); optional merge by class; area filter
  then score filter, each keeping everything when nothing passes; optional IoU-with-object
  filter. :func:`proposal_inference` is its stage-4 form (one foreground class).
* The helpers it is built from are public too: restricting predictions to the object
  mask, one label per pixel, area-ratio and score filters, merging masks by class id.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F


def _tensor(x) -> Tensor:
    return x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))


@dataclass
class InstancePredictions:
    """Instances of one image, in top-k order (not sorted by score)."""

    masks: Tensor  # (K, H, W) bool
    scores: Tensor  # (K,) float
    classes: Tensor  # (K,) long, foreground class ids
    query_indices: Tensor  # (K,) long, the decoder query each instance comes from

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def select(self, keep: Tensor) -> "InstancePredictions":
        """Subset by a bool mask or an index tensor."""
        return InstancePredictions(self.masks[keep], self.scores[keep], self.classes[keep], self.query_indices[keep])

    def sorted_by_score(self) -> "InstancePredictions":
        return self.select(torch.argsort(self.scores, descending=True, stable=True))


def resize_mask_logits(
    mask_logits: Tensor,
    padded_size: Sequence[int],
    image_size: Sequence[int],
    output_size: Sequence[int] | None = None,
) -> Tensor:
    """Bring (N, h, w) mask logits from model resolution to the image: bilinear upsample to
    the padded input size, crop the bottom/right padding, bilinear resize to ``output_size``
    (default: the unpadded image size). Same steps as upstream's ``sem_seg_postprocess``."""
    mask_logits = _tensor(mask_logits)
    if mask_logits.ndim != 3:
        raise ValueError(f"mask_logits must be (N, h, w), got {tuple(mask_logits.shape)}")
    hp, wp = int(padded_size[0]), int(padded_size[1])
    h, w = int(image_size[0]), int(image_size[1])
    if h > hp or w > wp:
        raise ValueError(f"image size {(h, w)} exceeds the padded size {(hp, wp)}")
    x = F.interpolate(mask_logits[None].float(), size=(hp, wp), mode="bilinear", align_corners=False)
    x = x[:, :, :h, :w]
    if output_size is not None and (int(output_size[0]), int(output_size[1])) != (h, w):
        x = F.interpolate(x, size=(int(output_size[0]), int(output_size[1])), mode="bilinear", align_corners=False)
    return x[0]


def class_probabilities(class_logits: Tensor) -> Tensor:
    """Softmax over the C + 1 outputs without the no-object column (last): (Q, C+1) -> (Q, C)."""
    return _tensor(class_logits).float().softmax(-1)[:, :-1]


def topk_pairs(pair_scores: Tensor, topk: int, *, sorted: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k (query, class) pairs of a (Q, C) score matrix.

    Returns scores (K,), class ids (K,) and query indices (K,), K = min(topk, Q x C), in
    ``topk(sorted=...)`` order.
    """
    pair_scores = _tensor(pair_scores).float()
    if pair_scores.ndim != 2:
        raise ValueError(f"pair scores must be (Q, C), got {tuple(pair_scores.shape)}")
    num_queries, num_classes = pair_scores.shape
    k = min(int(topk), num_queries * num_classes)
    scores, flat = pair_scores.flatten().topk(k, sorted=sorted)
    return scores, flat % num_classes, torch.div(flat, num_classes, rounding_mode="floor")


def topk_class_scores(class_logits: Tensor, topk: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k (query, class) pairs by softmax score, the no-object column (last) excluded.

    Returns scores (K,), class ids (K,) and query indices (K,), in ``topk(sorted=False)`` order.
    """
    return topk_pairs(class_probabilities(class_logits), topk)


def mean_mask_probability(mask_logits: Tensor, masks: Tensor) -> Tensor:
    """Mean sigmoid probability inside each binary mask (upstream's mask score)."""
    masks = _tensor(masks).flatten(1).float()
    probs = _tensor(mask_logits).flatten(1).float().sigmoid()
    return (probs * masks).sum(1) / (masks.sum(1) + 1e-6)


def instance_inference(
    class_logits: Tensor,
    mask_logits: Tensor,
    *,
    padded_size: Sequence[int],
    image_size: Sequence[int],
    output_size: Sequence[int] | None = None,
    topk: int = 100,
) -> InstancePredictions:
    """Upstream Mask2Former instance inference for one image.

    ``class_logits`` (Q, C+1) and ``mask_logits`` (Q, h, w) are the model's outputs for the
    image; ``padded_size`` is the model input size, ``image_size`` the image before
    padding, ``output_size`` the size to report masks at (default ``image_size``).
    Only the top-k queries' masks are resized (same numbers as resizing all of them first).
    """
    scores, classes, queries = topk_class_scores(class_logits, topk)
    logits = resize_mask_logits(_tensor(mask_logits)[queries], padded_size, image_size, output_size)
    masks = logits > 0
    scores = scores * mean_mask_probability(logits, masks)
    return InstancePredictions(masks=masks, scores=scores, classes=classes, query_indices=queries)


def restrict_to_object(mask_logits: Tensor, object_mask: Tensor) -> Tensor:
    """Zero mask logits outside the object, as the reference does (binarised: nothing outside).

    Bool masks are intersected with the object instead.
    """
    mask_logits, object_mask = _tensor(mask_logits), _tensor(object_mask).bool()
    if object_mask.shape != mask_logits.shape[-2:]:
        raise ValueError(f"object mask {tuple(object_mask.shape)} does not match masks {tuple(mask_logits.shape)}")
    if mask_logits.dtype == torch.bool:
        return mask_logits & object_mask
    return mask_logits * object_mask.to(mask_logits.dtype)


def foreground(mask_logits: Tensor) -> Tensor:
    """Pixels any prediction claims (logit > 0): the union of the binarised masks."""
    mask_logits = _tensor(mask_logits)
    if mask_logits.shape[0] == 0:
        return torch.zeros(mask_logits.shape[-2:], dtype=torch.bool, device=mask_logits.device)
    return (mask_logits > 0).any(0)


def one_label_per_pixel(mask_logits: Tensor, scores: Tensor, region: Tensor | None = None) -> Tensor:
    """Give every pixel of ``region`` to the prediction with the largest score x sigmoid(mask).

    ``region`` defaults to :func:`foreground` (the union of positive logits, the
    reference's choice). Returns non-overlapping bool masks (N, H, W), one per prediction
    (empty for a prediction that owns no pixel); ties go to the lower index.
    """
    mask_logits, scores = _tensor(mask_logits), _tensor(scores)
    region = foreground(mask_logits) if region is None else _tensor(region).bool()
    if mask_logits.shape[0] == 0:
        return torch.zeros((0, *mask_logits.shape[-2:]), dtype=torch.bool, device=mask_logits.device)
    owner = (scores.float()[:, None, None] * mask_logits.float().sigmoid()).argmax(0)
    index = torch.arange(mask_logits.shape[0], device=owner.device)[:, None, None]
    return (owner[None] == index) & region[None]


def area_ratio(masks: Tensor, reference: Tensor) -> Tensor:
    """Area of each mask divided by the area of ``reference`` (e.g. the object or foreground)."""
    masks = _tensor(masks)
    ref_area = _tensor(reference).bool().sum().float()
    areas = masks.flatten(1).bool().sum(1).float()
    return areas / ref_area if ref_area > 0 else torch.zeros_like(areas)


def keep_by_area_ratio(
    masks: Tensor, reference: Tensor, min_ratio: float, *, fallback_to_all: bool = False
) -> Tensor:
    """Bool keep-vector: masks covering more than ``min_ratio`` of ``reference``.

    ``fallback_to_all`` keeps everything when nothing passes (the reference's behaviour).
    """
    keep = area_ratio(masks, reference) > float(min_ratio)
    return torch.ones_like(keep) if fallback_to_all and not keep.any() else keep


def keep_by_score(scores: Tensor, min_score: float, *, fallback_to_all: bool = False) -> Tensor:
    """Bool keep-vector: scores above ``min_score`` (``fallback_to_all`` as for areas)."""
    keep = _tensor(scores) > float(min_score)
    return torch.ones_like(keep) if fallback_to_all and not keep.any() else keep


def merge_by_class(masks: Tensor, classes: Tensor, scores: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Union the masks that share a class id; the merged score is the best of the group.

    Returns masks (M, H, W) bool, the sorted unique class ids (M,), scores (M,) and the
    index (M,) of each group's best-scored member (first one on ties).
    """
    masks, classes, scores = _tensor(masks).bool(), _tensor(classes), _tensor(scores)
    ids, group = classes.unique(sorted=True, return_inverse=True)
    merged = torch.zeros((len(ids), *masks.shape[1:]), dtype=torch.bool, device=masks.device)
    best = torch.full((len(ids),), -torch.inf, dtype=scores.dtype, device=scores.device)
    best_member = torch.zeros(len(ids), dtype=torch.long, device=scores.device)
    for i in range(len(ids)):
        members = torch.nonzero(group == i).flatten()
        merged[i] = masks[members].any(0)
        top = int(scores[members].argmax())
        best[i] = scores[members[top]]
        best_member[i] = members[top]
    return merged, ids, best, best_member


def keep_by_object_iou(masks: Tensor, object_mask: Tensor, min_iou: float) -> Tensor:
    """Bool keep-vector: masks whose IoU with the object mask is above ``min_iou``."""
    masks = _tensor(masks).bool().flatten(1)
    obj = _tensor(object_mask).bool().flatten()[None]
    inter = (masks & obj).sum(1).float()
    union = (masks | obj).sum(1).float()
    return inter / union.clamp(min=1) > float(min_iou)


RESTRICT_MODES = ("before", "after")


def part_inference(
    pair_scores: Tensor,
    mask_logits: Tensor,
    *,
    padded_size: Sequence[int],
    image_size: Sequence[int],
    output_size: Sequence[int] | None = None,
    object_mask: Tensor | None = None,
    topk: int = 200,
    restrict: str = "before",
    one_label: bool = True,
    merge_classes: bool = False,
    min_area_ratio: float | None = 0.05,
    min_score: float | None = -1.0,
    keep_all_if_none_pass: bool = True,
    min_object_iou: float | None = None,
) -> InstancePredictions:
    """PartDistillation's inference for one image (every stage; docs/method.md#inference).

    ``pair_scores`` (Q, C): the score of each (query, class) pair, e.g.
    :func:`class_probabilities` of the class logits (stages 4 and 6) or foreground
    probability x cluster softmax (stage 5); ``mask_logits`` (Q, h, w) the model's masks;
    sizes as :func:`instance_inference`; ``object_mask`` (H, W) bool at ``output_size``.

    Steps, in this order:

    1. the ``topk`` pairs by score (no mask-score factor);
    2. their mask logits brought to the image (:func:`resize_mask_logits`);
    3. ``restrict="before"``: logits outside the object set to 0 before binarising;
    4. region = union of positive logits; masks are each pair's logit > 0 or, with
       ``one_label``, the region's pixels where the pair has the largest score x
       sigmoid(logit) (ties: the first pair in descending-score order);
    5. ``merge_classes``: masks of one class united, score = the best member's;
    6. area filter: area > ``min_area_ratio`` x area of the region (``None``: off);
    7. score filter: score > ``min_score`` (``None``: off);
       with ``keep_all_if_none_pass`` each of 6 and 7 keeps everything when nothing passes;
    8. ``restrict="after"``: masks intersected with the object now (the ranking stage's
       cluster pass labels the whole image first);
    9. IoU with the object > ``min_object_iou`` (``None``: off; no fallback).

    Returns the kept predictions sorted by descending score; ``classes`` are the pair's
    class ids, ``query_indices`` the query of each (for merged masks: the best member's).
    """
    top = _top_logits(pair_scores, mask_logits, padded_size=padded_size, image_size=image_size,
                      output_size=output_size, object_mask=object_mask, topk=topk, restrict=restrict,
                      min_object_iou=min_object_iou)
    return _select(top, one_label=one_label, merge_classes=merge_classes, min_area_ratio=min_area_ratio,
                   min_score=min_score, keep_all_if_none_pass=keep_all_if_none_pass, min_object_iou=min_object_iou)


@dataclass
class _TopLogits:
    """Steps 1-4 of :func:`part_inference` (shared by its one-label and overlapping forms).

    A query stands in several pairs when the pairs are (query, class) (stage 5: every query x
    every part class): its logits are resized once, ``query_logits[pair_query[p]]`` being pair
    ``p``'s, so the full-resolution work scales with the queries, not the pairs."""

    scores: Tensor
    classes: Tensor
    queries: Tensor
    query_logits: Tensor  # (U, H, W): each distinct query of the pairs once
    pair_query: Tensor  # (P,): the row of query_logits of each pair
    region: Tensor
    object_mask: Tensor | None
    restrict: str

    def binary_masks(self) -> Tensor:
        """Each pair's logit > 0 (P, H, W)."""
        return (self.query_logits > 0)[self.pair_query]

    def one_label_masks(self) -> Tensor:
        """:func:`one_label_per_pixel` of the pairs' logits, computed over the distinct queries:
        of a query's pairs only the first best-scored can own a pixel (its score x the same
        sigmoid is the largest of them, and it comes first), so the owner over those pairs, in
        pair order, is the owner over all pairs, ties included."""
        pairs = self.scores.shape[0]
        if pairs == 0:
            return torch.zeros((0, *self.query_logits.shape[-2:]), dtype=torch.bool, device=self.query_logits.device)
        order = torch.argsort(self.scores.float(), descending=True, stable=True)   # best first, then pair order
        rank = torch.full((self.query_logits.shape[0],), pairs, dtype=torch.long, device=order.device)
        rank.scatter_reduce_(0, self.pair_query[order], torch.arange(pairs, device=order.device), reduce="amin")
        best_pair = order[rank]   # each query's first best-scored pair
        rows = torch.argsort(best_pair)   # the candidate pairs in pair order
        candidates = best_pair[rows]
        owner = (self.scores.float()[candidates][:, None, None] * self.query_logits[rows].float().sigmoid()).argmax(0)
        index = torch.arange(len(rows), device=owner.device)[:, None, None]
        masks = torch.zeros((pairs, *owner.shape), dtype=torch.bool, device=owner.device)
        masks[candidates] = (owner[None] == index) & self.region[None]   # the other pairs own nothing
        return masks


def _top_logits(pair_scores, mask_logits, *, padded_size, image_size, output_size, object_mask, topk, restrict,
                min_object_iou) -> _TopLogits:
    if restrict not in RESTRICT_MODES:
        raise ValueError(f"restrict must be one of {RESTRICT_MODES}, got {restrict!r}")
    if object_mask is None and min_object_iou is not None:
        raise ValueError("min_object_iou needs an object_mask")
    scores, classes, queries = topk_pairs(pair_scores, topk, sorted=True)
    distinct, pair_query = queries.unique(sorted=True, return_inverse=True)
    logits = resize_mask_logits(_tensor(mask_logits)[distinct], padded_size, image_size, output_size)
    obj = None if object_mask is None else _tensor(object_mask).bool().to(logits.device)
    if obj is not None and restrict == "before":
        logits = restrict_to_object(logits, obj)
    return _TopLogits(scores, classes, queries, logits, pair_query, foreground(logits), obj, restrict)


def _select(top: _TopLogits, *, one_label, merge_classes, min_area_ratio, min_score, keep_all_if_none_pass,
            min_object_iou) -> InstancePredictions:
    """Steps 4-9 of :func:`part_inference` on the top pairs' logits."""
    scores, classes, queries, obj = top.scores, top.classes, top.queries, top.object_mask
    masks = top.one_label_masks() if one_label else top.binary_masks()
    if merge_classes:
        masks, classes, scores, best = merge_by_class(masks, classes, scores)
        queries = queries[best]
    predictions = InstancePredictions(masks=masks, scores=scores, classes=classes, query_indices=queries)
    if min_area_ratio is not None:
        predictions = predictions.select(keep_by_area_ratio(
            predictions.masks, top.region, min_area_ratio, fallback_to_all=keep_all_if_none_pass))
    if min_score is not None:
        predictions = predictions.select(keep_by_score(
            predictions.scores, min_score, fallback_to_all=keep_all_if_none_pass))
    if obj is not None and top.restrict == "after":
        predictions.masks = predictions.masks & obj[None]
    if min_object_iou is not None:
        predictions = predictions.select(keep_by_object_iou(predictions.masks, obj, min_object_iou))
    return predictions.sorted_by_score()


#: The two proposal settings of the evaluation (docs/evaluation.md#protocols): the top-k masks as
#: they are (the published AR), and one label per pixel.
PROPOSAL_SETTINGS = ("overlapping", "one-label")


def proposal_inference_settings(
    class_logits: Tensor,
    mask_logits: Tensor,
    *,
    padded_size: Sequence[int],
    image_size: Sequence[int],
    output_size: Sequence[int] | None = None,
    object_mask: Tensor | None = None,
    topk: int = 200,
    settings: Sequence[str] = PROPOSAL_SETTINGS,
    min_area_ratio: float | None = 0.05,
    min_score: float | None = -1.0,
) -> dict[str, InstancePredictions]:
    """Part proposals of the stage-one model (docs/method.md#stage-4) in each of ``settings``
    (``overlapping``: each mask its pair's logit > 0; ``one-label``: one label per pixel),
    from one top-k selection and one resize of the logits: top ``topk`` queries by softmax
    foreground probability, restricted to ``object_mask`` before binarising, area > 5% of the
    predicted region, then score > -1 (each keeping everything when nothing passes)."""
    unknown = [s for s in settings if s not in PROPOSAL_SETTINGS]
    if unknown:
        raise ValueError(f"proposal settings must be among {PROPOSAL_SETTINGS}, got {unknown}")
    top = _top_logits(class_probabilities(class_logits), mask_logits, padded_size=padded_size,
                      image_size=image_size, output_size=output_size, object_mask=object_mask, topk=topk,
                      restrict="before", min_object_iou=None)
    return {s: _select(top, one_label=s == "one-label", merge_classes=False, min_area_ratio=min_area_ratio,
                       min_score=min_score, keep_all_if_none_pass=True, min_object_iou=None) for s in settings}


def proposal_inference(
    class_logits: Tensor,
    mask_logits: Tensor,
    *,
    padded_size: Sequence[int],
    image_size: Sequence[int],
    output_size: Sequence[int] | None = None,
    object_mask: Tensor | None = None,
    topk: int = 200,
    one_label: bool = True,
    min_area_ratio: float | None = 0.05,
    min_score: float | None = -1.0,
) -> InstancePredictions:
    """:func:`proposal_inference_settings` in one setting: one label per pixel, or
    ``one_label=False`` the overlapping proposals."""
    setting = "one-label" if one_label else "overlapping"
    return proposal_inference_settings(class_logits, mask_logits, padded_size=padded_size, image_size=image_size,
                                       output_size=output_size, object_mask=object_mask, topk=topk,
                                       settings=(setting,), min_area_ratio=min_area_ratio,
                                       min_score=min_score)[setting]


__all__ = [
    "InstancePredictions", "PROPOSAL_SETTINGS", "RESTRICT_MODES", "area_ratio", "class_probabilities", "foreground",
    "instance_inference", "keep_by_area_ratio", "keep_by_object_iou", "keep_by_score", "mean_mask_probability",
    "merge_by_class", "one_label_per_pixel", "part_inference", "proposal_inference",
    "proposal_inference_settings", "resize_mask_logits",
    "restrict_to_object", "topk_class_scores", "topk_pairs",
]
