"""Batching images the way detectron2 does, shared by Mask2Former and Detic (and the training
data's ``collate``, hence in ``data/``: models read it, data never imports models).

Both upstream models normalise with the same ImageNet statistics (RGB, 0..255) and
zero-pad after normalisation, bottom/right, to a multiple of 32 (``ImageList``);
matching that exactly is what makes outputs agree with the official checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch
from torch import Tensor

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
SIZE_DIVISIBILITY = 32


def pad_batch(tensors: Sequence[torch.Tensor], size_divisibility: int = SIZE_DIVISIBILITY) -> torch.Tensor:
    """Stack (C, h, w) tensors into (B, C, H, W), zero-padded bottom/right.

    H and W are the largest sizes in the batch rounded up to ``size_divisibility``.
    """
    if len(tensors) == 0:
        raise ValueError("pad_batch needs at least one tensor")
    div = max(int(size_divisibility), 1)
    height = -(-max(int(t.shape[-2]) for t in tensors) // div) * div
    width = -(-max(int(t.shape[-1]) for t in tensors) // div) * div
    batch = tensors[0].new_zeros((len(tensors), tensors[0].shape[0], height, width))
    for i, t in enumerate(tensors):
        batch[i, :, : t.shape[-2], : t.shape[-1]] = t
    return batch


@dataclass
class ImageBatch:
    """Model input: normalised, zero-padded images and each image's size before padding."""

    pixel_values: Tensor  # (B, 3, Hp, Wp)
    image_sizes: list[tuple[int, int]]  # (h, w) per image

    @property
    def padded_size(self) -> tuple[int, int]:
        return int(self.pixel_values.shape[-2]), int(self.pixel_values.shape[-1])


def preprocess_images(
    images: Sequence[np.ndarray | Tensor],
    *,
    size_divisibility: int = SIZE_DIVISIBILITY,
    device: torch.device | str | None = None,
) -> ImageBatch:
    """Normalise RGB images (values 0..255) and zero-pad them bottom/right into one batch.

    Accepts (H, W, 3) numpy arrays or (3, H, W) tensors. The padded size is the largest
    height/width in the batch rounded up to ``size_divisibility``; padding happens after
    normalisation (pad value 0), as detectron2's ``ImageList.from_tensors``.
    """
    if len(images) == 0:
        raise ValueError("preprocess_images needs at least one image")
    tensors = []
    for image in images:
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"numpy images must be (H, W, 3) RGB, got shape {image.shape}")
            image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        elif image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"tensor images must be (3, H, W) RGB, got shape {tuple(image.shape)}")
        tensors.append(image.to(device=device, dtype=torch.float32))
    mean = torch.tensor(PIXEL_MEAN, device=tensors[0].device).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=tensors[0].device).view(3, 1, 1)
    sizes = [(int(t.shape[1]), int(t.shape[2])) for t in tensors]
    batch = pad_batch([(t - mean) / std for t in tensors], size_divisibility)
    return ImageBatch(pixel_values=batch, image_sizes=sizes)


T = TypeVar("T")


def in_batches(items: Iterable[T], prepare: Callable[[T], object], forward: Callable[[list], list],
               batch_size: int, skip: tuple[type[BaseException], ...] = ()) -> Iterator[tuple[T, object]]:
    """Every item, in order, with what ``forward`` made of it, ``batch_size`` prepared items per call.

    ``prepare(item)``: the item's model input, or None to pass the item through untouched (it
    yields ``(item, None)``); an exception of a type in ``skip`` is yielded in place of the
    output (``(item, error)``). Else ``(item, (input, output))``. Items wait for their batch,
    so the order is kept whatever is skipped."""
    pending: list[tuple[T, object]] = []
    ready = 0

    def flush():
        inputs = [entry for _, entry in pending if isinstance(entry, _Input)]
        outputs = iter(forward([entry.value for entry in inputs]) if inputs else ())
        for item, entry in pending:
            yield item, ((entry.value, next(outputs)) if isinstance(entry, _Input) else entry)
        pending.clear()

    for item in items:
        try:
            value = prepare(item)
            entry = None if value is None else _Input(value)
        except skip as error:
            entry = error
        pending.append((item, entry))
        ready += isinstance(entry, _Input)
        if ready == batch_size:
            yield from flush()
            ready = 0
    yield from flush()


@dataclass(frozen=True)
class _Input:
    value: object
