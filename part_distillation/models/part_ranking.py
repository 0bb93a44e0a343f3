"""Part ranking's computations (docs/method.md#stage-5): compute only, no files or config.

* :func:`cluster_logits`: the classifier of a query embedding against a class's centroids,
  ``dot`` (x·c) or the reference's ``l2`` (x·c − |x|² − |c|², no factor 2: docs/differences.md#trap-6).
* :func:`cluster_pass`: the kept proposals' L2-normalised embeddings of one image.
  Top 200 queries by foreground probability; one label per pixel over the whole image
  (unmasked logits); area > 5% of the predicted foreground, then score > 0.3; only then
  restricted to the object, IoU with it > 0.001 (``postprocess.part_inference`` with
  ``restrict="after"``).
* :func:`label_pass`: part labels of one image: score(query, cluster) = foreground
  probability x softmax over the class's clusters; top 200 pairs; restricted to the
  object before binarising; one label per pixel; masks of one cluster merged (union, max
  score); area > 5% of the object's predicted foreground, score > 0.1; IoU with the
  object > 0.001.

  In both passes the area and the score filter each keep everything when nothing passes
  (the reference's ``if valid.any()``, as in stage 4); only the IoU filter has no such
  fallback, so an image can still come out with nothing (the stage skips it).
* :func:`proposal_outputs`: one forward of the proposal model over a batch of square canvases,
  per image the outputs both passes take.

The per-class embedding files and their crash-recovery log are the store's
(``store/embedding_log.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from part_distillation.data.batching import preprocess_images
from part_distillation.postprocess import InstancePredictions, class_probabilities, part_inference

CLASSIFIERS = ("dot", "l2")


def cluster_logits(embeddings: Tensor, centroids: Tensor, classifier: str = "l2") -> Tensor:
    """(Q, D) embeddings x (K, D) centroids -> (Q, K) logits.

    ``dot``: x·c. ``l2``: x·c − |x|² − |c|² (the reference's ranking formula, no factor 2
    and no temperature, so the softmax over clusters is nearly flat).
    """
    if classifier not in CLASSIFIERS:
        raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {classifier!r}")
    x, c = embeddings.float(), centroids.float().to(embeddings.device)
    dots = x @ c.T
    if classifier == "dot":
        return dots
    return dots - (x * x).sum(1, keepdim=True) - (c * c).sum(1)[None]


def label_pair_scores(class_logits: Tensor, embeddings: Tensor, centroids: Tensor,
                      classifier: str = "l2") -> Tensor:
    """(Q, 2) one-class logits, (Q, D) normalised embeddings, (K, D) centroids -> (Q, K):
    foreground probability x softmax over the K clusters."""
    foreground = class_probabilities(class_logits)[:, 0]
    return foreground[:, None] * cluster_logits(embeddings, centroids, classifier).softmax(-1)


def normalised(embeddings: Tensor) -> Tensor:
    """L2-normalise each row (the reference's ``F.normalize``)."""
    return F.normalize(embeddings.float(), dim=-1)


@dataclass(frozen=True)
class PassSettings:
    """Thresholds of one pass (defaults: the cluster pass of section 5)."""

    topk: int = 200
    min_area_ratio: float = 0.05
    min_score: float = 0.3
    min_object_iou: float = 0.001
    #: the area and score filters keep everything when nothing passes (the reference's; not the IoU filter)
    keep_all_if_none_pass: bool = True


LABEL_PASS = PassSettings(min_score=0.1)


def cluster_pass(class_logits: Tensor, mask_logits: Tensor, query_embeddings: Tensor, object_mask: Tensor, *,
                 padded_size: Sequence[int], image_size: Sequence[int], output_size: Sequence[int] | None = None,
                 settings: PassSettings = PassSettings()) -> tuple[Tensor, InstancePredictions]:
    """One image of the cluster pass: the kept proposals' embeddings (E, D) float32,
    L2-normalised, and the proposals themselves (masks at ``output_size``, restricted to
    the object). Inputs are the model's outputs for the image: (Q, 2), (Q, h, w), (Q, D)."""
    kept = part_inference(class_probabilities(class_logits), mask_logits, padded_size=padded_size,
                          image_size=image_size, output_size=output_size, object_mask=object_mask,
                          topk=settings.topk, restrict="after", one_label=True, merge_classes=False,
                          min_area_ratio=settings.min_area_ratio, min_score=settings.min_score,
                          keep_all_if_none_pass=settings.keep_all_if_none_pass,
                          min_object_iou=settings.min_object_iou)
    return normalised(query_embeddings[kept.query_indices.to(query_embeddings.device)]), kept


def label_pass(class_logits: Tensor, mask_logits: Tensor, query_embeddings: Tensor, centroids: Tensor,
               object_mask: Tensor, *, padded_size: Sequence[int], image_size: Sequence[int],
               output_size: Sequence[int] | None = None, classifier: str = "l2",
               settings: PassSettings = LABEL_PASS) -> InstancePredictions:
    """One image of the label pass: one merged mask per cluster that survives the filters;
    ``classes`` are cluster ids 0..K-1, sorted by descending score."""
    scores = label_pair_scores(class_logits, normalised(query_embeddings), centroids, classifier)
    return part_inference(scores, mask_logits, padded_size=padded_size, image_size=image_size,
                          output_size=output_size, object_mask=object_mask, topk=settings.topk,
                          restrict="before", one_label=True, merge_classes=True,
                          min_area_ratio=settings.min_area_ratio, min_score=settings.min_score,
                          keep_all_if_none_pass=settings.keep_all_if_none_pass,
                          min_object_iou=settings.min_object_iou)


@torch.no_grad()
def proposal_outputs(model, canvases: Sequence, image_sizes: Sequence[tuple[int, int]],
                     output_sizes: Sequence[tuple[int, int]], device: torch.device) -> list[tuple]:
    """One forward over ``canvases`` (uint8 RGB, all the same square size); per image
    ``(class logits (Q, 2), mask logits (Q, h, w), query embeddings (Q, D), sizes)`` as
    :func:`cluster_pass` and :func:`label_pass` take them (``sizes``: the padded size, the
    image's fitted size on the canvas, the size its masks come back at). Equal canvases pad
    nothing, so each image's outputs equal a batch of one's."""
    pixels = preprocess_images(list(canvases), device=device)
    out = model(pixels.pixel_values)
    return [(out["pred_logits"][i], out["pred_masks"][i], out["query_embeddings"][i],
             dict(padded_size=pixels.padded_size, image_size=tuple(image_size), output_size=tuple(output_size)))
            for i, (image_size, output_size) in enumerate(zip(image_sizes, output_sizes))]


__all__ = ["CLASSIFIERS", "LABEL_PASS", "PassSettings", "proposal_outputs", "cluster_logits", "cluster_pass",
           "label_pair_scores", "label_pass", "normalised"]
