"""What the training engine needs of torch.distributed: one code path for 1 and N processes.

The process group itself is set up by ``launch.distributed_context`` from the SLURM (or
torchrun) environment; here it is only used when it exists.
"""
from __future__ import annotations

import random
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from part_distillation.devices import resolve_device


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def training_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """``cuda:<local_rank mod GPUs>`` when CUDA is there (or asked for), else CPU (``devices.resolve_device``)."""
    return resolve_device(requested, local_rank=local_rank)


def wrap_ddp(model: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """``DistributedDataParallel`` when several processes train, the model itself otherwise."""
    if world_size() == 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                               find_unused_parameters=find_unused_parameters)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def mean_over_ranks(values: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Average scalar tensors over all processes (one all_reduce), as Python floats."""
    if not values:
        return {}
    names = sorted(values)
    stacked = torch.stack([values[n].detach().float().reshape(()) for n in names])
    if world_size() > 1:
        dist.all_reduce(stacked)
        stacked /= world_size()
    return dict(zip(names, stacked.cpu().tolist()))


def all_gather_objects(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (a one-element list in one process)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def seed_all(seed: int, rank_: int = 0) -> None:
    """Seed torch, numpy and random per rank (``seed + rank``): ranks draw different noise."""
    value = int(seed) + int(rank_)
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)
