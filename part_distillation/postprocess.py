"""Turning Mask2Former outputs into masks: written once, used by every stage and evaluator.

Pure functions on torch tensors (numpy arrays are accepted and converted). Mask inputs
named ``mask_logits`` are the model's pre-sigmoid mask predictions; ``masks`` are bool.

* :func:`instance_inference` is upstream Mask2Former's instance inference: softmax class
  scores without the no-object column, top-k over all (query, class) pairs, masks brought
  to the image (upsample to the padded input, crop the padding, resize to the output
  size), binarised at logit > 0, and each score multiplied by the mean mask probability
  inside its mask.
* The helpers below are the reference's per-stage post-processing, factored: restricting
  predictions to the object mask, one label per pixel, area-ratio and score filters,
  merging masks that share a class id.
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


def topk_class_scores(class_logits: Tensor, topk: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k (query, class) pairs by softmax score, the no-object column (last) excluded.

    Returns scores (K,), class ids (K,) and query indices (K,), in ``topk(sorted=False)`` order.
    """
    class_logits = _tensor(class_logits)
    num_queries, num_outputs = class_logits.shape
    num_classes = num_outputs - 1
    scores = class_logits.float().softmax(-1)[:, :-1]
    k = min(int(topk), num_queries * num_classes)
    scores, flat = scores.flatten().topk(k, sorted=False)
    return scores, flat % num_classes, torch.div(flat, num_classes, rounding_mode="floor")


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


def one_label_per_pixel(
    mask_logits: Tensor, scores: Tensor, region: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Give every pixel of ``region`` to the prediction with the largest score x sigmoid(mask).

    ``region`` defaults to :func:`foreground` (the reference's choice). Returns the
    non-overlapping bool masks (M, H, W) and the indices (M,) of the predictions that own
    at least one pixel, in increasing index order.
    """
    mask_logits, scores = _tensor(mask_logits), _tensor(scores)
    region = foreground(mask_logits) if region is None else _tensor(region).bool()
    if mask_logits.shape[0] == 0:
        return torch.zeros((0, *mask_logits.shape[-2:]), dtype=torch.bool), torch.zeros(0, dtype=torch.long)
    owner = (scores.float()[:, None, None] * mask_logits.float().sigmoid()).argmax(0)
    owners = owner[region].unique()
    masks = (owner[None] == owners[:, None, None]) & region[None]
    return masks, owners


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


def merge_by_class(masks: Tensor, classes: Tensor, scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Union the masks that share a class id; the merged score is the best of the group.

    Returns masks (M, H, W) bool, the sorted unique class ids (M,) and scores (M,).
    """
    masks, classes, scores = _tensor(masks).bool(), _tensor(classes), _tensor(scores)
    ids, group = classes.unique(sorted=True, return_inverse=True)
    merged = torch.zeros((len(ids), *masks.shape[1:]), dtype=torch.bool, device=masks.device)
    best = torch.full((len(ids),), -torch.inf, dtype=scores.dtype, device=scores.device)
    for i in range(len(ids)):
        members = group == i
        merged[i] = masks[members].any(0)
        best[i] = scores[members].max()
    return merged, ids, best


__all__ = [
    "InstancePredictions", "area_ratio", "foreground", "instance_inference", "keep_by_area_ratio",
    "keep_by_score", "mean_mask_probability", "merge_by_class", "one_label_per_pixel", "resize_mask_logits",
    "restrict_to_object", "topk_class_scores",
]
