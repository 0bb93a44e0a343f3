"""Stage 4 ``proposal_learning``: a class-agnostic part-proposal Mask2Former (PIPELINE.md section 4).

Mask2Former with one foreground class ("part"), its class head re-initialised and
everything else from the COCO instance weights when ``model.weights`` is given (the demo
trains the tiny model from scratch), backbone and pixel-decoder encoder frozen, trained
on the stage-3 records (``stage.input`` plus ``stage.extra_inputs``) with the engine's
reference recipe. Output under ``stage.output``: ``checkpoints/model_<iter>.pth``
(``model_<max_iter>.pth`` is the final one), ``tensorboard/``, and the manifest with the
resolved config. The checkpoint that ranking uses is chosen there (the reference: 40k).
"""
from __future__ import annotations

import logging

import torch

from part_distillation.config import RunConfig
from part_distillation.data.part_records import PartRecordDataset, RecordFilter, class_agnostic_labels
from part_distillation.data.transforms import AugmentConfig
from part_distillation.engine import distributed as ddp_utils
from part_distillation.engine.recipe import (build_model, build_trainer, frozen_name_keys, proposal_preview,
                                             reference_criterion)
from part_distillation.context import JobContext
from part_distillation.progress import StageSummary

from part_distillation.config import ProposalLearningStageConfig
from part_distillation.stages import TRAINING, StageSpec

SPEC = StageSpec("proposal_learning", ProposalLearningStageConfig, TRAINING, loads_weights=True,
                 model_family="mask2former")

log = logging.getLogger("part_distillation")


def check(cfg: RunConfig) -> None:
    """Before submission: periodic evaluation (``stage.eval_*``), when on, has its dataset."""
    from part_distillation.evaluation.during_training import check_training_evaluation

    check_training_evaluation(cfg.stage)


def training_dataset(cfg: RunConfig) -> PartRecordDataset:
    """The stage-3 records of ``stage.input`` and every ``stage.extra_inputs`` folder, read
    together as one training set (the reference trained on two label sets), filtered on
    ``object_ratio`` > ``min_object_area_ratio``; the fitted image is augmented (no square canvas)."""
    stage = cfg.stage
    return PartRecordDataset(
        [stage.input, *stage.extra_inputs],
        augment=AugmentConfig(size=stage.image_size, min_part_ratio=stage.min_part_area_ratio),
        filter=RecordFilter(min_object_ratio=stage.min_object_area_ratio, inclusive=False),
        labels=class_agnostic_labels, seed=cfg.seed)


def run(cfg: RunConfig, context: JobContext) -> StageSummary:
    summary = StageSummary(cfg.stage.name, output=cfg.stage.output)
    stage = cfg.stage
    if not stage.input:
        raise ValueError("stage.input is not set: give the stage-3 records (dense_crf output) to train on")
    device = ddp_utils.training_device(cfg.model.device, context.local_rank)
    if stage.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg.model.size, cfg.model.weights, num_classes=1)
    model.freeze(frozen_name_keys(stage), frozen_mode=stage.frozen_mode)
    model.to(device)
    ddp_utils.seed_all(cfg.seed, context.rank)  # then per-rank training noise
    dataset = training_dataset(cfg)
    evaluator = None
    if stage.eval_period:  # the model in training, scored as the evaluate stage scores a checkpoint
        from part_distillation.evaluation.during_training import training_evaluation

        evaluator = training_evaluation(stage, "proposal")
    trainer, _ = build_trainer(cfg, context, model, dataset, reference_criterion(num_classes=1, num_points=stage.num_points),
                               preview=proposal_preview(dataset, device), evaluate=evaluator)
    start = trainer.iter
    trainer.train()
    summary.seen = (trainer.iter - start) * stage.batch_size
    summary.extra.update({"iterations": trainer.iter, "resumed_at": start, "images": len(dataset),
                          "final_loss": round(trainer.metrics.get("total_loss", float("nan")), 5),
                          "run_dir": str(stage.output)})
    return summary.finish()
