"""Training augmentation of docs/method.md#stage-4, as pure functions of a numpy Generator.

One call of :func:`augment` takes the fitted image (longer side = ``size``) and its part
masks (stage 6: already padded to the ``size`` x ``size`` canvas, see ``square_canvas``)
and applies, in the reference's order:

1. random horizontal flip (p = 0.5);
2. random crop keeping 90-100% of each side (independently for height and width);
3. random rescale: scale s ~ U(0.1, 2.0), the image resized by
   ``min(s * size / h, s * size / w)`` (detectron2 ``ResizeScale``);
4. fixed ``size`` x ``size`` crop (random offset when larger) and pad bottom/right, the
   uint8 image with grey 128, masks with 0 (detectron2 ``FixedSizeCrop``, masks never 255).

Then the part-area filter keeps parts whose area is > ``min_part_ratio`` (5%) of the total
part area after augmentation. :func:`augment_with_retries` repeats steps 1-4 up to
``max_tries`` (100) times until at least one part survives, then falls back to the weak
augmentation (the random flip, then the pad; no crop or rescale), as the reference's
``weak_augs``. With ``square_canvas`` (stage 6, the reference's ``SET_IMAGE_SQUARE``)
the fitted image is first padded to the ``size`` x ``size`` canvas (grey 128, masks 0)
and every augmentation starts from that canvas, so the flip mirrors the whole canvas and
the crop and rescale see its grey border. Randomness comes only from the Generator passed
in, so a sample's augmentation is a pure function of its seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from part_distillation.masks import resize_masks_nearest

from .frame import IMAGE_PAD_VALUE, MASK_PAD_VALUE, resize_image


@dataclass(frozen=True)
class AugmentConfig:
    """The reference's augmentation settings (``size`` = 640; the demo uses 128)."""

    size: int = 640
    flip_prob: float = 0.5
    crop_range: tuple[float, float] = (0.9, 1.0)
    scale_range: tuple[float, float] = (0.1, 2.0)
    min_part_ratio: float = 0.05
    max_tries: int = 100
    #: pad the fitted image to the size x size canvas before augmenting (stage 6's SET_IMAGE_SQUARE)
    square_canvas: bool = False


@dataclass
class Augmented:
    """An augmented sample: (size, size, 3) uint8 image, (N, size, size) bool masks, kept part indices."""

    image: np.ndarray
    masks: np.ndarray
    kept: np.ndarray  # (N,) int indices into the input masks
    weak: bool = False


def random_flip(image: np.ndarray, masks: np.ndarray, rng: np.random.Generator, prob: float):
    if rng.random() < prob:
        return image[:, ::-1], masks[..., ::-1]
    return image, masks


def random_relative_crop(image: np.ndarray, masks: np.ndarray, rng: np.random.Generator,
                         keep: tuple[float, float]):
    """Crop keeping a fraction U(keep) of each side, at a random position."""
    h, w = image.shape[:2]
    ch = max(1, int(round(h * rng.uniform(*keep))))
    cw = max(1, int(round(w * rng.uniform(*keep))))
    y0 = int(rng.integers(0, h - ch + 1))
    x0 = int(rng.integers(0, w - cw + 1))
    return image[y0:y0 + ch, x0:x0 + cw], masks[..., y0:y0 + ch, x0:x0 + cw]


def random_rescale(image: np.ndarray, masks: np.ndarray, rng: np.random.Generator,
                   scale_range: tuple[float, float], size: int):
    """Resize by ``min(s * size / h, s * size / w)`` with s ~ U(scale_range)."""
    h, w = image.shape[:2]
    s = rng.uniform(*scale_range)
    factor = min(s * size / h, s * size / w)
    shape = (max(1, int(round(h * factor))), max(1, int(round(w * factor))))
    return resize_image(np.ascontiguousarray(image), shape), resize_masks_nearest(masks, shape)


def fixed_size_crop_pad(image: np.ndarray, masks: np.ndarray, rng: np.random.Generator | None, size: int):
    """Crop to at most ``size`` x ``size`` (random offset; top-left without rng), then pad
    bottom/right to exactly that: image grey 128, masks 0."""
    h, w = image.shape[:2]
    y0 = int(rng.integers(0, h - size + 1)) if rng is not None and h > size else 0
    x0 = int(rng.integers(0, w - size + 1)) if rng is not None and w > size else 0
    image = image[y0:y0 + size, x0:x0 + size]
    masks = masks[..., y0:y0 + size, x0:x0 + size]
    out_image = np.full((size, size, 3), IMAGE_PAD_VALUE, dtype=np.uint8)
    out_image[:image.shape[0], :image.shape[1]] = image
    out_masks = np.full((masks.shape[0], size, size), MASK_PAD_VALUE, dtype=bool)
    out_masks[:, :masks.shape[1], :masks.shape[2]] = masks
    return out_image, out_masks


def fit(image: np.ndarray, masks: np.ndarray, size: int):
    """Scale so the longer side is ``size`` (image bilinear, masks nearest)."""
    from .frame import fitted_size

    shape = fitted_size(image.shape[0], image.shape[1], size)
    return resize_image(image, shape), resize_masks_nearest(masks, shape)


def part_area_filter(masks: np.ndarray, min_ratio: float) -> np.ndarray:
    """Indices of masks whose area is > ``min_ratio`` of the total area of all masks."""
    areas = masks.reshape(len(masks), -1).sum(1).astype(np.float64)
    total = areas.sum()
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(areas / total > min_ratio)


def augment(image: np.ndarray, masks: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> Augmented:
    """Strong augmentation (steps 1-4) of a fitted image and its (N, h, w) bool masks, then the filter."""
    image, masks = random_flip(image, masks, rng, cfg.flip_prob)
    image, masks = random_relative_crop(image, masks, rng, cfg.crop_range)
    image, masks = random_rescale(image, masks, rng, cfg.scale_range, cfg.size)
    image, masks = fixed_size_crop_pad(image, masks, rng, cfg.size)
    kept = part_area_filter(masks, cfg.min_part_ratio)
    return Augmented(image, masks[kept], kept)


def weak_augment(image: np.ndarray, masks: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> Augmented:
    """The fallback: the random flip, the image padded to ``size`` x ``size``, then the filter."""
    image, masks = random_flip(image, masks, rng, cfg.flip_prob)
    image, masks = fixed_size_crop_pad(image, masks, None, cfg.size)
    kept = part_area_filter(masks, cfg.min_part_ratio)
    return Augmented(image, masks[kept], kept, weak=True)


def augment_with_retries(image: np.ndarray, masks: np.ndarray, rng: np.random.Generator,
                         cfg: AugmentConfig) -> Augmented:
    """Up to ``cfg.max_tries`` strong augmentations until a part survives, else the weak one.

    ``image`` (h, w, 3) uint8 and ``masks`` (N, h, w) bool are in the fitted frame of
    longer side ``cfg.size``; with ``cfg.square_canvas`` they are padded to the canvas first.
    """
    if cfg.square_canvas:
        image, masks = fixed_size_crop_pad(image, masks, None, cfg.size)
    for _ in range(cfg.max_tries):
        out = augment(image, masks, rng, cfg)
        if len(out.kept):
            return out
    return weak_augment(image, masks, rng, cfg)
