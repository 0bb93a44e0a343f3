"""The Mask2Former training recipe shared by the four training stages (4, 6 and the two
baselines): from a training stage config, a model and a record dataset, the trainer with its
data, loss, optimiser and hooks.

The stage reads its config and builds the model and dataset; everything else about how
training runs (DDP, accumulation, AMP, the reference optimisation and schedule,
checkpoints and resume, TensorBoard, previews) is decided here once.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from part_distillation.data.part_records import PartRecordDataset, collate
from part_distillation.models.criterion import HungarianMatcher, SetCriterion
from part_distillation.viz import score_overlay

from . import distributed as ddp_utils
from .checkpoint import prepare_run_dir
from .hooks import Checkpointer, PeriodicCheckpoint, PeriodicEval, ProgressLog, TensorBoardWriter
from .optim import build_adamw
from .sampler import GlobalBatchSampler, accumulation_steps
from .schedule import MultiStepSchedule
from .train_loop import Trainer

log = logging.getLogger("part_distillation")

#: Config keys that do not change what is trained (where/how it runs, how often it logs).
NOT_TRAINING_KEYS = ("stage.num_workers", "stage.log_period", "stage.preview_period", "stage.eval_*",
                     "stage.checkpoint_period", "stage.checkpoint_minutes", "stage.keep_last",
                     "stage.per_device_batch")


def build_model(size: str, weights: str | None, num_classes: int = 1, parts_per_class: int | None = None):
    """The Mask2Former of ``model.size`` with a fresh ``num_classes`` + 1 class head
    (object-conditioned when ``parts_per_class`` = K is given: ``num_classes`` = objects x K);
    the other weights from ``weights`` (detectron2 ``.pkl`` or a project checkpoint) when given.
    An EfficientNet backbone starts from its ImageNet weights (``models.mask2former``)."""
    from part_distillation.models import checkpoint as ckpt
    from part_distillation.models.mask2former import build_mask2former, spec_name_for_size

    model = build_mask2former(spec_name_for_size(size), num_classes=num_classes, parts_per_class=parts_per_class)
    if weights:
        loader = ckpt.load_detectron2_pickle if str(weights).endswith(".pkl") else ckpt.load_project_checkpoint
        report = loader(model, weights, reinit_class_head=True)
        log.info("initialised from %s (class head re-initialised): %s", weights, report)
    return model


def frozen_name_keys(stage) -> tuple[str, ...]:
    """Parameter-name keys to freeze (the reference: names containing backbone or encoder)."""
    return tuple(key for key, on in (("backbone", stage.freeze_backbone), ("encoder", stage.freeze_encoder)) if on)


def reference_criterion(num_classes: int, num_points: int = 12544, importance_sample_ratio: float = 0.0) -> SetCriterion:
    """Section 4's losses: CE 2 (no-object 0.1), mask BCE 5, dice 5 on 12544 points,
    oversample 3, importance-sample ratio 0.0 (the reference runs; its supervised and
    few-shot baselines used 0.75)."""
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=num_points)
    return SetCriterion(num_classes, matcher, weights={"ce": 2.0, "mask": 5.0, "dice": 5.0},
                        no_object_weight=0.1, num_points=num_points, oversample_ratio=3.0,
                        importance_sample_ratio=importance_sample_ratio)


def mask2former_loss(criterion: SetCriterion, device: torch.device,
                     forward: Callable[[nn.Module, dict], Mapping[str, Any]] | None = None):
    """``loss_fn(model, batch)`` for :class:`Trainer`: a collated batch (``data.part_records.collate``)
    to the device, forward, criterion. ``forward`` overrides ``model(pixel_values)`` (stage 6
    passes the object classes)."""
    def loss_fn(model: nn.Module, batch: dict) -> Mapping[str, torch.Tensor]:
        pixel_values = batch["pixel_values"].to(device, non_blocking=True)
        targets = [{"labels": t["labels"].to(device), "masks": t["masks"].to(device)} for t in batch["targets"]]
        outputs = forward(model, {**batch, "pixel_values": pixel_values}) if forward else model(pixel_values)
        with torch.autocast(device.type, enabled=False):  # losses in float32 under AMP
            outputs = _to_float(outputs)
            return criterion(outputs, targets)
    return loss_fn


def _to_float(outputs):
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        return {k: _to_float(v) for k, v in outputs.items() if k in ("pred_logits", "pred_masks", "aux_outputs")}
    if isinstance(outputs, (list, tuple)):
        return [_to_float(v) for v in outputs]
    return outputs


def data_loader_factory(dataset: PartRecordDataset, global_batch: int, per_device_batch: int, seed: int,
                        num_workers: int):
    """``start_iter -> iterator of collated micro-batches`` of this rank (``engine.sampler``)."""
    def data(start_iter: int):
        sampler = GlobalBatchSampler(len(dataset), global_batch, per_device_batch, seed=seed,
                                     rank=ddp_utils.rank(), world_size=ddp_utils.world_size(),
                                     start_iter=start_iter)
        # A private generator: creating the loader must not draw from the global torch RNG
        # (it would shift the training noise of a resumed run).
        return iter(torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
            pin_memory=torch.cuda.is_available(), generator=torch.Generator(),
            persistent_workers=False))
    return data


def overlay_preview(image: torch.Tensor, masks: torch.Tensor, scores: torch.Tensor, max_masks: int = 8,
                    alpha: float = 0.5) -> np.ndarray:
    """(3, H, W) uint8 image with the ``max_masks`` best-scoring masks (N, H, W bool) painted
    by rank, the highest score on top (``viz.score_overlay``); returns (3, H, W) uint8."""
    drawn = score_overlay(image.permute(1, 2, 0).cpu().numpy().astype(np.uint8), masks.cpu().numpy().astype(bool),
                          scores.float().cpu().numpy(), max_masks=max_masks, alpha=alpha)
    return np.ascontiguousarray(drawn.transpose(2, 0, 1))


def proposal_preview(dataset: PartRecordDataset, device: torch.device, index: int = 0):
    """``preview(trainer) -> {"preview/parts": image}``: predicted parts (foreground
    probability, mask logit > 0) over a fixed training image (its epoch-0 augmentation),
    next to its target parts."""
    def preview(trainer) -> dict[str, np.ndarray]:
        sample = dataset[(0, index)]
        batch = collate([sample])
        model = trainer.module
        was_training = model.training
        model.eval()
        with torch.no_grad():
            if getattr(model, "parts_per_class", None) is not None:  # stage 6: the image's object class
                out = model(batch["pixel_values"].to(device), object_class=batch["class_indices"].to(device))
            else:
                out = model(batch["pixel_values"].to(device))
        model.train(was_training)
        h, w = sample["image"].shape[1:]
        masks = torch.nn.functional.interpolate(out["pred_masks"][:1].float(), size=batch["pixel_values"].shape[-2:],
                                                mode="bilinear", align_corners=False)[0, :, :h, :w] > 0
        scores = out["pred_logits"][0].float().softmax(-1)[:, :-1].max(-1).values
        return {"preview/parts": overlay_preview(sample["image"], masks, scores),
                "preview/targets": overlay_preview(sample["image"], sample["masks"],
                                                   torch.arange(len(sample["masks"]), 0, -1).float())}
    return preview


def build_trainer(run_cfg, context, model: nn.Module, dataset: PartRecordDataset, criterion: SetCriterion,
                  *, forward=None, preview=None, evaluate=None, ignore_keys=()) -> tuple[Trainer, Checkpointer]:
    """Trainer + checkpointer for ``run_cfg.stage`` (a ``TrainStageConfig``), resumed from
    the run folder's last checkpoint when there is one (the manifest is checked first;
    ``ignore_keys``: further keys that do not change what is trained; the store's
    ``DEFAULT_IGNORE_KEYS`` always apply)."""
    stage = run_cfg.stage
    run_dir = Path(stage.output)
    world = ddp_utils.world_size()
    accum = accumulation_steps(stage.batch_size, world, stage.per_device_batch)
    if context.is_main:
        prepare_run_dir(run_dir, stage=stage.name, config=dataclasses.asdict(run_cfg),
                        ignore_keys=NOT_TRAINING_KEYS + tuple(ignore_keys),
                        overwrite_config=run_cfg.overwrite_config)
    ddp_utils.barrier()
    device = next(model.parameters()).device
    wrapped = ddp_utils.wrap_ddp(model, device)
    optimizer = build_adamw(model, lr=stage.lr, weight_decay=stage.weight_decay,
                            backbone_multiplier=stage.backbone_multiplier)
    schedule = MultiStepSchedule(stage.lr, steps=tuple(stage.steps), warmup_iters=stage.warmup_iters,
                                 warmup_factor=stage.warmup_factor)
    trainer = Trainer(wrapped, optimizer,
                      data_loader_factory(dataset, stage.batch_size, stage.per_device_batch, run_cfg.seed,
                                          stage.num_workers),
                      mask2former_loss(criterion.to(device), device, forward), schedule,
                      max_iter=stage.max_iter, accum=accum, global_batch=stage.batch_size,
                      clip_norm=stage.clip_grad_norm or None, amp=stage.amp, device=device)
    checkpointer = Checkpointer(run_dir, keep_last=stage.keep_last, period=stage.checkpoint_period)
    trainer.register_hooks([
        PeriodicCheckpoint(checkpointer, stage.checkpoint_period, stage.checkpoint_minutes),  # before eval/logs
        PeriodicEval(evaluate, stage.eval_period) if evaluate is not None and stage.eval_period else None,
        ProgressLog(stage.log_period, prefix=stage.name),
        TensorBoardWriter(run_dir / "tensorboard", stage.log_period, preview=preview,
                          preview_period=stage.preview_period),
    ])
    checkpointer.resume(trainer)
    log.info("[%s] %d process(es) x %d images x %d accumulation = batch %d; %d images in %d record set(s) "
             "(%d filtered out); iterations %d..%d on %s%s", stage.name, world, stage.per_device_batch, accum,
             stage.batch_size, len(dataset), len(dataset.stores), dataset.filtered_out, trainer.iter,
             stage.max_iter, device, " with AMP" if trainer.amp else "")
    return trainer, checkpointer
