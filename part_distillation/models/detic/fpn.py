"""Feature pyramid on top of the Swin outputs (detectron2 FPN with the P6/P7-from-P5 top block).

Names follow detectron2 (``fpn_lateral{s}``, ``fpn_output{s}``, ``top_block.p6/p7``, with ``s`` the
log2 of the input stride) so the Detic checkpoint loads directly.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class LastLevelP6P7(nn.Module):
    """P6 = conv(P5, stride 2), P7 = conv(relu(P6), stride 2), as CenterNet2's ``LastLevelP6P7_P5``."""

    def __init__(self, channels: int):
        super().__init__()
        self.p6 = nn.Conv2d(channels, channels, 3, 2, 1)
        self.p7 = nn.Conv2d(channels, channels, 3, 2, 1)

    def forward(self, p5: torch.Tensor) -> list[torch.Tensor]:
        p6 = self.p6(p5)
        return [p6, self.p7(F.relu(p6))]


class FPN(nn.Module):
    """Top-down pyramid with sum fusion; returns ``{"p3": ..., "p7": ...}`` (for swin1..swin3 inputs)."""

    def __init__(self, bottom_up: nn.Module, in_features: Sequence[str], out_channels: int):
        super().__init__()
        self.in_features = list(in_features)
        in_channels = [bottom_up.out_channels[f] for f in self.in_features]
        strides = [bottom_up.out_strides[f] for f in self.in_features]
        self.stages = [int(math.log2(s)) for s in strides]
        self.lateral_convs, self.output_convs = [], []
        for stage, channels in zip(self.stages, in_channels):
            lateral = nn.Conv2d(channels, out_channels, 1)
            output = nn.Conv2d(out_channels, out_channels, 3, padding=1)
            self.add_module(f"fpn_lateral{stage}", lateral)
            self.add_module(f"fpn_output{stage}", output)
            self.lateral_convs.append(lateral)
            self.output_convs.append(output)
        self.top_block = LastLevelP6P7(out_channels)
        self.bottom_up = bottom_up  # registered last, as upstream orders its state dict
        last = self.stages[-1]
        self.out_features = [f"p{s}" for s in self.stages] + [f"p{last + 1}", f"p{last + 2}"]
        self.out_strides = {f: 2 ** int(f[1:]) for f in self.out_features}
        self.size_divisibility = 32

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.from_bottom_up(self.bottom_up(x))

    def from_bottom_up(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The pyramid from already computed backbone features."""
        prev = self.lateral_convs[-1](feats[self.in_features[-1]])
        results = [self.output_convs[-1](prev)]
        for idx in range(len(self.in_features) - 2, -1, -1):
            top_down = F.interpolate(prev, scale_factor=2.0, mode="nearest")
            prev = self.lateral_convs[idx](feats[self.in_features[idx]]) + top_down
            results.insert(0, self.output_convs[idx](prev))
        results.extend(self.top_block(results[-1]))
        return dict(zip(self.out_features, results))
