"""CenterNet proposal generator as Detic configures it: class-agnostic heatmap only.

Each location of P3-P7 predicts an objectness heatmap logit and four distances (left, top,
right, bottom, in units of the level stride). Proposals are the locations whose heatmap
probability exceeds a threshold, the top-k per level, NMS over all levels, then the best
``post_nms_topk``; their score is sqrt(sigmoid(heatmap)) (the agnostic-heatmap rule upstream).
Names follow CenterNet2 (``centernet_head.bbox_tower``, ``bbox_pred``, ``scales``, ``agn_hm``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms


@dataclass
class Proposals:
    """Proposals of one image, sorted by descending score (boxes XYXY in the resized frame, unclipped)."""

    boxes: torch.Tensor
    scores: torch.Tensor

    def __len__(self) -> int:
        return len(self.boxes)


class Scale(nn.Module):
    def __init__(self, init_value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([init_value]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def _group_norm(channels: int) -> nn.GroupNorm:
    # Upstream: 32 groups (detectron2 "GN"), or 25 when the width is not a multiple of 32.
    return nn.GroupNorm(32 if channels % 32 == 0 else 25, channels)


class CenterNetHead(nn.Module):
    """Shared box tower over all levels; returns per-level ``reg`` (relu(scale * x)) and heatmap logits."""

    def __init__(self, channels: int, num_levels: int, num_box_convs: int = 4):
        super().__init__()
        tower: list[nn.Module] = []
        for _ in range(num_box_convs):
            tower += [nn.Conv2d(channels, channels, 3, padding=1), _group_norm(channels), nn.ReLU()]
        self.bbox_tower = nn.Sequential(*tower)
        self.bbox_pred = nn.Conv2d(channels, 4, 3, padding=1)
        self.scales = nn.ModuleList(Scale() for _ in range(num_levels))
        self.agn_hm = nn.Conv2d(channels, 1, 3, padding=1)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        regs, heatmaps = [], []
        for level, feature in enumerate(features):
            tower = self.bbox_tower(feature)
            heatmaps.append(self.agn_hm(tower))
            regs.append(F.relu(self.scales[level](self.bbox_pred(tower))))
        return regs, heatmaps


def location_grid(height: int, width: int, stride: int, device: torch.device) -> torch.Tensor:
    """(H*W, 2) pixel positions (x, y) of a level's locations: j*stride + stride//2."""
    xs = torch.arange(0, width * stride, step=stride, dtype=torch.float32, device=device)
    ys = torch.arange(0, height * stride, step=stride, dtype=torch.float32, device=device)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((xx.reshape(-1), yy.reshape(-1)), dim=1) + stride // 2


class CenterNet(nn.Module):
    def __init__(
        self,
        channels: int,
        in_features: Sequence[str] = ("p3", "p4", "p5", "p6", "p7"),
        strides: Sequence[int] = (8, 16, 32, 64, 128),
        num_box_convs: int = 4,
        score_thresh: float = 1e-4,
        pre_nms_topk: int = 1000,
        post_nms_topk: int = 256,
        nms_thresh: float = 0.9,
    ):
        super().__init__()
        self.in_features = list(in_features)
        self.strides = list(strides)
        self.score_thresh = score_thresh
        self.pre_nms_topk = pre_nms_topk
        self.post_nms_topk = post_nms_topk
        self.nms_thresh = nms_thresh
        self.centernet_head = CenterNetHead(channels, len(self.in_features), num_box_convs)

    def forward(self, features: dict[str, torch.Tensor]) -> list[Proposals]:
        regs, heatmaps = self.centernet_head([features[f] for f in self.in_features])
        return self.proposals_from_outputs(regs, heatmaps)

    @torch.no_grad()
    def proposals_from_outputs(self, regs: Sequence[torch.Tensor], heatmaps: Sequence[torch.Tensor]) -> list[Proposals]:
        """Decode head outputs into per-image proposals (one list entry per batch image)."""
        batch = heatmaps[0].shape[0]
        per_image: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(batch)]
        for level, (reg, logits) in enumerate(zip(regs, heatmaps)):
            stride = self.strides[level]
            _, _, h, w = logits.shape
            grid = location_grid(h, w, stride, logits.device)
            probs = logits.sigmoid().reshape(batch, -1)
            dists = (reg * stride).permute(0, 2, 3, 1).reshape(batch, -1, 4)
            for i in range(batch):
                loc = torch.nonzero(probs[i] > self.score_thresh).squeeze(1)
                scores = probs[i, loc]
                if len(loc) > self.pre_nms_topk:
                    scores, top = scores.topk(self.pre_nms_topk, sorted=False)
                    loc = loc[top]
                d, xy = dists[i, loc], grid[loc]
                boxes = torch.stack([xy[:, 0] - d[:, 0], xy[:, 1] - d[:, 1], xy[:, 0] + d[:, 2], xy[:, 1] + d[:, 3]], 1)
                boxes[:, 2] = torch.max(boxes[:, 2], boxes[:, 0] + 0.01)
                boxes[:, 3] = torch.max(boxes[:, 3], boxes[:, 1] + 0.01)
                per_image[i].append((boxes, scores.sqrt()))
        return [self._nms_and_topk(torch.cat([b for b, _ in p]), torch.cat([s for _, s in p])) for p in per_image]

    def _nms_and_topk(self, boxes: torch.Tensor, scores: torch.Tensor) -> Proposals:
        keep = batched_nms(boxes.float(), scores, torch.zeros_like(scores, dtype=torch.int64), self.nms_thresh)
        boxes, scores = boxes[keep], scores[keep]
        if len(scores) > self.post_nms_topk:
            # Upstream keeps every score >= the k-th best (ties may keep a few more).
            thresh = torch.kthvalue(scores.float().cpu(), len(scores) - self.post_nms_topk + 1).values
            keep = torch.nonzero(scores >= thresh.item()).squeeze(1)
            boxes, scores = boxes[keep], scores[keep]
        return Proposals(boxes, scores)
