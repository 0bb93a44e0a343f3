"""Detic's three-stage cascade ROI heads with the CLIP zero-shot classifier and a mask head.

Inference only. Names follow detectron2 / Detic (``box_head.{k}.fc1``, ``box_predictor.{k}.cls_score``,
``mask_head.mask_fcn1`` ...) so the checkpoint loads directly. The geometry helpers (level
assignment, ROIAlign pooling, box decoding, clipping) reproduce detectron2's rules exactly,
because the cascade re-pools on its own predictions and small differences compound.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou, roi_align

#: dw/dh clamp of detectron2's Box2BoxTransform: log(1000 / 16).
SCALE_CLAMP = math.log(1000.0 / 16)


@dataclass
class CascadeStepOutput:
    """One cascade stage on one batch: the boxes it pooled and its raw predictions."""

    boxes_in: list[torch.Tensor]
    cls_logits: torch.Tensor
    box_deltas: torch.Tensor


@dataclass
class RawDetections:
    """Detections of one image in the frame the network saw (resized, unpadded), by descending score."""

    boxes: torch.Tensor  # (N, 4) XYXY
    scores: torch.Tensor  # (N,)
    classes: torch.Tensor  # (N,) int64 vocabulary index
    image_size: tuple[int, int]  # (h, w) of the resized image
    mask_probs: torch.Tensor | None = None  # (N, 1, M, M) mask probabilities inside each box

    def __len__(self) -> int:
        return len(self.boxes)

    def select(self, index: torch.Tensor) -> "RawDetections":
        """A subset (e.g. the top-k of one class) before the costlier paste step."""
        probs = None if self.mask_probs is None else self.mask_probs[index]
        return RawDetections(self.boxes[index], self.scores[index], self.classes[index], self.image_size, probs)


def clip_boxes(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    h, w = size
    return torch.stack(
        (boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)), -1
    )


def apply_deltas(deltas: torch.Tensor, boxes: torch.Tensor, weights: Sequence[float], scale_clamp: float = SCALE_CLAMP) -> torch.Tensor:
    """R-CNN box decoding: centre shift by (dx, dy) * size, size scaled by exp(dw, dh) (clamped)."""
    deltas = deltas.float()
    boxes = boxes.to(deltas.dtype)
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    ctr_x, ctr_y = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
    dw = torch.clamp(deltas[:, 2::4] / ww, max=scale_clamp)
    dh = torch.clamp(deltas[:, 3::4] / wh, max=scale_clamp)
    px, py = dx * widths[:, None] + ctr_x[:, None], dy * heights[:, None] + ctr_y[:, None]
    pw, ph = torch.exp(dw) * widths[:, None], torch.exp(dh) * heights[:, None]
    return torch.stack((px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw, py + 0.5 * ph), dim=-1).reshape(deltas.shape)


def assign_levels(boxes: torch.Tensor, min_level: int, max_level: int, canonical_size: int = 224, canonical_level: int = 4) -> torch.Tensor:
    """FPN paper eq. 1: the pyramid level (offset from ``min_level``) each box is pooled from."""
    sizes = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    levels = torch.floor(canonical_level + torch.log2(sizes / canonical_size + 1e-8))
    return torch.clamp(levels, min=min_level, max=max_level).to(torch.int64) - min_level


def per_class_box_nms(boxes: torch.Tensor, scores: torch.Tensor, candidates: torch.Tensor, iou_thresh: float, chunk: int = 512) -> torch.Tensor:
    """Greedy NMS run separately for every class when all classes share one box per row.

    Same decisions as torchvision's ``batched_nms`` over the (row, class) candidates (a candidate
    is dropped when a kept, higher-scored candidate of its class overlaps it by IoU > ``iou_thresh``),
    but vectorised over classes: the (R, R) IoU matrix is computed once and the greedy sweep runs
    over score ranks, not one NMS call per class (Detic scores every proposal for every class of a
    vocabulary that can hold 20k classes). Returns the (R, K) mask of kept candidates.
    """
    rows, num_classes = scores.shape
    keep = torch.zeros_like(candidates)
    if rows == 0 or not bool(candidates.any()):
        return keep
    overlaps = box_iou(boxes.float(), boxes.float()) > iou_thresh
    for k0 in range(0, num_classes, chunk):
        valid = candidates[:, k0 : k0 + chunk].t()  # (k, R)
        ranked = torch.where(valid, scores[:, k0 : k0 + chunk].t().float(), float("-inf"))
        order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
        valid_sorted = valid.gather(1, order)
        depth = int(valid_sorted.sum(1).max())
        if depth == 0:
            continue
        order, valid_sorted = order[:, :depth], valid_sorted[:, :depth]
        suppresses = overlaps[order[:, :, None], order[:, None, :]]  # (k, depth, depth)
        kept = torch.zeros_like(valid_sorted)
        kept[:, 0] = valid_sorted[:, 0]
        for rank in range(1, depth):
            hit = (kept[:, :rank] & suppresses[:, rank, :rank]).any(dim=1)
            kept[:, rank] = valid_sorted[:, rank] & ~hit
        block = torch.zeros_like(valid)
        block.scatter_(1, order, kept)
        keep[:, k0 : k0 + chunk] = block.t()
    return keep


class MultiScaleROIAlign(nn.Module):
    """detectron2's ROIPooler with ROIAlignV2 (aligned=True, adaptive sampling)."""

    def __init__(self, output_size: int, strides: Sequence[int], sampling_ratio: int = 0):
        super().__init__()
        self.output_size = output_size
        self.scales = [1.0 / s for s in strides]
        self.min_level = int(math.log2(strides[0]))
        self.max_level = int(math.log2(strides[-1]))
        self.sampling_ratio = sampling_ratio

    def forward(self, features: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor]) -> torch.Tensor:
        all_boxes = torch.cat(list(boxes), 0)
        index = torch.repeat_interleave(
            torch.arange(len(boxes), dtype=all_boxes.dtype, device=all_boxes.device),
            torch.tensor([len(b) for b in boxes], device=all_boxes.device),
        )
        rois = torch.cat([index[:, None], all_boxes], 1)
        size = self.output_size
        out = features[0].new_zeros((len(rois), features[0].shape[1], size, size))
        if len(rois) == 0:
            return out
        levels = assign_levels(all_boxes, self.min_level, self.max_level)
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            inds = torch.nonzero(levels == level).squeeze(1)
            if len(inds):
                pooled = roi_align(feature, rois[inds].to(feature.dtype), (size, size), scale, self.sampling_ratio, aligned=True)
                out.index_put_((inds,), pooled)
        return out


class BoxHead(nn.Module):
    """Flatten the pooled features, then [Linear, ReLU] x num_fc."""

    def __init__(self, in_dim: int, fc_dim: int, num_fc: int = 2):
        super().__init__()
        self.num_fc = num_fc
        for k in range(num_fc):
            self.add_module(f"fc{k + 1}", nn.Linear(in_dim if k == 0 else fc_dim, fc_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for k in range(self.num_fc):
            x = F.relu(getattr(self, f"fc{k + 1}")(x))
        return x


def zero_shot_weight(embeddings: torch.Tensor) -> torch.Tensor:
    """(C, D) text embeddings -> the (D, C + 1) classifier: columns L2-normalised, zero background last."""
    weight = embeddings.to(torch.float32).t()
    weight = torch.cat([weight, weight.new_zeros((weight.shape[0], 1))], dim=1)
    return F.normalize(weight, p=2, dim=0)


class ZeroShotClassifier(nn.Module):
    """Cosine similarity between projected region features and CLIP class embeddings, times a temperature."""

    def __init__(self, in_dim: int, num_classes: int, embed_dim: int = 512, temperature: float = 50.0):
        super().__init__()
        self.temperature = temperature
        self.linear = nn.Linear(in_dim, embed_dim)
        self.register_buffer("zs_weight", torch.zeros(embed_dim, num_classes + 1))

    @property
    def num_classes(self) -> int:
        return self.zs_weight.shape[1] - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.temperature * F.normalize(self.linear(x), p=2, dim=1)
        return torch.mm(x, self.zs_weight)


class BoxPredictor(nn.Module):
    """One stage's outputs: zero-shot class logits (C + 1) and class-agnostic box deltas (4)."""

    def __init__(self, in_dim: int, num_classes: int, embed_dim: int = 512, temperature: float = 50.0):
        super().__init__()
        self.cls_score = ZeroShotClassifier(in_dim, num_classes, embed_dim, temperature)
        self.bbox_pred = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, 4))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


class MaskHead(nn.Module):
    """Class-agnostic mask head: [Conv3x3, ReLU] x n, 2x deconv + ReLU, 1x1 predictor -> logits."""

    def __init__(self, channels: int, conv_dim: int, num_conv: int = 4):
        super().__init__()
        self.num_conv = num_conv
        for k in range(num_conv):
            self.add_module(f"mask_fcn{k + 1}", nn.Conv2d(channels if k == 0 else conv_dim, conv_dim, 3, padding=1))
        self.deconv = nn.ConvTranspose2d(conv_dim if num_conv else channels, conv_dim, 2, stride=2)
        self.predictor = nn.Conv2d(conv_dim, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k in range(self.num_conv):
            x = F.relu(getattr(self, f"mask_fcn{k + 1}")(x))
        return self.predictor(F.relu(self.deconv(x)))


class CascadeROIHeads(nn.Module):
    """Three box stages (each its own head, classifier and regression weights) and one mask head."""

    def __init__(
        self,
        channels: int,
        num_classes: int,
        in_features: Sequence[str] = ("p3", "p4", "p5"),
        strides: Sequence[int] = (8, 16, 32),
        fc_dim: int = 1024,
        mask_conv_dim: int = 256,
        embed_dim: int = 512,
        temperature: float = 50.0,
        cascade_weights: Sequence[Sequence[float]] = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0)),
        box_pooler_size: int = 7,
        mask_pooler_size: int = 14,
        score_thresh: float = 0.02,
        nms_thresh: float = 0.5,
        detections_per_image: int = 1000,
        mult_proposal_score: bool = True,
        one_class_per_proposal: bool = False,
    ):
        super().__init__()
        self.in_features = list(in_features)
        self.cascade_weights = [tuple(float(v) for v in w) for w in cascade_weights]
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_image = detections_per_image
        self.mult_proposal_score = mult_proposal_score
        self.one_class_per_proposal = one_class_per_proposal
        self.box_pooler = MultiScaleROIAlign(box_pooler_size, strides)
        self.mask_pooler = MultiScaleROIAlign(mask_pooler_size, strides)
        pooled_dim = channels * box_pooler_size**2
        stages = len(self.cascade_weights)
        self.box_head = nn.ModuleList(BoxHead(pooled_dim, fc_dim) for _ in range(stages))
        self.box_predictor = nn.ModuleList(BoxPredictor(fc_dim, num_classes, embed_dim, temperature) for _ in range(stages))
        self.mask_head = MaskHead(channels, mask_conv_dim)

    @property
    def num_classes(self) -> int:
        return self.box_predictor[0].cls_score.num_classes

    def set_vocabulary(self, embeddings: torch.Tensor) -> None:
        """Replace every stage's classifier by (C, D) class embeddings (Detic's reset_cls_test)."""
        weight = zero_shot_weight(embeddings)
        for predictor in self.box_predictor:
            old = predictor.cls_score.zs_weight
            if weight.shape[0] != old.shape[0]:
                raise ValueError(f"vocabulary embeddings have width {weight.shape[0]}, the classifier expects {old.shape[0]}")
            predictor.cls_score.zs_weight = weight.to(device=old.device, dtype=old.dtype)

    def run_cascade(self, features: dict[str, torch.Tensor], proposal_boxes: Sequence[torch.Tensor], image_sizes: Sequence[tuple[int, int]]) -> list[CascadeStepOutput]:
        """All stages: stage 0 pools the proposals; stage k > 0 the previous stage's clipped boxes."""
        feats = [features[f] for f in self.in_features]
        counts = [len(b) for b in proposal_boxes]
        boxes = list(proposal_boxes)
        outputs = []
        for k in range(len(self.cascade_weights)):
            if k > 0:
                prev = outputs[-1]
                decoded = apply_deltas(prev.box_deltas, torch.cat(prev.boxes_in), self.cascade_weights[k - 1])
                boxes = [clip_boxes(b, s) for b, s in zip(decoded.split(counts), image_sizes)]
            x = self.box_head[k](self.box_pooler(feats, boxes))
            logits, deltas = self.box_predictor[k](x)
            outputs.append(CascadeStepOutput(boxes, logits, deltas))
        return outputs

    def forward(
        self,
        features: dict[str, torch.Tensor],
        proposal_boxes: Sequence[torch.Tensor],
        proposal_scores: Sequence[torch.Tensor],
        image_sizes: Sequence[tuple[int, int]],
        with_masks: bool = True,
    ) -> list[RawDetections]:
        """Scores averaged over the stages, times the proposal score (sqrt), boxes from the last stage."""
        stages = self.run_cascade(features, proposal_boxes, image_sizes)
        counts = [len(b) for b in proposal_boxes]
        probs = sum(s.cls_logits.sigmoid() for s in stages) * (1.0 / len(stages))
        last = stages[-1]
        boxes = apply_deltas(last.box_deltas, torch.cat(last.boxes_in), self.cascade_weights[-1])
        results = []
        for i, (img_probs, img_boxes) in enumerate(zip(probs.split(counts), boxes.split(counts))):
            if self.mult_proposal_score:
                img_probs = (img_probs * proposal_scores[i][:, None]) ** 0.5
            if self.one_class_per_proposal:
                best = img_probs[:, :-1].max(dim=1).values
                img_probs = img_probs * (img_probs == best[:, None]).float()
            results.append(self._select(img_boxes, img_probs, image_sizes[i]))
        return self.predict_masks(features, results) if with_masks else results

    def _select(self, boxes: torch.Tensor, probs: torch.Tensor, size: tuple[int, int]) -> RawDetections:
        """detectron2's fast_rcnn_inference for class-agnostic boxes: threshold, per-class NMS, top-k."""
        valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(probs).all(dim=1)
        boxes, probs = boxes[valid], probs[valid]
        boxes = clip_boxes(boxes, size)
        probs = probs[:, :-1]
        keep = per_class_box_nms(boxes, probs, probs > self.score_thresh, self.nms_thresh)
        rows, classes = torch.nonzero(keep, as_tuple=True)
        scores = probs[rows, classes]
        order = torch.sort(scores, descending=True, stable=True).indices
        if self.detections_per_image >= 0:
            order = order[: self.detections_per_image]
        return RawDetections(boxes[rows[order]], scores[order], classes[order], tuple(size))

    def predict_masks(self, features: dict[str, torch.Tensor], detections: list[RawDetections]) -> list[RawDetections]:
        """Fill ``mask_probs`` (sigmoid of the mask head on each final box), in place."""
        feats = [features[f] for f in self.in_features]
        pooled = self.mask_pooler(feats, [d.boxes for d in detections])
        probs = self.mask_head(pooled).sigmoid() if len(pooled) else pooled.new_zeros((0, 1, 2 * pooled.shape[-1], 2 * pooled.shape[-1]))
        for det, p in zip(detections, probs.split([len(d) for d in detections])):
            det.mask_probs = p
        return detections
