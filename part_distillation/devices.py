"""Which torch device a ``model.device`` setting means: written once for every stage.

``auto`` is the GPU when one is visible, else the CPU; ``cpu``; ``cuda`` (or ``cuda:N``)
needs a visible GPU and is refused with one line naming the setting otherwise, so a job
asked to run on a GPU never falls back to hours on the CPU unnoticed.
"""
from __future__ import annotations

import torch

from part_distillation.errors import ConfigError


class DeviceError(ConfigError):
    """A device setting this machine cannot honour; the message names the setting (one line)."""


def resolve_device(setting: str | torch.device = "auto", *, key: str = "model.device",
                   local_rank: int | None = None) -> torch.device:
    """The device ``setting`` (the value of config key ``key``) means on this machine.

    ``local_rank``: in a multi-process job, a bare ``cuda`` becomes
    ``cuda:<local_rank mod GPUs>`` so the processes of a node share its GPUs.
    """
    if isinstance(setting, torch.device):
        return setting
    setting = str(setting)
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    elif setting.split(":")[0] == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"config key '{key}' = '{setting}' but no GPU is visible; use auto or cpu")
    try:
        device = torch.device(setting)
    except RuntimeError:
        raise DeviceError(f"config key '{key}' = '{setting}': not a device (auto, cpu or cuda)") from None
    if device.type == "cuda" and device.index is None and local_rank is not None:
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


__all__ = ["DeviceError", "resolve_device"]
