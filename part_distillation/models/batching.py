"""Batching images the way detectron2 does, shared by Mask2Former and Detic.

Both upstream models normalise with the same ImageNet statistics (RGB, 0..255) and
zero-pad after normalisation, bottom/right, to a multiple of 32 (``ImageList``);
matching that exactly is what makes outputs agree with the official checkpoints.
"""
from __future__ import annotations

from typing import Sequence

import torch

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
