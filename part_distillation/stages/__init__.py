"""The stages, registered once and found by name.

Each stage is a module with ``run(cfg: RunConfig, context: JobContext) -> StageSummary``.
The registry maps names to modules so that looking a stage up imports only that stage
(and its models), and the entry point never grows a branch per stage.
"""
from __future__ import annotations

import importlib
from typing import Callable

STAGES: dict[str, str] = {
    "synthetic_data": "part_distillation.stages.synthetic_data",
    "sample_photos": "part_distillation.stages.sample_photos",
    "collage": "part_distillation.stages.collage",
    "pipeline": "part_distillation.stages.pipeline",
    "report": "part_distillation.stages.report",
    "status": "part_distillation.stages.status",
    "index": "part_distillation.stages.index",
    "proposal_learning": "part_distillation.stages.proposal_learning",
    "part_distillation": "part_distillation.stages.part_distillation",
    "evaluate": "part_distillation.stages.evaluate",
    "dense_crf": "part_distillation.stages.dense_crf",
    "detic_labeling": "part_distillation.stages.detic_labeling",
    "pixel_grouping": "part_distillation.stages.pixel_grouping",
    "part_ranking": "part_distillation.stages.part_ranking",
    "predict": "part_distillation.stages.predict",
    "supervised_learning": "part_distillation.stages.supervised_learning",
    "fewshot_learning": "part_distillation.stages.fewshot_learning",
}

# Stages whose issue has not landed yet: the seed's scripts name them, and calling
# them says so plainly instead of failing somewhere deep.
PLANNED: dict[str, str] = {
}


#: Stages that read the image tree of ``data`` (checked before submission: root, layout, images).
READS_IMAGE_TREE: frozenset[str] = frozenset({"index", "detic_labeling"})

#: Stages that load ``model.weights`` (checked before submission: the file must exist).
#: (``part_ranking`` loads the stage-4 checkpoint instead: its own ``check``.)
LOADS_WEIGHTS: frozenset[str] = frozenset({"detic_labeling", "pixel_grouping", "proposal_learning",
                                           "part_distillation"})


def loads_weights(run) -> bool:
    """Whether this job loads ``model.weights``: stage 1 only with the detic and mask2former sources."""
    if run.stage.name == "detic_labeling":
        return getattr(run.stage, "source", "detic") in ("detic", "mask2former")
    if run.stage.name == "predict":  # the trained model is stage.checkpoint; model.weights is Detic's
        return run.stage.mask_source == "detic"
    return run.stage.name in LOADS_WEIGHTS


#: Stages that build and train a Mask2Former from ``model.*`` (size and weights).
TRAINS_MASK2FORMER: frozenset[str] = frozenset({"proposal_learning", "part_distillation", "supervised_learning",
                                                "fewshot_learning"})


def model_needed(run) -> str | None:
    """The network family (``model.name``) this job builds from ``model.*``, or None when it
    builds none from there (part ranking, evaluate and predict load trained checkpoints)."""
    name = run.stage.name
    if name in TRAINS_MASK2FORMER or (name == "pixel_grouping" and run.stage.features == "mask2former"):
        return "mask2former"
    if name == "detic_labeling" and run.stage.source in ("detic", "mask2former"):
        return run.stage.source
    return None


class StageNotAvailable(RuntimeError):
    """The stage exists in the configuration but is not implemented yet."""


def check(run) -> None:
    """Run the stage's own ``check(run)`` if it has one: input files it needs besides the
    weights (vocabulary, annotations, ...), checked before any job is submitted; raises
    ``ConfigError`` naming the key."""
    if run.stage.name in STAGES:
        stage_check = getattr(importlib.import_module(STAGES[run.stage.name]), "check", None)
        if stage_check is not None:
            stage_check(run)


def get(name: str) -> Callable:
    """The ``run`` function of stage ``name``."""
    if name in STAGES:
        return importlib.import_module(STAGES[name]).run
    if name in PLANNED:
        raise StageNotAvailable(
            f"stage '{name}' ({PLANNED[name]}) is not implemented yet in this version of "
            f"part_distillation; available stages: {', '.join(sorted(STAGES))}")
    raise KeyError(f"unknown stage '{name}'; known: {', '.join(sorted(STAGES) + sorted(PLANNED))}")
