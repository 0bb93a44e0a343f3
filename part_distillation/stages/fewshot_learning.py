"""Stage ``fewshot_learning``: the few-shot baseline, a PartDistillation model fine-tuned on
a few labelled images.

``stage.checkpoint`` (a stage-6 run folder, whose newest checkpoint is used, or a
checkpoint file) initialises everything but the class head, which starts afresh for the
variant's classes (as ``supervised_learning``: ``proposal`` or ``semantic``). The images
trained on are ``stage.percent`` % of the labelled images of ``stage.split``, chosen by
``data.labelled_records.fewshot_subset`` from the sorted image keys with
``stage.subset_seed`` (every object class covered when the count allows), and saved as
``fewshot_subset.json`` (a JSON list of image keys) next to the checkpoints. A rerun
with the same settings reuses the run; one with other settings is refused by the run
folder's manifest (naming the key), and one whose subset differs from the saved one
(the dataset changed) is refused naming the file. Training as ``supervised_learning``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from part_distillation.config import ConfigError, RunConfig
from part_distillation.context import JobContext
from part_distillation.data.labelled_records import fewshot_subset
from part_distillation.engine import distributed
from part_distillation.engine.checkpoint import resolve_checkpoint
from part_distillation.store.files import atomic_write_json
from part_distillation.summaries import StageSummary

from . import supervised_learning as supervised

from part_distillation.config import FewshotLearningStageConfig
from part_distillation.stages import TRAINING, StageSpec

SPEC = StageSpec("fewshot_learning", FewshotLearningStageConfig, TRAINING, model_family="mask2former")

log = logging.getLogger("part_distillation")

SUBSET_FILE = "fewshot_subset.json"


def check(cfg: RunConfig) -> None:
    """Before submission: the dataset folder and the PartDistillation checkpoint exist."""
    supervised.check_dataset(cfg.stage)
    resolve_checkpoint(cfg.stage.checkpoint, path_key="stage.checkpoint")


def keep_subset(run_dir: Path, subset: list[str], context: JobContext) -> None:
    """Save the subset in a new run folder; refuse a run folder holding another one."""
    path = Path(run_dir) / SUBSET_FILE
    if context.is_main and not path.exists():
        atomic_write_json(path, subset)
    distributed.barrier()
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} is unreadable ({err}): delete it to choose the subset again") from err
    if saved != subset:
        raise ConfigError(f"{path} holds another few-shot subset ({len(saved)} images) than this run's "
                          f"({len(subset)} images: the labelled split changed): use a new stage.output")


def run(cfg: RunConfig, context: JobContext) -> StageSummary:
    stage = cfg.stage
    summary = StageSummary(stage.name, output=stage.output)
    checkpoint = resolve_checkpoint(stage.checkpoint, path_key="stage.checkpoint")
    split = supervised.open_split(stage)
    records = supervised.training_records(stage, split)
    subset = fewshot_subset({r["key"]: r["object_classes"] for r in records}, stage.percent, stage.subset_seed)
    chosen = set(subset)
    log.info("[%s] %g%% of %d labelled images (seed %d): %d images; from %s", stage.name, stage.percent,
             len(records), stage.subset_seed, len(subset), checkpoint)
    summary.extra.update({"checkpoint": str(checkpoint), "subset_images": len(subset),
                          "labelled_images": len(records)})
    # the subset is kept after the manifest check: other settings are named first
    return supervised.train(cfg, context, split, [r for r in records if r["key"] in chosen],
                            weights=str(checkpoint), summary=summary,
                            after_setup=lambda: keep_subset(Path(stage.output), subset, context))


__all__ = ["SUBSET_FILE", "check", "keep_subset", "run"]
