"""Stage-4/6 run folders of the tiny model, written in the stages' own format (untrained weights).

A run folder as ``proposal_learning`` / ``part_distillation`` leave it: the manifest with the
resolved config (``engine.checkpoint.prepare_run_dir``), ``checkpoints/model_<iter>.pth``
(``{"model", "iteration", ...}``) and, for stage 6, ``classes.json``. Weights are random
with a fixed seed: inference and evaluation are checked on them, training has its own tests.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from part_distillation.config import (DataConfig, ModelConfig, PartDistillationStageConfig,
                                      ProposalLearningStageConfig, RunConfig, SupervisedLearningStageConfig)
from part_distillation.engine import checkpoint as ckpt
from part_distillation.models.checkpoint import build_model
from part_distillation.inference import CLASSES_FILE
from part_distillation.store.files import atomic_write_json


def write_run(run: Path, kind: str, *, data_root: Path, wnids: tuple[str, ...] = (), parts_per_class: int = 3,
              image_size: int = 64, iterations: tuple[int, ...] = (5,), seed: int = 0) -> Path:
    """A run folder of ``kind`` (``proposal``, ``part_distillation`` or ``semantic``: the supervised
    baseline with ``parts_per_class`` part classes); one checkpoint per iteration (weights seeded
    by ``seed + iteration``)."""
    if kind == "semantic":
        stage = SupervisedLearningStageConfig(output=str(run), image_size=image_size, variant="semantic")
        name = "supervised_learning"
    elif kind == "proposal":
        stage = ProposalLearningStageConfig(output=str(run), input="records", image_size=image_size)
        name = "proposal_learning"
    else:
        stage = PartDistillationStageConfig(output=str(run), input="records", image_size=image_size,
                                            parts_per_class=parts_per_class)
        name = "part_distillation"
    cfg = RunConfig(stage=stage, data=DataConfig(name="synthetic", root=str(data_root)),
                    model=ModelConfig(name="mask2former", size="tiny", device="cpu"))
    ckpt.prepare_run_dir(run, stage=name, config=dataclasses.asdict(cfg))
    if kind == "part_distillation":
        atomic_write_json(run / CLASSES_FILE, {"wnids": list(wnids)})
    for iteration in iterations:
        torch.manual_seed(seed + iteration)
        if kind == "proposal":
            model = build_model("tiny", None, num_classes=1)
        elif kind == "semantic":
            model = build_model("tiny", None, num_classes=parts_per_class)
        else:
            model = build_model("tiny", None, num_classes=len(wnids) * parts_per_class,
                                parts_per_class=parts_per_class)
        ckpt.save_atomic({"model": model.state_dict(), "iteration": iteration}, ckpt.checkpoint_path(run, iteration))
    return run
