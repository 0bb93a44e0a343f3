"""Stage 6 ``part_distillation``: the object-conditioned part Mask2Former (docs/method.md#stage-6).

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
Backbone and pixel-decoder encoder frozen as in stage 4; trained through the one training wiring
(``stages.training.train_stage``). Output under ``stage.output`` as stage 4:
``checkpoints/``, ``tensorboard/``, the manifest.
"""
from __future__ import annotations

import functools
from pathlib import Path

from part_distillation.config import RunConfig
from part_distillation.context import JobContext
from part_distillation.data.imagenet import ImageTreeError, list_classes
from part_distillation.data.part_records import PartRecordDataset, RecordFilter, cluster_labels
from part_distillation.data.transforms import AugmentConfig
from part_distillation.inference import CLASSES_FILE
from part_distillation.summaries import StageSummary
from part_distillation.stages.training import train_stage
from part_distillation.store.files import atomic_write_json

from part_distillation.config import PartDistillationStageConfig
from part_distillation.stages import TRAINING, StageSpec

SPEC = StageSpec("part_distillation", PartDistillationStageConfig, TRAINING, loads_weights=True,
                 model_family="mask2former")


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
    stage = cfg.stage
    if not stage.input:
        raise ValueError("stage.input is not set: give the part-ranking records (PART_LABELS) to train on")
    wnids = object_classes(cfg)
    classes, parts = len(wnids), stage.parts_per_class

    def keep_classes() -> None:  # the head's object classes, for inference (part_distillation.inference)
        if context.is_main:
            atomic_write_json(Path(stage.output) / CLASSES_FILE, {"wnids": list(wnids)})

    return train_stage(cfg, context, dataset=training_dataset(cfg, classes), num_classes=classes * parts,
                       parts_per_class=parts, weights=cfg.model.weights, evaluation="part_distillation",
                       class_wnids=wnids, after_setup=keep_classes,
                       extra={"object_classes": classes, "parts_per_class": parts})
