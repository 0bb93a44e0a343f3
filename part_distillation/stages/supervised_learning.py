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
(``stages/fewshot_learning.py``) reuses :func:`open_split`, :func:`training_records` and :func:`train`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

from part_distillation.config import ConfigError, RunConfig
from part_distillation.context import JobContext
from part_distillation.data.labelled_records import RecordList, labelled_records, part_class_labels
from part_distillation.data.part_datasets import PartDatasetSplit, open_part_dataset
from part_distillation.data.part_records import PartRecordDataset, RecordFilter, class_agnostic_labels
from part_distillation.data.transforms import AugmentConfig
from part_distillation.progress import StageSummary
from part_distillation.stages.training import train_stage
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


def train(cfg: RunConfig, context: JobContext, split: PartDatasetSplit, records: Sequence[dict], *,
          weights: str | None, summary: StageSummary | None = None,
          after_setup: Callable[[], None] | None = None) -> StageSummary:
    """Train the variant's model (from ``weights``, class head re-initialised) on ``records``
    of ``split`` through the training wiring; ``part_classes.json`` names a semantic head."""
    stage = cfg.stage
    classes = num_model_classes(stage, split)
    dataset = PartRecordDataset(
        [RecordList(records, name=f"{stage.dataset} {stage.split}")],
        augment=AugmentConfig(size=stage.image_size, min_part_ratio=stage.min_part_area_ratio),
        filter=RecordFilter(min_object_ratio=stage.min_object_area_ratio, inclusive=True),
        labels=class_agnostic_labels if stage.variant == "proposal" else part_class_labels, seed=cfg.seed)

    def setup() -> None:
        if context.is_main and stage.variant == "semantic":
            atomic_write_json(Path(stage.output) / PART_CLASSES_FILE,
                              {"dataset": stage.dataset, "part_names": list(split.part_names)})
        log.info("[%s] variant %s: %d class(es) + no-object", stage.name, stage.variant, classes)
        if after_setup is not None:
            after_setup()

    return train_stage(cfg, context, dataset=dataset, num_classes=classes, weights=weights,
                       importance_sample_ratio=stage.importance_sample_ratio, after_setup=setup,
                       extra={"variant": stage.variant, "classes": classes}, summary=summary)


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
    split = open_split(cfg.stage)
    return train(cfg, context, split, training_records(cfg.stage, split), weights=cfg.model.weights)


__all__ = ["PART_CLASSES_FILE", "check", "check_dataset", "num_model_classes", "open_split", "run", "train",
           "training_records"]
