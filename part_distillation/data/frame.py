"""The image frame every stage shares: original size -> fitted size -> square canvas.

docs/method.md#image-frame: "fit to 640" scales an image so its longer side is
``size`` (small images are scaled up), keeping the aspect ratio, with no padding. Stages
1-3 store masks in this *fitted* frame and record both sizes (``frame.as_record()``).
Where a square canvas is needed (training crops, ranking) the fitted image is padded at
the bottom/right to ``canvas x canvas``: the uint8 image with grey 128 *before*
normalisation, masks with 0. (Batching for the network then pads to a multiple of 32
with 0 *after* normalisation: ``data.batching.pad_batch``.)

Sizes are ``(height, width)`` everywhere; boxes are XYXY pixels.

The fitted size uses ``np.round(size * scale)``, as detectron2's ``ResizeScale`` (the
augmentation PartDistillation's mappers use) does; images are resized with PIL
bilinear as detectron2's ``ResizeTransform`` does for uint8 images; masks with nearest.

    frame = ImageFrame.fit(image.shape[:2])          # (480, 640) -> fitted (480, 640)
    fitted = frame.fit_image(image)                  # uint8 (h', w', 3)
    canvas = frame.pad_image(fitted)                 # uint8 (640, 640, 3), grey 128
    masks_fitted = frame.masks_to_fitted(masks)      # original -> fitted (nearest)
    masks_original = frame.masks_to_original(masks_fitted)
    record.update(frame.as_record())                 # {"original_size": [h, w], "fitted_size": [h', w']}
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
from PIL import Image

from part_distillation.masks import resize_masks_nearest

#: The reference's input size: longer side 640, square canvas 640x640.
FIT_SIZE = 640
#: Padding value of the uint8 image on the square canvas (before normalisation).
IMAGE_PAD_VALUE = 128
#: Padding value of masks on the square canvas (never 255/ignore).
MASK_PAD_VALUE = 0


def fitted_size(height: int, width: int, size: int = FIT_SIZE) -> tuple[int, int]:
    """(h, w) after scaling so the longer side is ``size`` (detectron2 ``ResizeScale`` rounding)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    scale = min(size / height, size / width)
    out = np.round(np.multiply((height, width), scale)).astype(int)
    return max(int(out[0]), 1), max(int(out[1]), 1)


def resize_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """PIL bilinear resize of an (H, W, 3) uint8 RGB image to ``shape`` = (h, w)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
    if tuple(image.shape[:2]) == tuple(shape):
        return image
    return np.asarray(Image.fromarray(image).resize((int(shape[1]), int(shape[0])), Image.BILINEAR))


@dataclass(frozen=True)
class ImageFrame:
    """One image's original size, fitted size and (optional) square canvas.

    ``canvas`` is the side of the square the fitted image is padded to (``None``: no
    padding). A frame is stored in records as ``{"original_size", "fitted_size"}``.
    """

    original: tuple[int, int]
    fitted: tuple[int, int]
    canvas: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "original", (int(self.original[0]), int(self.original[1])))
        object.__setattr__(self, "fitted", (int(self.fitted[0]), int(self.fitted[1])))
        if self.canvas is not None and (self.fitted[0] > self.canvas or self.fitted[1] > self.canvas):
            raise ValueError(f"fitted size {self.fitted} does not fit a {self.canvas}x{self.canvas} canvas")

    # -- construction -------------------------------------------------------------
    @classmethod
    def fit(cls, original: tuple[int, int], size: int = FIT_SIZE, canvas: int | None = None) -> "ImageFrame":
        """The frame of an image of ``original`` = (h, w) fitted to ``size``."""
        return cls(tuple(original), fitted_size(int(original[0]), int(original[1]), size), canvas)

    @classmethod
    def from_record(cls, record: Mapping, canvas: int | None = None) -> "ImageFrame":
        """The frame a record was written in (its ``original_size`` and ``fitted_size``)."""
        try:
            return cls(tuple(record["original_size"]), tuple(record["fitted_size"]), canvas)
        except KeyError as err:
            raise KeyError(f"record {record.get('key', '?')!r} has no {err.args[0]!r}: "
                           f"it was not written in the fitted frame") from None

    def as_record(self) -> dict:
        """The fields that say which frame a record's masks are in."""
        return {"original_size": list(self.original), "fitted_size": list(self.fitted)}

    def with_canvas(self, canvas: int | None) -> "ImageFrame":
        return ImageFrame(self.original, self.fitted, canvas)

    # -- geometry ---------------------------------------------------------------------
    @property
    def scale(self) -> tuple[float, float]:
        """(sy, sx): fitted / original along each axis."""
        return self.fitted[0] / self.original[0], self.fitted[1] / self.original[1]

    @property
    def padded(self) -> tuple[int, int]:
        """(h, w) of the canvas, or the fitted size without one."""
        return (self.canvas, self.canvas) if self.canvas is not None else self.fitted

    # -- images -----------------------------------------------------------------------
    def fit_image(self, image: np.ndarray) -> np.ndarray:
        """Original uint8 RGB image -> fitted (PIL bilinear)."""
        image = np.asarray(image)
        if tuple(image.shape[:2]) != self.original:
            raise ValueError(f"image of size {tuple(image.shape[:2])} is not in this frame's "
                             f"original size {self.original}")
        return resize_image(image, self.fitted)

    def pad_image(self, fitted: np.ndarray) -> np.ndarray:
        """Fitted uint8 image -> square canvas, grey ``IMAGE_PAD_VALUE`` at bottom/right."""
        return self._pad(np.asarray(fitted), IMAGE_PAD_VALUE)

    def pad_masks(self, masks: np.ndarray) -> np.ndarray:
        """Fitted (..., h, w) masks -> canvas, 0 at bottom/right."""
        masks = np.asarray(masks)
        if masks.ndim < 2:
            raise ValueError(f"masks must be (..., h, w), got shape {masks.shape}")
        moved = np.moveaxis(masks, (-2, -1), (0, 1))
        return np.moveaxis(self._pad(moved, MASK_PAD_VALUE), (0, 1), (-2, -1))

    def crop_to_fitted(self, array: np.ndarray) -> np.ndarray:
        """Anything on the canvas (or padded larger) whose last two axes are (H, W) -> fitted."""
        array = np.asarray(array)
        return array[..., : self.fitted[0], : self.fitted[1]]

    def _pad(self, array: np.ndarray, value: int) -> np.ndarray:
        """Pad the first two axes (h, w) of ``array`` to the canvas."""
        if tuple(array.shape[:2]) != self.fitted:
            raise ValueError(f"array of size {tuple(array.shape[:2])} is not in this frame's "
                             f"fitted size {self.fitted}")
        if self.canvas is None:
            return array
        out = np.full((self.canvas, self.canvas, *array.shape[2:]), value, dtype=array.dtype)
        out[: self.fitted[0], : self.fitted[1]] = array
        return out

    # -- masks and boxes both ways -------------------------------------------------
    def masks_to_fitted(self, masks: np.ndarray) -> np.ndarray:
        """Original-frame bool (..., H, W) masks -> fitted frame (nearest)."""
        return resize_masks_nearest(self._check_mask_size(masks, self.original), self.fitted)

    def masks_to_original(self, masks: np.ndarray) -> np.ndarray:
        """Fitted-frame bool (..., h, w) masks (or canvas-sized ones) -> original frame (nearest)."""
        masks = np.asarray(masks)
        if tuple(masks.shape[-2:]) == self.padded and self.padded != self.fitted:
            masks = self.crop_to_fitted(masks)
        return resize_masks_nearest(self._check_mask_size(masks, self.fitted), self.original)

    def boxes_to_fitted(self, boxes: np.ndarray) -> np.ndarray:
        """Original-frame XYXY boxes (N, 4) -> fitted frame."""
        sy, sx = self.scale
        return np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * np.array([sx, sy, sx, sy])

    def boxes_to_original(self, boxes: np.ndarray) -> np.ndarray:
        """Fitted-frame XYXY boxes (N, 4) -> original frame."""
        sy, sx = self.scale
        return np.asarray(boxes, dtype=np.float64).reshape(-1, 4) / np.array([sx, sy, sx, sy])

    @staticmethod
    def _check_mask_size(masks: np.ndarray, expected: tuple[int, int]) -> np.ndarray:
        masks = np.asarray(masks)
        if tuple(masks.shape[-2:]) != tuple(expected):
            raise ValueError(f"masks of size {tuple(masks.shape[-2:])} are not in the expected "
                             f"frame size {tuple(expected)}")
        return masks
