"""Stage ``supervised_learning``: the supervised baseline, Mask2Former on labelled parts.

The reference's ``supervised_train_net.py`` baseline on the project's training engine:
the labelled split ``stage.split`` of ``stage.dataset`` (PartImageNet, Pascal-Part,
Cityscapes-Part or the synthetic dataset's PartImageNet-format json) is converted into
in-memory training records (``data/labelled_records.py``), then trained exactly like
stages 4/6 (augmentation, matcher and losses, optimiser, checkpoints and resume):

- ``stage.variant=proposal``: one class-agnostic foreground class, the model of stage 4;
- ``stage.variant=semantic``: one class per part class of the dataset (the class ids are
  the dataset's part ids, ``part_classes.json`` in the run folder names them), not
  object-conditioned, as the reference's ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` head.

Initialised from ``model.weights`` (the COCO instance weights; class head re-initialised;
the demo's tiny model from scratch). Output under ``stage.output`` as stages 4/6:
``checkpoints/model_<iter>.pth``, ``tensorboard/``, the manifest. The few-shot baseline
(``stages/fewshot_learning.py``) reuses :func:`prepare` and :func:`train`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from part_distillation.config import ConfigError, RunConfig
from part_distillation.context import JobContext
from part_distillation.data.labelled_records import RecordList, labelled_records, part_class_labels
from part_distillation.data.part_datasets import PartDatasetSplit, open_part_dataset
from part_distillation.data.part_records import PartRecordDataset, RecordFilter, class_agnostic_labels
from part_distillation.data.transforms import AugmentConfig
from part_distillation.engine import distributed as ddp_utils
from part_distillation.engine.recipe import (build_model, build_trainer, frozen_name_keys, proposal_preview,
                                             reference_criterion)
from part_distillation.engine.train_loop import Trainer
from part_distillation.progress import StageSummary
from part_distillation.store.files import atomic_write_json

from part_distillation.config import SupervisedLearningStageConfig
from part_distillation.stages import TRAINING, StageSpec

# model.weights, when given, is checked by its own check (with the baseline's hint)
SPEC = StageSpec("supervised_learning", SupervisedLearningStageConfig, TRAINING, model_family="mask2former")

log = logging.getLogger("part_distillation")

PART_CLASSES_FILE = "part_classes.json"


def open_split(stage) -> PartDatasetSplit:
    """The labelled split the stage trains on (one-line error naming the path when absent)."""
    return open_part_dataset(stage.dataset, stage.dataset_root, stage.split, stage.image_root,
                             stage.annotations_root)


def training_records(stage, split: PartDatasetSplit) -> list[dict]:
    """The split's images as training records (parts merged per class for ``semantic``)."""
    records, empty = labelled_records(split.samples(), fit_size=stage.image_size,
                                      merge_parts=stage.variant == "semantic")
    log.info("[%s] %s %s: %d labelled images (%d without parts)", stage.name, stage.dataset, stage.split,
             len(records), empty)
    if not records:
        raise ValueError(f"{stage.dataset} split {stage.split!r} under {stage.dataset_root} has no image with "
                         f"labelled parts: check stage.dataset_root and stage.split")
    return records


def num_model_classes(stage, split: PartDatasetSplit) -> int:
    """1 (proposal) or the dataset's number of part class ids (semantic)."""
    return 1 if stage.variant == "proposal" else split.num_parts


@dataclass
class Baseline:
    """A prepared baseline run: the trainer (resumed if the run folder has checkpoints)
    and what it trains on."""

    trainer: Trainer
    dataset: PartRecordDataset
    num_classes: int


def prepare(cfg: RunConfig, context: JobContext, split: PartDatasetSplit, records: Sequence[dict], *,
            weights: str | None) -> Baseline:
    """Model (from ``weights``, class head re-initialised), dataset, criterion and trainer."""
    stage = cfg.stage
    device = ddp_utils.training_device(cfg.model.device, context.local_rank)
    if stage.deterministic:
        torch.use_deterministic_algorithms(True)
    classes = num_model_classes(stage, split)
    dataset = PartRecordDataset(
        [RecordList(records, name=f"{stage.dataset} {stage.split}")],
        augment=AugmentConfig(size=stage.image_size, min_part_ratio=stage.min_part_area_ratio),
        filter=RecordFilter(min_object_ratio=stage.min_object_area_ratio, inclusive=True),
        labels=class_agnostic_labels if stage.variant == "proposal" else part_class_labels, seed=cfg.seed)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg.model.size, weights, num_classes=classes)
    model.freeze(frozen_name_keys(stage), frozen_mode=stage.frozen_mode)
    model.to(device)
    ddp_utils.seed_all(cfg.seed, context.rank)  # then per-rank training noise
    criterion = reference_criterion(num_classes=classes, num_points=stage.num_points,
                                    importance_sample_ratio=stage.importance_sample_ratio)
    trainer, _ = build_trainer(cfg, context, model, dataset, criterion, preview=proposal_preview(dataset, device))
    if context.is_main and stage.variant == "semantic":
        atomic_write_json(Path(stage.output) / PART_CLASSES_FILE,
                          {"dataset": stage.dataset, "part_names": list(split.part_names)})
    log.info("[%s] variant %s: %d class(es) + no-object", stage.name, stage.variant, classes)
    return Baseline(trainer, dataset, classes)


def train(cfg: RunConfig, baseline: Baseline, summary: StageSummary) -> StageSummary:
    """Train to ``stage.max_iter`` (from where the run folder stopped) and fill the summary."""
    trainer = baseline.trainer
    start = trainer.iter
    trainer.train()
    summary.seen = (trainer.iter - start) * cfg.stage.batch_size
    summary.extra.update({"iterations": trainer.iter, "resumed_at": start, "images": len(baseline.dataset),
                          "variant": cfg.stage.variant, "classes": baseline.num_classes,
                          "final_loss": round(trainer.metrics.get("total_loss", float("nan")), 5),
                          "run_dir": str(cfg.stage.output)})
    return summary.finish()


def check_dataset(stage) -> None:
    """Before submission: the dataset folder exists (its layout is checked when it is opened)."""
    if not Path(stage.dataset_root).is_dir():
        raise ConfigError(f"config key 'stage.dataset_root': {stage.dataset_root} is not a folder; give the "
                          f"{stage.dataset} dataset's root (README: Baselines, Evaluation)")


def check(cfg: RunConfig) -> None:
    """Before submission: the dataset folder and the weights file, when given, exist."""
    check_dataset(cfg.stage)
    if cfg.model.weights and not Path(cfg.model.weights).is_file():
        raise ConfigError(f"config key 'model.weights': {cfg.model.weights} not found (the COCO instance "
                          f"weights, see weights/README.md; model=mask2former_tiny trains from scratch)")


def run(cfg: RunConfig, context: JobContext) -> StageSummary:
    summary = StageSummary(cfg.stage.name, output=cfg.stage.output)
    split = open_split(cfg.stage)
    baseline = prepare(cfg, context, split, training_records(cfg.stage, split), weights=cfg.model.weights)
    return train(cfg, baseline, summary)


__all__ = ["Baseline", "PART_CLASSES_FILE", "check", "check_dataset", "num_model_classes", "open_split", "prepare", "run", "train",
           "training_records"]
