"""The one training wiring of the training stages (4, 6 and the two baselines).

Each stage builds what differs (its dataset: records, labels, filter; its class count; the
weights it starts from; the files its run folder keeps) and calls :func:`train_stage`;
the rest is the same for all: device, seeds, the Mask2Former and what is frozen, the
reference losses, the engine's trainer from ``stage.*`` (:func:`recipe_from_config`: the
only place that reads the training settings), periodic evaluation, previews, the summary.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from part_distillation.config import RunConfig
from part_distillation.context import JobContext
from part_distillation.data.part_records import PartRecordDataset, collate
from part_distillation.engine import distributed as ddp_utils
from part_distillation.engine.recipe import RunFolder, TrainingRecipe, build_trainer
from part_distillation.models.checkpoint import build_model, load_initial_weights
from part_distillation.models.criterion import HungarianMatcher, SetCriterion
from part_distillation.progress import StageSummary
from part_distillation.viz import score_overlay

log = logging.getLogger("part_distillation")

#: Config keys that do not change what is trained (where/how it runs, how often it logs).
NOT_TRAINING_KEYS = ("stage.num_workers", "stage.log_period", "stage.preview_period", "stage.eval_*",
                     "stage.checkpoint_period", "stage.checkpoint_minutes", "stage.keep_last",
                     "stage.per_device_batch")


def recipe_from_config(cfg: RunConfig) -> TrainingRecipe:
    """The engine's settings of ``cfg.stage`` (a ``TrainStageConfig``) as plain values."""
    stage = cfg.stage
    return TrainingRecipe(
        name=stage.name, run_dir=str(stage.output), max_iter=stage.max_iter, batch_size=stage.batch_size,
        per_device_batch=stage.per_device_batch, lr=stage.lr, seed=cfg.seed, weight_decay=stage.weight_decay,
        backbone_multiplier=stage.backbone_multiplier, steps=tuple(stage.steps), warmup_iters=stage.warmup_iters,
        warmup_factor=stage.warmup_factor, clip_grad_norm=stage.clip_grad_norm, amp=stage.amp,
        num_workers=stage.num_workers, checkpoint_period=stage.checkpoint_period,
        checkpoint_minutes=stage.checkpoint_minutes, keep_last=stage.keep_last, log_period=stage.log_period,
        preview_period=stage.preview_period, eval_period=stage.eval_period)


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


def conditioned_forward(device: torch.device):
    """The loss's ``forward`` for an object-conditioned model (stage 6): the batch's object
    classes select each image's K + 1 head rows."""
    def forward(model, batch):
        return model(batch["pixel_values"], object_class=batch["class_indices"].to(device))
    return forward


def mask2former_loss(criterion: SetCriterion, device: torch.device,
                     forward: Callable[[nn.Module, dict], Mapping[str, Any]] | None = None):
    """``loss_fn(model, batch)`` for the engine's trainer: a collated batch (``data.part_records.collate``)
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


def train_stage(cfg: RunConfig, context: JobContext, *, dataset: PartRecordDataset, num_classes: int,
                parts_per_class: int | None = None, weights: str | None = None,
                importance_sample_ratio: float = 0.0, evaluation: str | None = None,
                class_wnids: Sequence[str] | None = None, after_setup: Callable[[], None] | None = None,
                extra: Mapping[str, Any] | None = None, summary: StageSummary | None = None) -> StageSummary:
    """Train ``cfg.stage`` (a ``TrainStageConfig``) on ``dataset`` to ``stage.max_iter``,
    resuming from its run folder, and return the stage summary.

    The model: ``model.size`` with a ``num_classes`` + 1 class head, object-conditioned with
    K = ``parts_per_class`` when given (then ``num_classes`` = objects x K and the loss sees
    K + 1 classes per image), from ``weights`` (class head re-initialised). ``evaluation``:
    the predictor kind periodic evaluation scores (``stage.eval_*``; None: never), with the
    head's object classes ``class_wnids`` for stage 6. ``after_setup()`` runs on every rank
    once the run folder's manifest is checked, before training (files the run keeps besides
    its checkpoints); ``extra`` goes into the summary.
    """
    stage = cfg.stage
    summary = summary or StageSummary(stage.name, output=stage.output)
    device = ddp_utils.training_device(cfg.model.device, context.local_rank)
    if stage.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg.model.size, None, num_classes=num_classes, parts_per_class=parts_per_class)
    if weights:
        report = load_initial_weights(model, weights)
        log.info("initialised from %s (class head re-initialised): %s", weights, report)
    model.freeze(frozen_name_keys(stage), frozen_mode=stage.frozen_mode)
    model.to(device)
    ddp_utils.seed_all(cfg.seed, context.rank)  # then per-rank training noise
    evaluator = None
    if evaluation and stage.eval_period:  # the model in training, scored as the evaluate stage scores a checkpoint
        from part_distillation.stages.evaluate import training_evaluation  # its metrics stack, only when on

        evaluator = training_evaluation(stage, evaluation, class_wnids=class_wnids)
    criterion = reference_criterion(num_classes=parts_per_class or num_classes, num_points=stage.num_points,
                                    importance_sample_ratio=importance_sample_ratio)
    forward = conditioned_forward(device) if parts_per_class else None
    trainer, _ = build_trainer(
        recipe_from_config(cfg), model, dataset, collate, mask2former_loss(criterion.to(device), device, forward),
        run_folder=RunFolder(dataclasses.asdict(cfg), NOT_TRAINING_KEYS, cfg.overwrite_config),
        is_main=context.is_main, preview=proposal_preview(dataset, device), evaluate=evaluator)
    log.info("[%s] %d process(es) x %d images x %d accumulation = batch %d; %d images in %d record set(s) "
             "(%d filtered out); class head %d outputs; iterations %d..%d on %s%s", stage.name,
             ddp_utils.world_size(), stage.per_device_batch, trainer.accum, stage.batch_size, len(dataset),
             len(dataset.stores), dataset.filtered_out, num_classes + 1, trainer.iter, stage.max_iter, device,
             " with AMP" if trainer.amp else "")
    if after_setup is not None:
        after_setup()
    start = trainer.iter
    trainer.train()
    summary.seen = (trainer.iter - start) * stage.batch_size
    summary.extra.update({"iterations": trainer.iter, "resumed_at": start, "images": len(dataset), **(extra or {}),
                          "final_loss": round(trainer.metrics.get("total_loss", float("nan")), 5),
                          "run_dir": str(stage.output)})
    return summary.finish()
