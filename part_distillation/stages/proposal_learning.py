"""Stage 4 ``proposal_learning``: a class-agnostic part-proposal Mask2Former (docs/method.md#stage-4).

Mask2Former with one foreground class ("part"), its class head re-initialised and
everything else from the COCO instance weights when ``model.weights`` is given (the demo
trains the tiny model from scratch), backbone and pixel-decoder encoder frozen, trained
on the stage-3 records (``stage.input`` plus ``stage.extra_inputs``) through the training wiring's
reference recipe. Output under ``stage.output``: ``checkpoints/model_<iter>.pth``
(``model_<max_iter>.pth`` is the final one), ``tensorboard/``, and the manifest with the
resolved config. The checkpoint that ranking uses is chosen there (the reference: 40k).
"""
from __future__ import annotations


from part_distillation.config import RunConfig
from part_distillation.data.part_records import PartRecordDataset, RecordFilter, class_agnostic_labels
from part_distillation.data.transforms import AugmentConfig
from part_distillation.context import JobContext
from part_distillation.summaries import StageSummary
from part_distillation.stages.training import train_stage

from part_distillation.config import ProposalLearningStageConfig
from part_distillation.stages import TRAINING, StageSpec

SPEC = StageSpec("proposal_learning", ProposalLearningStageConfig, TRAINING, loads_weights=True,
                 model_family="mask2former")


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
    if not cfg.stage.input:
        raise ValueError("stage.input is not set: give the stage-3 records (dense_crf output) to train on")
    return train_stage(cfg, context, dataset=training_dataset(cfg), num_classes=1, weights=cfg.model.weights,
                       evaluation="proposal")
