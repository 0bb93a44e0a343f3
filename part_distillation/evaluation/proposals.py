"""Proposal average recall (AR@k), as PartDistillation reports it for part proposals.

Per image, the top-k proposals (by score) are matched one-to-one to the ground-truth
parts greedily: repeatedly the remaining (proposal, part) pair with the highest IoU is
taken and both are removed; a part left without a proposal has IoU 0. Recall at an IoU
threshold t is the fraction of all ground-truth parts whose matched IoU is >= t; AR is
its mean over t in 0.50:0.05:0.95.

The state is split from the metric so evaluation is sharded and resumable: each image
gives a small record (:func:`image_overlaps`: the matched IoU of every ground-truth part
for each k, and the part areas), shards store them, and :func:`summarize` over all of
them is a pure function (concatenation). Merging shards equals one pass.

Difference from the released evaluator, on purpose: an image whose model gave no
proposal still counts its ground-truth parts (as misses). The released code skipped
such images entirely, which raises recall for a model that abstains.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from part_distillation.masks import mask_iou

#: The k of AR@k the paper reports.
TOP_K: tuple[int, ...] = (1, 10, 50, 100, 200)
#: IoU thresholds 0.50:0.05:0.95 (10 values).
IOU_THRESHOLDS: np.ndarray = np.round(np.arange(0.5, 0.951, 0.05), 2)
#: Object-size buckets by ground-truth part area in pixels (COCO's small/medium/large).
AREA_RANGES: dict[str, tuple[float, float]] = {
    "all": (0, float("inf")), "small": (0, 32 ** 2), "medium": (32 ** 2, 96 ** 2), "large": (96 ** 2, float("inf")),
}


def greedy_match(iou: np.ndarray) -> np.ndarray:
    """Matched IoU of each ground truth (G,) from an IoU matrix (P proposals, G parts).

    Repeatedly takes the highest remaining entry, assigns that proposal to that part and
    removes both; parts never assigned get 0.
    """
    iou = np.array(iou, dtype=np.float64, copy=True)
    num_props, num_gt = iou.shape
    matched = np.zeros(num_gt)
    for _ in range(min(num_props, num_gt)):
        flat = int(np.argmax(iou))
        p, g = divmod(flat, num_gt)
        if iou[p, g] < 0:
            break
        matched[g] = iou[p, g]
        iou[p, :] = -1
        iou[:, g] = -1
    return matched


def image_overlaps(pred_masks: np.ndarray, scores: np.ndarray, gt_masks: np.ndarray,
                   top_k: Sequence[int] = TOP_K) -> dict:
    """One image's evaluation state: for each k, the matched IoU of each ground-truth part.

    ``pred_masks`` bool (P, H, W), ``scores`` (P,), ``gt_masks`` bool (G, H, W).
    Returns ``{"overlaps": (len(top_k), G) float64, "gt_areas": (G,) int64}`` (float64: an
    IoU of exactly 0.65 must still reach the 0.65 threshold).
    """
    pred_masks = np.asarray(pred_masks, dtype=bool)
    gt_masks = np.asarray(gt_masks, dtype=bool)
    if len(pred_masks) and pred_masks.shape[1:] != gt_masks.shape[1:]:
        raise ValueError(f"predictions {pred_masks.shape[1:]} and ground truth {gt_masks.shape[1:]} "
                         f"differ in size")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    pred_masks = pred_masks[order]
    overlaps = np.zeros((len(top_k), len(gt_masks)), np.float64)
    if len(pred_masks) and len(gt_masks):
        iou = mask_iou(pred_masks[: max(top_k)], gt_masks)
        for i, k in enumerate(top_k):
            overlaps[i] = greedy_match(iou[:k])
    return {"overlaps": overlaps, "gt_areas": gt_masks.reshape(len(gt_masks), -1).sum(1).astype(np.int64)}


@dataclass
class RecallSummary:
    """AR@k (in %) overall and by area bucket, with the recall at each threshold."""

    ar: dict[str, float] = field(default_factory=dict)            # "AR@10", "AR_small@10", ...
    recalls: dict[str, list[float]] = field(default_factory=dict)  # "AR@10" -> recall per threshold (%)
    num_gt: int = 0


def summarize(states: Iterable[Mapping], top_k: Sequence[int] = TOP_K,
              areas: Sequence[str] = ("all", "small", "medium", "large")) -> RecallSummary:
    """AR@k over the per-image states of :func:`image_overlaps` (any order, any sharding)."""
    per_state = [(np.asarray(s["overlaps"], np.float64).reshape(len(top_k), -1), np.asarray(s["gt_areas"]))
                 for s in states]
    overlaps = np.concatenate([o for o, _ in per_state], axis=1) if per_state else np.zeros((len(top_k), 0))
    gt_areas = np.concatenate([a for _, a in per_state]) if per_state else np.zeros(0)
    summary = RecallSummary(num_gt=int(overlaps.shape[1]))
    for area in areas:
        lo, hi = AREA_RANGES[area]
        chosen = (gt_areas > lo) & (gt_areas <= hi)
        suffix = "" if area == "all" else f"_{area}"
        for i, k in enumerate(top_k):
            name = f"AR{suffix}@{k}"
            values = overlaps[i, chosen]
            if len(values) == 0:
                summary.ar[name], summary.recalls[name] = float("nan"), []
                continue
            recalls = [(values >= t - 1e-9).mean() * 100 for t in IOU_THRESHOLDS]
            summary.ar[name] = float(np.mean(recalls))
            summary.recalls[name] = [float(r) for r in recalls]
    return summary
