"""Detic inference implemented on torch/torchvision (no detectron2), loading the public weights."""
from .centernet import CenterNet, Proposals
from .fpn import FPN
from .model import (
    ARCHITECTURES,
    LABELING_FIT_SIZE,
    DEFAULT_WEIGHTS_PATH,
    WEIGHTS_URL,
    CheckpointMismatchError,
    Detections,
    Detic,
    DeticConfig,
    build_detic,
    detector_postprocess,
    load_state_dict,
    nonempty_in,
    paste_masks,
    read_checkpoint,
    rescale_boxes,
    resize_image,
    resized_shape,
)
from .roi_heads import CascadeROIHeads, CascadeStepOutput, RawDetections
from .swin import SwinTransformer

__all__ = [
    "ARCHITECTURES",
    "LABELING_FIT_SIZE",
    "CascadeROIHeads",
    "CascadeStepOutput",
    "CenterNet",
    "CheckpointMismatchError",
    "DEFAULT_WEIGHTS_PATH",
    "Detections",
    "Detic",
    "DeticConfig",
    "FPN",
    "Proposals",
    "RawDetections",
    "SwinTransformer",
    "WEIGHTS_URL",
    "build_detic",
    "detector_postprocess",
    "load_state_dict",
    "nonempty_in",
    "paste_masks",
    "read_checkpoint",
    "rescale_boxes",
    "resize_image",
    "resized_shape",
]
