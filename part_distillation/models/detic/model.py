"""Detic (Zhou et al. 2022) for inference: Swin-B + FPN, CenterNet proposals, cascade ROI heads
with a CLIP zero-shot classifier, class-agnostic masks.

``Detic.predict`` takes RGB uint8 images and returns detections at the original image size (or
at given output sizes): resize (PIL bilinear), normalise, zero-pad to 32, run, rescale boxes and
paste masks. Two input rules: detectron2's ``DefaultPredictor`` (shortest edge 800, max 1333: the
upstream demo, and the reference fixture) and PartDistillation's labelling preset
(:meth:`DeticConfig.for_labeling`: the image fitted to 640 with ``data/frame.py``, detections and
masks in that fitted frame). The classifier's vocabulary is swapped with ``set_vocabulary``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...data.frame import fitted_size, resize_image
from part_distillation.data.batching import PIXEL_MEAN, PIXEL_STD, pad_batch
from ..errors import CheckpointMismatchError
from part_distillation.state_file import read_model_state
from .centernet import CenterNet
from .fpn import FPN
from .roi_heads import CascadeROIHeads, RawDetections, clip_boxes
from .swin import SwinTransformer

WEIGHTS_NAME = "Detic_LCOCOI21k_CLIP_SwinB_896b32_4x_ft4x_max-size.pth"
WEIGHTS_URL = f"https://dl.fbaipublicfiles.com/detic/{WEIGHTS_NAME}"
DEFAULT_WEIGHTS_PATH = Path("weights/detic") / WEIGHTS_NAME


@dataclass(frozen=True)
class DeticConfig:
    """Architecture and inference settings; defaults are the public Swin-B LVIS+COCO+IN-21k model."""

    swin_embed_dim: int = 128
    swin_depths: tuple[int, ...] = (2, 2, 18, 2)
    swin_num_heads: tuple[int, ...] = (4, 8, 16, 32)
    swin_window_size: int = 7
    fpn_channels: int = 256
    num_classes: int = 22047
    box_fc_dim: int = 1024
    mask_conv_dim: int = 256
    text_embed_dim: int = 512
    norm_temperature: float = 50.0
    cascade_bbox_reg_weights: tuple[tuple[float, ...], ...] = (
        (10.0, 10.0, 5.0, 5.0),
        (20.0, 20.0, 10.0, 10.0),
        (30.0, 30.0, 15.0, 15.0),
    )
    # CenterNet proposals
    proposal_score_thresh: float = 1e-4
    proposal_pre_nms_topk: int = 1000
    proposal_post_nms_topk: int = 256
    proposal_nms_thresh: float = 0.9
    # ROI heads
    score_thresh: float = 0.02
    nms_thresh: float = 0.5
    detections_per_image: int = 300
    mult_proposal_score: bool = True
    one_class_per_proposal: bool = False
    # Input
    resize: str = "shortest_edge"  # or "fit": longer side to min_size_test (data/frame.py, PartDistillation)
    min_size_test: int = 800
    max_size_test: int = 1333
    pixel_mean: tuple[float, float, float] = PIXEL_MEAN
    pixel_std: tuple[float, float, float] = PIXEL_STD
    size_divisibility: int = 32
    mask_threshold: float = 0.5

    @classmethod
    def for_labeling(cls, architecture: str = "swinb", **overrides) -> "DeticConfig":
        """PartDistillation's object-mask settings (docs/method.md#stage-1) on a named architecture.

        The image fitted to 640 (longer side, ``data/frame.py``), score threshold 0.02, NMS 0.5,
        at most 1000 detections; ``overrides`` change any of them.
        """
        if architecture not in ARCHITECTURES:
            raise KeyError(f"unknown Detic architecture {architecture!r}; known: {sorted(ARCHITECTURES)}")
        base = dict(ARCHITECTURES[architecture], resize="fit", min_size_test=LABELING_FIT_SIZE,
                    score_thresh=0.02, nms_thresh=0.5, detections_per_image=1000)
        base.update(overrides)
        return cls(**base)


#: PartDistillation's labelling input: the longer side fitted to 640 (docs/method.md#image-frame).
LABELING_FIT_SIZE = 640

#: Architectures by name (``model.size``): the public Swin-B model, and the tiny reference fixture
#: (``shared/reference/models/detic_tiny.pth``, random weights, for tests).
ARCHITECTURES: dict[str, dict] = {
    "swinb": {},
    "tiny": dict(swin_embed_dim=32, swin_depths=(1, 1, 2, 1), swin_num_heads=(1, 2, 4, 8), fpn_channels=64,
                 num_classes=5, box_fc_dim=128, mask_conv_dim=64, one_class_per_proposal=True),
}


@dataclass
class Detections:
    """Detections of one image at the output size, by descending score."""

    boxes: torch.Tensor  # (N, 4) XYXY pixels
    scores: torch.Tensor  # (N,)
    classes: torch.Tensor  # (N,) int64 index into the vocabulary
    masks: torch.Tensor  # (N, H, W) bool
    image_size: tuple[int, int]  # (H, W)

    def __len__(self) -> int:
        return len(self.boxes)


# ---------------------------------------------------------------------------------------------
# Pre- and post-processing


def resized_shape(height: int, width: int, mode: str, size: int, max_size: int) -> tuple[int, int]:
    """Output (h, w) of detectron2's ResizeShortestEdge ("shortest_edge") or the image frame's fit ("fit")."""
    if mode == "shortest_edge":
        scale = size * 1.0 / min(height, width)
        newh, neww = (size * 1.0, scale * width) if height < width else (scale * height, size * 1.0)
        if max(newh, neww) > max_size:
            scale = max_size * 1.0 / max(newh, neww)
            newh, neww = newh * scale, neww * scale
        return int(newh + 0.5), int(neww + 0.5)
    if mode == "fit":
        return fitted_size(height, width, size)
    raise ValueError(f"unknown resize mode {mode!r}; expected 'shortest_edge' or 'fit'")


#: Upper bound on the float buffer of one chunk of masks pasted together on a GPU (as detectron2).
GPU_PASTE_BYTES = 1 << 30


def _paste_region(masks: torch.Tensor, boxes: torch.Tensor, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    """Bilinear samples (align_corners=False) of (N, 1, M, M) masks at the pixel centres of a region."""
    bx0, by0, bx1, by1 = torch.split(boxes.float(), 1, dim=1)
    ys = (torch.arange(y0, y1, device=boxes.device, dtype=torch.float32) + 0.5 - by0) / (by1 - by0) * 2 - 1
    xs = (torch.arange(x0, x1, device=boxes.device, dtype=torch.float32) + 0.5 - bx0) / (bx1 - bx0) * 2 - 1
    n, h, w = len(masks), ys.shape[1], xs.shape[1]
    grid = torch.stack([xs[:, None, :].expand(n, h, w), ys[:, :, None].expand(n, h, w)], dim=3)
    return F.grid_sample(masks.float(), grid, align_corners=False)[:, 0]


def paste_masks(mask_probs: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], threshold: float | None = 0.5) -> torch.Tensor:
    """detectron2's paste_masks_in_image: (N, M, M) box-relative probabilities -> (N, H, W) bool masks.

    As upstream: on CPU each mask is resampled only over the pixels near its box; on a GPU masks
    are pasted over the whole image in chunks (same values: outside its box a mask is < 0.5).
    ``threshold=None`` returns the pasted probabilities instead of binary masks.
    """
    img_h, img_w = int(size[0]), int(size[1])
    dtype = torch.float32 if threshold is None else torch.bool
    out = torch.zeros((len(mask_probs), img_h, img_w), dtype=dtype, device=mask_probs.device)
    if len(mask_probs) == 0:
        return out
    masks = mask_probs[:, None]
    if mask_probs.device.type == "cpu":
        for i in range(len(masks)):
            box = boxes[i : i + 1].float()
            x0, y0 = torch.clamp(box[0, :2].floor() - 1, min=0).to(torch.int32).tolist()
            x1 = int(torch.clamp(box[0, 2].ceil() + 1, max=img_w))
            y1 = int(torch.clamp(box[0, 3].ceil() + 1, max=img_h))
            pasted = _paste_region(masks[i : i + 1], box, y0, y1, x0, x1)[0]
            out[i, y0:y1, x0:x1] = pasted if threshold is None else pasted >= threshold
        return out
    per_chunk = max(1, GPU_PASTE_BYTES // (4 * img_h * img_w))
    for start in range(0, len(masks), per_chunk):
        pasted = _paste_region(masks[start : start + per_chunk], boxes[start : start + per_chunk], 0, img_h, 0, img_w)
        out[start : start + per_chunk] = pasted if threshold is None else pasted >= threshold
    return out


def rescale_boxes(boxes: torch.Tensor, from_size: tuple[int, int], to_size: tuple[int, int]) -> torch.Tensor:
    """Boxes scaled from one (h, w) frame to another and clipped to it."""
    boxes = boxes.clone()
    boxes[:, 0::2] *= to_size[1] / from_size[1]
    boxes[:, 1::2] *= to_size[0] / from_size[0]
    return clip_boxes(boxes, to_size)


def nonempty_in(raw: RawDetections, output_size: tuple[int, int]) -> torch.Tensor:
    """Which detections keep a non-empty box once mapped to ``output_size`` (the others are dropped)."""
    boxes = rescale_boxes(raw.boxes, raw.image_size, output_size)
    return ((boxes[:, 2] - boxes[:, 0]) > 0) & ((boxes[:, 3] - boxes[:, 1]) > 0)


def detector_postprocess(raw: RawDetections, output_size: tuple[int, int], mask_threshold: float = 0.5) -> Detections:
    """Map detections from the network frame to ``output_size``: scale, clip, drop empty boxes, paste masks."""
    out_h, out_w = output_size
    boxes = rescale_boxes(raw.boxes, raw.image_size, (out_h, out_w))
    keep = ((boxes[:, 2] - boxes[:, 0]) > 0) & ((boxes[:, 3] - boxes[:, 1]) > 0)
    boxes = boxes[keep]
    if raw.mask_probs is None:
        masks = torch.zeros((len(boxes), out_h, out_w), dtype=torch.bool, device=boxes.device)
    else:
        masks = paste_masks(raw.mask_probs[keep][:, 0], boxes, (out_h, out_w), mask_threshold)
    return Detections(boxes, raw.scores[keep], raw.classes[keep], masks, (int(out_h), int(out_w)))


# ---------------------------------------------------------------------------------------------
# The model


class Detic(nn.Module):
    def __init__(self, config: DeticConfig = DeticConfig()):
        super().__init__()
        self.config = config
        c = config
        swin = SwinTransformer(c.swin_embed_dim, c.swin_depths, c.swin_num_heads, c.swin_window_size)
        self.backbone = FPN(swin, ("swin1", "swin2", "swin3"), c.fpn_channels)
        strides = [self.backbone.out_strides[f] for f in ("p3", "p4", "p5", "p6", "p7")]
        self.proposal_generator = CenterNet(
            c.fpn_channels,
            ("p3", "p4", "p5", "p6", "p7"),
            strides,
            score_thresh=c.proposal_score_thresh,
            pre_nms_topk=c.proposal_pre_nms_topk,
            post_nms_topk=c.proposal_post_nms_topk,
            nms_thresh=c.proposal_nms_thresh,
        )
        self.roi_heads = CascadeROIHeads(
            c.fpn_channels,
            c.num_classes,
            ("p3", "p4", "p5"),
            strides[:3],
            fc_dim=c.box_fc_dim,
            mask_conv_dim=c.mask_conv_dim,
            embed_dim=c.text_embed_dim,
            temperature=c.norm_temperature,
            cascade_weights=c.cascade_bbox_reg_weights,
            score_thresh=c.score_thresh,
            nms_thresh=c.nms_thresh,
            detections_per_image=c.detections_per_image,
            mult_proposal_score=c.mult_proposal_score,
            one_class_per_proposal=c.one_class_per_proposal,
        )
        self.register_buffer("pixel_mean", torch.tensor(c.pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(c.pixel_std).view(-1, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def num_classes(self) -> int:
        return self.roi_heads.num_classes

    def set_vocabulary(self, embeddings: torch.Tensor | np.ndarray) -> None:
        """Classify against (C, D) text embeddings (e.g. CLIP "a {name}"), replacing the stored vocabulary."""
        if not isinstance(embeddings, torch.Tensor):
            embeddings = torch.from_numpy(np.asarray(embeddings))
        if embeddings.ndim != 2:
            raise ValueError(f"vocabulary embeddings must be (C, D), got shape {tuple(embeddings.shape)}")
        self.roi_heads.set_vocabulary(embeddings)

    def preprocess(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Resize, normalise and zero-pad RGB uint8 images into one (B, 3, H, W) batch."""
        c = self.config
        tensors, sizes = [], []
        for image in images:
            shape = resized_shape(image.shape[0], image.shape[1], c.resize, c.min_size_test, c.max_size_test)
            resized = resize_image(image, shape)
            x = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1), device=self.device)
            tensors.append((x - self.pixel_mean) / self.pixel_std)
            sizes.append(shape)
        return self.pad(tensors), sizes

    def pad(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return pad_batch(tensors, self.config.size_divisibility)

    @torch.no_grad()
    def predict(
        self,
        images: np.ndarray | Sequence[np.ndarray],
        output_sizes: Sequence[tuple[int, int]] | None = None,
        select: Callable[[int, RawDetections], torch.Tensor] | None = None,
    ) -> list[Detections]:
        """RGB uint8 (H, W, 3) image(s) -> detections at the original size (or ``output_sizes``);
        under the labelling preset (``resize="fit"``) at the fitted size instead (the frame of
        ``data/frame.py``; an image already fitted is not resized again).

        ``select(image_index, detections)`` may pick a subset (an index tensor into the detections,
        which are by descending score and already free of boxes that would become empty) before
        the mask head and the paste run: with 1000 detections per image, the mask head dominates
        the cost, and a caller keeping the top few per image only pays for those.
        """
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = [images]
        batch, sizes = self.preprocess(images)
        if output_sizes is None:  # the fitted frame under the labelling preset, else the original
            output_sizes = list(sizes) if self.config.resize == "fit" else [tuple(im.shape[:2]) for im in images]
        features = self.backbone(batch)
        proposals = self.proposal_generator(features)
        raws = self.roi_heads(features, [p.boxes for p in proposals], [p.scores for p in proposals], sizes, with_masks=False)
        raws = [r.select(torch.nonzero(nonempty_in(r, s)).squeeze(1)) for r, s in zip(raws, output_sizes)]
        if select is not None:
            raws = [r.select(torch.as_tensor(select(i, r), dtype=torch.int64, device=r.boxes.device)) for i, r in enumerate(raws)]
        raws = self.roi_heads.predict_masks(features, raws)
        return [detector_postprocess(r, s, self.config.mask_threshold) for r, s in zip(raws, output_sizes)]


# ---------------------------------------------------------------------------------------------
# Weights


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a Detic ``.pth`` (``{'model': state_dict}`` or a bare state dict), loaded safely."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Detic weights not found at {path}. Download {WEIGHTS_URL} and place it there "
            f"(expected layout: {DEFAULT_WEIGHTS_PATH})."
        )
    return read_model_state(path)


#: Entries some detectron2 versions saved that carry no weights here (the config holds them).
IGNORED_CHECKPOINT_KEYS = ("pixel_mean", "pixel_std")


def load_state_dict(model: Detic, state: Mapping[str, torch.Tensor], max_listed: int = 10) -> None:
    """Strict load with readable errors. The stored vocabulary (``zs_weight``) is adopted whatever its size.

    ``relative_position_index`` buffers may be absent (they are recomputed identically), and the
    ``pixel_mean``/``pixel_std`` entries of older detectron2 checkpoints are ignored.
    """
    state = {k: v for k, v in state.items() if k not in IGNORED_CHECKPOINT_KEYS}
    own = model.state_dict()
    zs_keys = {f"roi_heads.box_predictor.{k}.cls_score.zs_weight" for k in range(len(model.roi_heads.box_predictor))}
    missing = [k for k in own if k not in state and not k.endswith("relative_position_index")]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        (k, tuple(state[k].shape), tuple(own[k].shape))
        for k in own
        if k in state
        and tuple(state[k].shape) != tuple(own[k].shape)
        and not (k in zs_keys and state[k].ndim == 2 and state[k].shape[0] == own[k].shape[0])
    ]
    if missing or unexpected or mismatched:
        lines = []
        if mismatched:
            lines.append(
                f"{len(mismatched)} shape mismatches (checkpoint vs model), first: "
                + "; ".join(f"{k}: {a} vs {b}" for k, a, b in mismatched[:max_listed])
            )
        if missing:
            lines.append(f"{len(missing)} missing keys, first: " + ", ".join(missing[:max_listed]))
        if unexpected:
            lines.append(f"{len(unexpected)} unexpected keys, first: " + ", ".join(unexpected[:max_listed]))
        raise CheckpointMismatchError("Detic checkpoint does not match the model:\n  " + "\n  ".join(lines))
    for k, predictor in enumerate(model.roi_heads.box_predictor):
        old = predictor.cls_score.zs_weight  # resized to the stored vocabulary before copying
        predictor.cls_score.zs_weight = old.new_empty(state[f"roi_heads.box_predictor.{k}.cls_score.zs_weight"].shape)
    model.load_state_dict(state, strict=False)


def build_detic(
    weights: str | Path | None = DEFAULT_WEIGHTS_PATH,
    config: DeticConfig | None = None,
    vocabulary: torch.Tensor | np.ndarray | None = None,
    device: str | torch.device = "cpu",
) -> Detic:
    """Build, load weights (``None`` keeps the random init), optionally swap the vocabulary; eval mode."""
    config = config or DeticConfig()
    model = Detic(config)
    if weights is not None:
        load_state_dict(model, read_checkpoint(weights))
    if vocabulary is not None:
        model.set_vocabulary(vocabulary)
    return model.to(device).eval()
