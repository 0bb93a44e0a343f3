"""Stage 6 ``part_distillation``: the object-conditioned part Mask2Former (PIPELINE.md section 6).

Mask2Former from the COCO instance weights when ``model.weights`` is given (never from
stage 4; the demo trains the tiny model from scratch) with a fresh class head of
C x K + 1 outputs: C object classes of the dataset (the image tree's class list, the one
global ``class_index`` the records carry), K = ``stage.parts_per_class``. Each image's
object class selects its K part rows and the no-object row at every decoder layer
(``Mask2Former(..., object_class=...)``), so the loss sees (Q, K + 1) logits per image and
the targets are the parts' cluster ids 0..K-1 of the stage-5 PART_LABELS records. Loaded
are objects with ratio >= ``min_object_area_ratio`` and parts with area ratio >=
``min_part_area_ratio`` (both 0.05, inclusive). Each fitted image is padded to the
``image_size`` square canvas (grey) before augmentation, the reference's
``SET_IMAGE_SQUARE`` (``AugmentConfig.square_canvas``; stage 4 augments the fitted image).
Backbone and pixel-decoder encoder frozen as in stage 4; the engine's reference recipe. Output under ``stage.output`` as stage 4:
``checkpoints/``, ``tensorboard/``, the manifest.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from part_distillation.config import RunConfig
from part_distillation.context import JobContext
from part_distillation.data.imagenet import ImageTreeError, list_classes
from part_distillation.data.part_records import PartRecordDataset, RecordFilter, cluster_labels
from part_distillation.data.transforms import AugmentConfig
from part_distillation.engine import distributed as ddp_utils
from part_distillation.engine.recipe import build_model, build_trainer, frozen_name_keys, proposal_preview, \
    reference_criterion
from part_distillation.inference import CLASSES_FILE
from part_distillation.progress import StageSummary
from part_distillation.store.files import atomic_write_json

from part_distillation.config import PartDistillationStageConfig
from part_distillation.stages import TRAINING, StageSpec

SPEC = StageSpec("part_distillation", PartDistillationStageConfig, TRAINING, loads_weights=True,
                 model_family="mask2former")

log = logging.getLogger("part_distillation")


def check(cfg: RunConfig) -> None:
    """Before submission: periodic evaluation (``stage.eval_*``), when on, has its dataset."""
    from part_distillation.evaluation.during_training import check_training_evaluation

    check_training_evaluation(cfg.stage)


def object_classes(cfg: RunConfig) -> tuple[str, ...]:
    """The object classes (wnids) of ``cfg.data``'s image tree in class-index (= head) order, the
    class list the records' ``class_index`` comes from (``list_classes``: the class list and one
    listing of the top folder, never the images; ImageNet-21k's 14 M files are not walked)."""
    classes = list_classes(cfg.data.root, split=cfg.data.split, words_file=cfg.data.words_file)
    if not len(classes):
        raise ImageTreeError(f"no class folders in {classes.root} (data.root={cfg.data.root}): stage 6 needs "
                             f"the image tree the records were made from, to size its class head")
    return classes.wnids


def num_object_classes(cfg: RunConfig) -> int:
    """C: the number of object classes of ``cfg.data``'s image tree (:func:`object_classes`)."""
    return len(object_classes(cfg))


def conditioned_forward(device: torch.device):
    """The engine's ``forward`` hook: the batch's object classes select each image's K + 1 head rows."""
    def forward(model, batch):
        return model(batch["pixel_values"], object_class=batch["class_indices"].to(device))
    return forward


def checked_cluster_labels(record, *, num_classes: int, parts_per_class: int):
    """``cluster_labels`` that refuses, naming the record, a class index outside the C classes
    or a cluster id outside 0..K-1 (checked as each sample is loaded: no extra pass)."""
    ids = cluster_labels(record)
    if not 0 <= int(record["class_index"]) < num_classes:
        raise ValueError(f"record {record['key']!r}: class_index {record['class_index']} is outside the "
                         f"{num_classes} classes of data.root; train on records made from this dataset")
    if len(ids) and (ids.min() < 0 or ids.max() >= parts_per_class):
        raise ValueError(f"record {record['key']!r}: cluster ids {ids.tolist()} are outside "
                         f"0..{parts_per_class - 1}; set stage.parts_per_class to part ranking's clusters")
    return ids


def training_dataset(cfg: RunConfig, num_classes: int) -> PartRecordDataset:
    """The PART_LABELS records of ``stage.input`` and ``stage.extra_inputs`` that pass the load
    filters (object and part ratio >= the minimum), each fitted image padded to the square
    canvas before augmentation (the reference's ``SET_IMAGE_SQUARE``)."""
    stage = cfg.stage
    return PartRecordDataset(
        [stage.input, *stage.extra_inputs],
        augment=AugmentConfig(size=stage.image_size, min_part_ratio=stage.min_part_area_ratio, square_canvas=True),
        filter=RecordFilter(min_object_ratio=stage.min_object_area_ratio, inclusive=True,
                            min_part_ratio=stage.min_part_area_ratio),
        labels=functools.partial(checked_cluster_labels, num_classes=num_classes,
                                 parts_per_class=stage.parts_per_class), seed=cfg.seed)


def run(cfg: RunConfig, context: JobContext) -> StageSummary:
    summary = StageSummary(cfg.stage.name, output=cfg.stage.output)
    stage = cfg.stage
    if not stage.input:
        raise ValueError("stage.input is not set: give the part-ranking records (PART_LABELS) to train on")
    device = ddp_utils.training_device(cfg.model.device, context.local_rank)
    if stage.deterministic:
        torch.use_deterministic_algorithms(True)
    wnids = object_classes(cfg)
    classes, parts = len(wnids), stage.parts_per_class
    dataset = training_dataset(cfg, classes)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg.model.size, cfg.model.weights, num_classes=classes * parts, parts_per_class=parts)
    model.freeze(frozen_name_keys(stage), frozen_mode=stage.frozen_mode)
    model.to(device)
    ddp_utils.seed_all(cfg.seed, context.rank)  # then per-rank training noise
    log.info("[%s] %d object classes x %d parts: class head %d outputs", stage.name, classes, parts,
             classes * parts + 1)
    evaluator = None
    if stage.eval_period:  # the model in training, scored as the evaluate stage scores a checkpoint
        from part_distillation.evaluation.during_training import training_evaluation

        evaluator = training_evaluation(stage, "part_distillation", class_wnids=wnids)
    trainer, _ = build_trainer(cfg, context, model, dataset,
                               reference_criterion(num_classes=parts, num_points=stage.num_points),
                               forward=conditioned_forward(device), preview=proposal_preview(dataset, device), evaluate=evaluator)
    if context.is_main:  # the head's object classes, for inference (part_distillation.inference)
        atomic_write_json(Path(stage.output) / CLASSES_FILE, {"wnids": list(wnids)})
    start = trainer.iter
    trainer.train()
    summary.seen = (trainer.iter - start) * stage.batch_size
    summary.extra.update({"iterations": trainer.iter, "resumed_at": start, "images": len(dataset),
                          "object_classes": classes, "parts_per_class": parts,
                          "final_loss": round(trainer.metrics.get("total_loss", float("nan")), 5),
                          "run_dir": str(stage.output)})
    return summary.finish()
