"""How a training run is put together, from plain values: the trainer with its data, loss,
optimiser, schedule and hooks, resumed from its run folder.

The stage side (``stages/training.py``) reads the run config, builds the model, dataset
and loss, and fills a :class:`TrainingRecipe`; what a training run does with them (DDP,
accumulation, AMP, the optimiser and schedule, checkpoints and resume, TensorBoard,
previews, periodic evaluation) is decided here once. Nothing here reads the run config.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from . import distributed
from .checkpoint import prepare_run_dir
from .hooks import Checkpointer, JSONWriter, PeriodicCheckpoint, PeriodicEval, ProgressLog, TensorBoardWriter
from .optim import build_adamw
from .sampler import GlobalBatchSampler, accumulation_steps
from .schedule import MultiStepSchedule
from .train_loop import LossFn, Trainer

log = logging.getLogger("part_distillation")


@dataclass(frozen=True)
class TrainingRecipe:
    """The settings of one training run as plain values (the training stages fill it from
    ``stage.*``; defaults: the reference's). ``batch_size`` is the global batch."""

    name: str
    run_dir: str
    max_iter: int
    batch_size: int
    per_device_batch: int
    lr: float
    seed: int = 0
    weight_decay: float = 0.05
    backbone_multiplier: float = 0.1
    steps: tuple[int, ...] = ()
    warmup_iters: int = 0
    warmup_factor: float = 0.001
    clip_grad_norm: float = 0.01  # 0: no clipping
    amp: bool = True
    num_workers: int = 0
    checkpoint_period: int = 5000
    checkpoint_minutes: float = 0.0
    keep_last: int = 3
    log_period: int = 20
    preview_period: int = 0
    eval_period: int = 0


@dataclass(frozen=True)
class RunFolder:
    """What the run folder's manifest records and compares (``engine.checkpoint.prepare_run_dir``):
    the resolved config, the keys that do not change what is trained, whether a changed
    config may replace the saved one."""

    config: Mapping[str, Any]
    ignore_keys: Sequence[str] = ()
    overwrite_config: bool = False


def data_loader_factory(dataset, collate_fn: Callable, global_batch: int, per_device_batch: int, seed: int,
                        num_workers: int):
    """``start_iter -> iterator of collated micro-batches`` of this rank (``engine.sampler``);
    ``dataset`` is indexed by ``(epoch, index)``."""
    def data(start_iter: int):
        sampler = GlobalBatchSampler(len(dataset), global_batch, per_device_batch, seed=seed,
                                     rank=distributed.rank(), world_size=distributed.world_size(),
                                     start_iter=start_iter)
        # A private generator: creating the loader must not draw from the global torch RNG
        # (it would shift the training noise of a resumed run).
        return iter(torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=num_workers,
            pin_memory=torch.cuda.is_available(), generator=torch.Generator(),
            persistent_workers=False))
    return data


def build_trainer(recipe: TrainingRecipe, model: nn.Module, dataset, collate_fn: Callable, loss_fn: LossFn, *,
                  run_folder: RunFolder, is_main: bool = True, preview=None,
                  evaluate=None) -> tuple[Trainer, Checkpointer]:
    """Trainer + checkpointer of ``recipe`` for ``model`` (on its device) and ``dataset``,
    resumed from the run folder's last checkpoint when there is one (the manifest is
    checked first, on the main process). ``preview(trainer) -> {tag: image}`` and
    ``evaluate(trainer) -> {name: value}`` are the TensorBoard previews and the periodic
    evaluation (every ``recipe.eval_period`` iterations when given)."""
    run_dir = Path(recipe.run_dir)
    accum = accumulation_steps(recipe.batch_size, distributed.world_size(), recipe.per_device_batch)
    if is_main:
        prepare_run_dir(run_dir, stage=recipe.name, config=dict(run_folder.config),
                        ignore_keys=tuple(run_folder.ignore_keys), overwrite_config=run_folder.overwrite_config)
    distributed.barrier()
    device = next(model.parameters()).device
    wrapped = distributed.wrap_ddp(model, device)
    optimizer = build_adamw(model, lr=recipe.lr, weight_decay=recipe.weight_decay,
                            backbone_multiplier=recipe.backbone_multiplier)
    schedule = MultiStepSchedule(recipe.lr, steps=tuple(recipe.steps), warmup_iters=recipe.warmup_iters,
                                 warmup_factor=recipe.warmup_factor)
    trainer = Trainer(wrapped, optimizer,
                      data_loader_factory(dataset, collate_fn, recipe.batch_size, recipe.per_device_batch,
                                          recipe.seed, recipe.num_workers),
                      loss_fn, schedule, max_iter=recipe.max_iter, accum=accum, global_batch=recipe.batch_size,
                      clip_norm=recipe.clip_grad_norm or None, amp=recipe.amp, device=device)
    checkpointer = Checkpointer(run_dir, keep_last=recipe.keep_last, period=recipe.checkpoint_period)
    trainer.register_hooks([
        PeriodicCheckpoint(checkpointer, recipe.checkpoint_period, recipe.checkpoint_minutes),  # before eval/logs
        PeriodicEval(evaluate, recipe.eval_period) if evaluate is not None and recipe.eval_period else None,
        ProgressLog(recipe.log_period, prefix=recipe.name),
        JSONWriter(run_dir, recipe.log_period),
        TensorBoardWriter(run_dir / "tensorboard", recipe.log_period, preview=preview,
                          preview_period=recipe.preview_period),
    ])
    checkpointer.resume(trainer)
    return trainer, checkpointer
