"""Part mIoU with predicted part clusters mapped to ground-truth parts.

PartDistillation predicts K unnamed part clusters per object class; to score them
against named ground-truth parts each cluster is mapped to a part:

1. *Matching pass* (on the matching split): per object class, a confusion matrix of
   predicted clusters (rows) against ground-truth parts (columns), background last in
   both. Each cluster maps to the part it overlaps most (background column excluded) —
   majority vote; a cluster never predicted has an all-zero row and maps to part 0, as
   the reference does. ``mapping="hungarian"`` instead assigns clusters to parts one to
   one (scipy's ``linear_sum_assignment`` on the overlaps); clusters left over map by
   majority vote.
2. *Evaluation pass*: predictions relabelled through the mapping, a confusion matrix of
   mapped parts against ground-truth parts per object class, then per part
   IoU = tp / (gt + pred - tp), accuracy = tp / gt, intersection over prediction
   = tp / pred.

Per object class, mIoU = sum of IoUs over parts with ground truth / number of parts with
any ground-truth or predicted pixels (a part predicted but absent from the ground truth
counts 0). C-mIoU is the mean over object classes; A-mIoU the mean over all (object,
part) pairs counted the same way — every part id, not only ids below the number of object
classes (the released evaluator truncates there: a bug not copied).

States are int64 confusion matrices keyed by object class; merging shards is a sum, so
evaluation is sharded and resumable (:func:`merge`), and one pass equals many shards.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from part_distillation.masks import masks_to_label_map


def confusion(pred: np.ndarray, gt: np.ndarray, num_pred: int, num_gt: int) -> np.ndarray:
    """Confusion counts (num_pred + 1, num_gt + 1) of two label maps; background is the last
    index of each (``num_pred`` in ``pred``, ``num_gt`` in ``gt``)."""
    pred, gt = np.asarray(pred, np.int64).ravel(), np.asarray(gt, np.int64).ravel()
    if pred.shape != gt.shape:
        raise ValueError("prediction and ground-truth label maps differ in size")
    if pred.min(initial=0) < 0 or pred.max(initial=0) > num_pred or gt.min(initial=0) < 0 or gt.max(initial=0) > num_gt:
        raise ValueError(f"labels outside [0, {num_pred}] (prediction) or [0, {num_gt}] (ground truth)")
    return np.bincount(pred * (num_gt + 1) + gt, minlength=(num_pred + 1) * (num_gt + 1)).reshape(
        num_pred + 1, num_gt + 1)


def merge(states: Iterable[Mapping[int, np.ndarray]]) -> dict[int, np.ndarray]:
    """Sum per-object-class confusion matrices of several shards."""
    total: dict[int, np.ndarray] = {}
    for state in states:
        for object_class, matrix in state.items():
            matrix = np.asarray(matrix, dtype=np.int64)
            if object_class in total:
                if total[object_class].shape != matrix.shape:
                    raise ValueError(f"object class {object_class}: confusion matrices of different shapes")
                total[object_class] = total[object_class] + matrix
            else:
                total[object_class] = matrix.copy()
    return total


def majority_vote(matrix: np.ndarray) -> np.ndarray:
    """Part id of each predicted cluster: argmax over ground-truth parts, background excluded.
    A cluster never predicted maps to part 0."""
    matrix = np.asarray(matrix)
    return matrix[:-1, :-1].argmax(axis=1).astype(np.int64)


def hungarian(matrix: np.ndarray) -> np.ndarray:
    """One-to-one cluster -> part assignment maximising the overlap; leftovers by majority vote."""
    from scipy.optimize import linear_sum_assignment

    matrix = np.asarray(matrix, dtype=np.float64)
    mapping = majority_vote(matrix)
    rows, cols = linear_sum_assignment(matrix[:-1, :-1], maximize=True)
    mapping[rows] = cols
    return mapping


MAPPINGS = {"majority": majority_vote, "hungarian": hungarian}


def match_clusters(states: Mapping[int, np.ndarray], how: str = "majority") -> dict[int, np.ndarray]:
    """Cluster -> part mapping per object class from the matching pass's confusion matrices."""
    if how not in MAPPINGS:
        raise ValueError(f"unknown mapping {how!r}; expected one of {sorted(MAPPINGS)}")
    return {object_class: MAPPINGS[how](matrix) for object_class, matrix in states.items()}


@dataclass
class PartScores:
    """Per-part figures of one object class (NaN where undefined), in %."""

    iou: np.ndarray
    accuracy: np.ndarray
    iopred: np.ndarray
    counted: np.ndarray  # parts with any ground-truth or predicted pixels

    @property
    def miou(self) -> float:
        n = int(self.counted.sum())
        return float(np.nansum(np.where(self.counted, self.iou, np.nan)) / n) if n else float("nan")


def part_scores(matrix: np.ndarray) -> PartScores:
    """IoU, accuracy and intersection over prediction of each ground-truth part from an
    evaluation-pass confusion matrix (mapped parts x ground-truth parts, background last)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"evaluation confusion matrix must be square (mapped parts), got {matrix.shape}")
    tp = np.diag(matrix)[:-1]
    gt = matrix[:, :-1].sum(axis=0)
    pred = matrix[:-1, :].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(gt + pred > 0, tp / (gt + pred - tp), np.nan) * 100
        accuracy = np.where(gt > 0, tp / gt, np.nan) * 100
        iopred = np.where(pred > 0, tp / pred, np.nan) * 100
    return PartScores(iou=iou, accuracy=accuracy, iopred=iopred, counted=(gt + pred) > 0)


@dataclass
class MIoUSummary:
    """C- and A- figures (%) and the per-object-class mIoU."""

    c_miou: float
    a_miou: float
    c_accuracy: float
    a_accuracy: float
    c_iopred: float
    a_iopred: float
    per_class: dict[int, float] = field(default_factory=dict)
    per_part: dict[int, list[float]] = field(default_factory=dict)
    #: object classes with no predicted part pixel: their mIoPred is 0 / 0
    classes_without_prediction: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"C-mIoU": self.c_miou, "A-mIoU": self.a_miou, "C-mACC": self.c_accuracy,
                "A-mACC": self.a_accuracy, "C-mIoPred": self.c_iopred, "A-mIoPred": self.a_iopred}


def _nanmean(values: Sequence[float]) -> float:
    values = np.asarray([v for v in values if not np.isnan(v)], dtype=np.float64)
    return float(values.mean()) if len(values) else float("nan")


def summarize(states: Mapping[int, np.ndarray]) -> MIoUSummary:
    """C-/A-mIoU, accuracy and IoPred over the evaluation pass's per-class matrices.

    C-mIoPred follows the released evaluator: a class's mIoPred is the mean over its parts
    with predicted pixels, undefined (NaN) for a class with none, and C-mIoPred is the plain
    mean over classes, so one class without any predicted part pixel makes it NaN ("–" in
    the tables; ``classes_without_prediction`` names them). A-mIoPred skips such parts.
    """
    per_class, per_part, all_iou, all_acc, all_iop, cls_acc, cls_iop = {}, {}, [], [], [], [], []
    for object_class in sorted(states):
        scores = part_scores(states[object_class])
        per_class[object_class] = scores.miou
        per_part[object_class] = [float(v) for v in scores.iou]
        all_iou += [0.0 if np.isnan(v) else float(v) for v in scores.iou[scores.counted]]
        all_acc += [float(v) for v in scores.accuracy if not np.isnan(v)]
        all_iop += [float(v) for v in scores.iopred if not np.isnan(v)]
        cls_acc.append(_nanmean(scores.accuracy))
        cls_iop.append(_nanmean(scores.iopred))
    return MIoUSummary(c_miou=_nanmean(list(per_class.values())), a_miou=_nanmean(all_iou),
                       c_accuracy=_nanmean(cls_acc), a_accuracy=_nanmean(all_acc),
                       c_iopred=float(np.mean(cls_iop)) if cls_iop else float("nan"), a_iopred=_nanmean(all_iop),
                       per_class=per_class, per_part=per_part,
                       classes_without_prediction=[c for c, v in zip(sorted(states), cls_iop) if np.isnan(v)])


def image_confusion(pred_masks: np.ndarray, pred_clusters: Sequence[int], gt_masks: np.ndarray,
                    gt_parts: Sequence[int], num_clusters: int, num_parts: int) -> np.ndarray:
    """One image's confusion matrix, predicted clusters x ground-truth parts (background last).

    Masks are bool (N, H, W) of one size; masks of one id are merged by the label map.
    This is the whole per-image state of the mIoU evaluation: with one label per pixel,
    relabelling clusters to parts merges rows (:func:`apply_mapping`), so both passes and
    both protocols are computed from these matrices.
    """
    gt_masks = np.asarray(gt_masks, dtype=bool)
    shape = gt_masks.shape[1:] if gt_masks.ndim == 3 and len(gt_masks) else np.asarray(pred_masks).shape[1:]
    gt = masks_to_label_map(gt_masks, gt_parts, num_parts, shape=tuple(shape))
    pred = masks_to_label_map(np.asarray(pred_masks, dtype=bool), pred_clusters, num_clusters, shape=tuple(shape))
    return confusion(pred, gt, num_clusters, num_parts)


def apply_mapping_filtered(matrix: np.ndarray, mapping: np.ndarray, min_iou: float) -> np.ndarray:
    """One image's :func:`apply_mapping`, then each mapped (merged) part segment whose IoU
    with every ground-truth part of the image is <= ``min_iou`` is dropped (its pixels
    become background): the reference's ground-truth filter after mapping and merging.

    The IoUs come from the image's confusion counts (cluster segments disjoint: one label
    per pixel): intersection = the mapped count, areas = row and column sums, in float64.
    """
    out = apply_mapping(matrix, mapping)
    inter = out[:-1, :-1].astype(np.float64)
    pred_area = out[:-1].sum(axis=1).astype(np.float64)
    gt_area = out[:, :-1].sum(axis=0).astype(np.float64)
    union = pred_area[:, None] + gt_area[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    drop = (pred_area > 0) & ~(iou > min_iou).any(axis=1)
    out[-1] += out[:-1][drop].sum(axis=0)
    out[:-1][drop] = 0
    return out


def apply_mapping(matrix: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """Clusters x parts confusion -> parts x parts confusion, clusters relabelled by ``mapping``.

    Exact when each pixel carries at most one cluster (one label per pixel).
    """
    matrix = np.asarray(matrix, dtype=np.int64)
    num_parts = matrix.shape[1] - 1
    out = np.zeros((num_parts + 1, num_parts + 1), dtype=np.int64)
    np.add.at(out, np.asarray(mapping, dtype=np.int64), matrix[:-1])
    out[-1] += matrix[-1]
    return out
