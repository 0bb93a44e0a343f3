"""Mask2Former training criterion: Hungarian matching and set losses on point samples.

Semantics follow Mask2Former's ``HungarianMatcher``/``SetCriterion`` (Cheng et al. 2022):
predictions are matched one-to-one to targets by a class + sigmoid-BCE + dice cost;
matched pairs get mask BCE and dice losses, every query gets a cross-entropy loss with
a down-weighted no-object class, and the same losses are applied to every auxiliary
(intermediate decoder) output. Mask terms are computed on point samples
(PointRend-style) instead of full masks, which keeps memory independent of resolution.

Masks are compared through normalised point coordinates in [0, 1] x [0, 1], so
predictions (at 1/4 of the input) and targets (at the padded input resolution) never
need to be resized to each other.

Shapes used throughout: ``B`` images, ``Q`` queries, ``C`` foreground classes (the
no-object class is index ``C``), ``N`` target masks, ``P`` points.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

Outputs = Mapping[str, object]
Target = Mapping[str, torch.Tensor]
MatchIndices = list[tuple[torch.Tensor, torch.Tensor]]

LOSS_NAMES = ("ce", "mask", "dice")


# --------------------------------------------------------------------------- points

def uniform_points(num_masks: int, num_points: int, device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform random (x, y) points in [0, 1]^2, shape (num_masks, num_points, 2)."""
    return torch.rand(num_masks, num_points, 2, device=device, dtype=dtype, generator=generator)


def point_sample(masks: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinearly read ``masks`` at normalised ``coords``.

    ``masks`` is (N, H, W) or (N, Ch, H, W); ``coords`` is (N, P, 2) with (x, y) in
    [0, 1] where 0 and 1 are the outer edges of the mask (``align_corners=False``).
    Returns (N, P) or (N, Ch, P). Points outside read zero.
    """
    squeeze_channel = masks.dim() == 3
    if squeeze_channel:
        masks = masks[:, None]
    grid = (2.0 * coords - 1.0).to(masks.dtype)[:, :, None, :]  # (N, P, 1, 2)
    values = F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    values = values[..., 0]  # (N, Ch, P)
    return values[:, 0] if squeeze_channel else values


def mask_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Uncertainty of a binary mask logit: highest where the logit is closest to 0."""
    return -logits.abs()


@torch.no_grad()
def importance_points(mask_logits: torch.Tensor, num_points: int, oversample_ratio: float = 3.0,
                      importance_sample_ratio: float = 0.75,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Points biased towards uncertain mask pixels (PointRend training sampling).

    Draws ``num_points * oversample_ratio`` uniform candidates, keeps the
    ``importance_sample_ratio * num_points`` most uncertain of them for each mask and
    fills the rest with fresh uniform points, so some coverage of the whole mask remains.
    With ``importance_sample_ratio == 0`` this is exactly :func:`uniform_points`.

    ``mask_logits`` is (N, h, w); returns (N, num_points, 2).
    """
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0.0 <= importance_sample_ratio <= 1.0:
        raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
    num_masks = mask_logits.shape[0]
    device = mask_logits.device
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    if num_uncertain == 0:
        return uniform_points(num_masks, num_points, device=device, generator=generator)

    num_candidates = int(num_points * oversample_ratio)
    candidates = uniform_points(num_masks, num_candidates, device=device, generator=generator)
    uncertainty = mask_uncertainty(point_sample(mask_logits.float(), candidates))  # (N, P')
    top = uncertainty.topk(num_uncertain, dim=1).indices  # (N, num_uncertain)
    chosen = torch.gather(candidates, 1, top[..., None].expand(-1, -1, 2))
    if num_random == 0:
        return chosen
    fresh = uniform_points(num_masks, num_random, device=device, generator=generator)
    return torch.cat([chosen, fresh], dim=1)


# --------------------------------------------------------------------------- losses

def sigmoid_bce_loss(point_logits: torch.Tensor, point_labels: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Per-mask mean BCE over points, summed over masks, divided by ``num_masks``."""
    loss = F.binary_cross_entropy_with_logits(point_logits, point_labels, reduction="none")
    return loss.mean(1).sum() / num_masks


def dice_loss(point_logits: torch.Tensor, point_labels: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Soft dice loss (+1 smoothing) per mask, summed over masks, divided by ``num_masks``."""
    probs = point_logits.sigmoid()
    numerator = 2 * (probs * point_labels).sum(-1)
    denominator = probs.sum(-1) + point_labels.sum(-1)
    loss = 1 - (numerator + 1) / (denominator + 1)
    return loss.sum() / num_masks


def pairwise_sigmoid_bce_cost(point_logits: torch.Tensor, point_labels: torch.Tensor) -> torch.Tensor:
    """Mean-over-points BCE between every prediction (Q, P) and every target (N, P): (Q, N)."""
    num_points = point_logits.shape[1]
    pos = F.binary_cross_entropy_with_logits(point_logits, torch.ones_like(point_logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(point_logits, torch.zeros_like(point_logits), reduction="none")
    cost = pos @ point_labels.T + neg @ (1 - point_labels).T
    return cost / num_points


def pairwise_dice_cost(point_logits: torch.Tensor, point_labels: torch.Tensor) -> torch.Tensor:
    """Dice loss between every prediction (Q, P) and every target (N, P): (Q, N)."""
    probs = point_logits.sigmoid()
    numerator = 2 * probs @ point_labels.T
    denominator = probs.sum(-1)[:, None] + point_labels.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


# --------------------------------------------------------------------------- matcher

class HungarianMatcher(nn.Module):
    """One-to-one assignment of predictions to targets, per image, minimising
    ``w_class * (-p(target class)) + w_mask * BCE + w_dice * dice``.

    Mask costs use ``num_points`` random points shared by all predictions and targets of
    an image. Returns, per image, ``(pred_idx, target_idx)`` int64 CPU tensors of length
    ``min(Q, N)``, with ``target_idx`` in ascending order.
    """

    def __init__(self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0,
                 num_points: int = 12544):
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("at least one matching cost weight must be non-zero")
        if num_points < 1:
            raise ValueError(f"num_points must be positive, got {num_points}")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def cost_matrix(self, logits: torch.Tensor, mask_logits: torch.Tensor, labels: torch.Tensor,
                    target_masks: torch.Tensor) -> torch.Tensor:
        """Matching cost (Q, N) for one image: logits (Q, C+1), mask_logits (Q, h, w),
        labels (N,), target_masks (N, H, W)."""
        device = mask_logits.device
        with torch.autocast(device_type=device.type, enabled=False):
            class_cost = -logits.float().softmax(-1)[:, labels]
            points = uniform_points(1, self.num_points, device=device)
            pred_points = point_sample(mask_logits.float(), points.expand(mask_logits.shape[0], -1, -1))
            target_points = point_sample(target_masks.to(device=device, dtype=torch.float32),
                                         points.expand(target_masks.shape[0], -1, -1))
            return (self.cost_class * class_cost
                    + self.cost_mask * pairwise_sigmoid_bce_cost(pred_points, target_points)
                    + self.cost_dice * pairwise_dice_cost(pred_points, target_points))

    @torch.no_grad()
    def forward(self, outputs: Outputs, targets: Sequence[Target]) -> MatchIndices:
        logits_all = outputs["pred_logits"]
        masks_all = outputs["pred_masks"]
        if len(targets) != logits_all.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {logits_all.shape[0]}")
        indices = []
        for logits, mask_logits, target in zip(logits_all, masks_all, targets):
            labels = target["labels"].to(logits.device)
            if labels.numel() == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(logits, mask_logits, labels, target["masks"])
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices

    def extra_repr(self) -> str:
        return (f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
                f"cost_dice={self.cost_dice}, num_points={self.num_points}")


# --------------------------------------------------------------------------- criterion

def pad_target_masks(targets: Sequence[Target], padded_size: tuple[int, int]) -> list[dict]:
    """Zero-pad every image's target masks (bottom/right) to the model's padded input size.

    The model saw each image padded bottom/right to ``padded_size`` (the batch canvas);
    the targets must be padded the same way so that the normalised coordinates of targets
    and predictions refer to the same canvas. A target larger than the canvas is refused.
    Masks become float.
    """
    height, width = int(padded_size[0]), int(padded_size[1])
    padded = []
    for i, target in enumerate(targets):
        masks = target["masks"]
        h, w = int(masks.shape[-2]), int(masks.shape[-1])
        if h > height or w > width:
            raise ValueError(f"target masks of image {i} are {h}x{w}, larger than the padded input "
                             f"{height}x{width} the model saw; give targets in the image's frame")
        masks = masks.float()
        if (h, w) != (height, width):
            masks = F.pad(masks, (0, width - w, 0, height - h))
        padded.append({**target, "masks": masks})
    return padded


def check_target_sizes(targets: Sequence[Target], padded_size: tuple[int, int]) -> None:
    """Refuse targets that are not exactly at the padded input size (one clear error)."""
    for i, target in enumerate(targets):
        size = tuple(int(v) for v in target["masks"].shape[-2:])
        if size != tuple(padded_size):
            raise ValueError(
                f"target masks of image {i} are {size[0]}x{size[1]} but the model's padded input is "
                f"{padded_size[0]}x{padded_size[1]} (mask stride x prediction size): pad the targets "
                f"like the input, or pass padded_size= to the criterion so it pads them")


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


class SetCriterion(nn.Module):
    """Mask2Former set loss with deep supervision.

    ``forward(outputs, targets)`` returns the weighted losses ``loss_ce``,
    ``loss_mask``, ``loss_dice`` for the final prediction and ``loss_<name>_<i>`` for
    ``outputs["aux_outputs"][i]``; :meth:`total_loss` sums them.

    ``outputs``: ``pred_logits`` (B, Q, C+1), ``pred_masks`` (B, Q, h, w) mask logits,
    optional ``aux_outputs`` (a list of dicts with the same two keys).
    ``targets``: one dict per image, ``labels`` int64 (N,) in [0, C) and ``masks`` (N, H, W)
    bool/float (any N, including 0).

    Target/prediction contract: predicted masks are at 1/``mask_stride`` of the padded
    input (B, 3, Hp, Wp) the model saw, so ``Hp, Wp = mask_stride * (h, w)``. Targets
    are either already padded to (Hp, Wp), or given in each image's frame (H <= Hp,
    W <= Wp, image at the top-left as the batching pads it) together with
    ``forward(..., padded_size=(Hp, Wp))``, in which case they are zero-padded
    bottom/right like the input. Anything else raises ``ValueError``: a target is never
    silently stretched over a canvas of another size.

    ``importance_sample_ratio`` defaults to 0.0 (uniform points), what the reference runs
    used; 0.75 is upstream Mask2Former's PointRend-style default.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher,
                 weights: Mapping[str, float] | None = None, no_object_weight: float = 0.1,
                 num_points: int = 12544, oversample_ratio: float = 3.0,
                 importance_sample_ratio: float = 0.0, mask_stride: int = 4):
        super().__init__()
        weights = dict({"ce": 2.0, "mask": 5.0, "dice": 5.0} if weights is None else weights)
        unknown = set(weights) - set(LOSS_NAMES)
        if unknown:
            raise ValueError(f"unknown loss weights {sorted(unknown)}; known: {LOSS_NAMES}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weights = {name: float(weights.get(name, 0.0)) for name in LOSS_NAMES}
        self.no_object_weight = no_object_weight
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        if mask_stride < 1:
            raise ValueError(f"mask_stride must be positive, got {mask_stride}")
        self.mask_stride = int(mask_stride)
        class_weight = torch.ones(num_classes + 1)
        class_weight[-1] = no_object_weight
        self.register_buffer("class_weight", class_weight, persistent=False)

    # -- individual losses (unweighted) --

    def loss_labels(self, logits: torch.Tensor, targets: Sequence[Target], indices: MatchIndices) -> torch.Tensor:
        """Cross-entropy over all queries; unmatched queries are trained towards no-object."""
        if logits.shape[-1] != self.num_classes + 1:
            raise ValueError(f"pred_logits has {logits.shape[-1]} classes, expected {self.num_classes + 1}")
        logits = logits.float()
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        for b, (target, (src, tgt)) in enumerate(zip(targets, indices)):
            if src.numel():
                target_classes[b, src.to(logits.device)] = target["labels"].to(logits.device)[tgt.to(logits.device)]
        return F.cross_entropy(logits.transpose(1, 2), target_classes,
                               self.class_weight.to(logits.device))

    def loss_masks(self, mask_logits: torch.Tensor, targets: Sequence[Target], indices: MatchIndices,
                   num_masks: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Sigmoid BCE and dice of matched pairs on (importance-sampled) points."""
        device = mask_logits.device
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)]).to(device)
        src_idx = torch.cat([src for src, _ in indices]).to(device)
        if src_idx.numel() == 0:
            zero = mask_logits.sum() * 0.0  # keeps the graph (and DDP) intact
            return zero, zero.clone()
        pred = mask_logits[batch_idx, src_idx].float()  # (M, h, w); fp32 keeps point coords exact
        target = torch.cat([t["masks"][tgt.to(t["masks"].device)] for t, (_, tgt) in zip(targets, indices)])
        target = target.to(device=device, dtype=torch.float32)

        with torch.no_grad():
            points = importance_points(pred.detach(), self.num_points, self.oversample_ratio,
                                       self.importance_sample_ratio)
            point_labels = point_sample(target, points)
        point_logits = point_sample(pred, points)
        return (sigmoid_bce_loss(point_logits, point_labels, num_masks),
                dice_loss(point_logits, point_labels, num_masks))

    # -- public --

    def num_target_masks(self, targets: Sequence[Target], device: torch.device) -> float:
        """Targets per worker, averaged over distributed workers, at least 1."""
        count = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        world_size = _world_size()
        if world_size > 1:
            torch.distributed.all_reduce(count)
        return torch.clamp(count / world_size, min=1).item()

    def layer_losses(self, outputs: Outputs, targets: Sequence[Target], num_masks: float) -> dict[str, torch.Tensor]:
        """Weighted losses of one prediction layer (its own matching)."""
        indices = self.matcher(outputs, targets)
        loss_mask, loss_dice = self.loss_masks(outputs["pred_masks"], targets, indices, num_masks)
        raw = {
            "ce": self.loss_labels(outputs["pred_logits"], targets, indices),
            "mask": loss_mask,
            "dice": loss_dice,
        }
        return {f"loss_{name}": raw[name] * self.weights[name] for name in LOSS_NAMES}

    def padded_input_size(self, outputs: Outputs) -> tuple[int, int]:
        """(Hp, Wp) of the input the model saw: ``mask_stride`` x the prediction size."""
        h, w = outputs["pred_masks"].shape[-2:]
        return int(h) * self.mask_stride, int(w) * self.mask_stride

    def forward(self, outputs: Outputs, targets: Sequence[Target],
                padded_size: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """Losses of every prediction layer; see the class docstring for the target sizes."""
        expected = self.padded_input_size(outputs)
        if padded_size is None:
            check_target_sizes(targets, expected)
            targets = [{**t, "masks": t["masks"].float()} for t in targets]
        else:
            padded_size = (int(padded_size[0]), int(padded_size[1]))
            if padded_size != expected:
                raise ValueError(
                    f"padded_size {padded_size[0]}x{padded_size[1]} does not match the predictions: "
                    f"{outputs['pred_masks'].shape[-2]}x{outputs['pred_masks'].shape[-1]} masks at stride "
                    f"{self.mask_stride} come from a {expected[0]}x{expected[1]} input")
            targets = pad_target_masks(targets, padded_size)
        num_masks = self.num_target_masks(targets, outputs["pred_logits"].device)
        losses = self.layer_losses(outputs, targets, num_masks)
        for i, aux in enumerate(outputs.get("aux_outputs") or []):
            for key, value in self.layer_losses(aux, targets, num_masks).items():
                losses[f"{key}_{i}"] = value
        return losses

    @staticmethod
    def total_loss(losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Sum of the (already weighted) losses returned by :meth:`forward`."""
        return sum(losses.values())

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, weights={self.weights}, "
                f"no_object_weight={self.no_object_weight}, num_points={self.num_points}, "
                f"oversample_ratio={self.oversample_ratio}, "
                f"importance_sample_ratio={self.importance_sample_ratio}, mask_stride={self.mask_stride}")
