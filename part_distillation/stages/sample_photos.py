"""Stage ``sample_photos``: write the real photos scikit-image ships as an image tree.

The demo's real-photo check starts here (``data=photos``); idempotent.
"""
from __future__ import annotations

from part_distillation.config import RunConfig
from part_distillation.data.photos import write_photo_tree
from part_distillation.summaries import StageSummary

from part_distillation.config import SamplePhotosStageConfig
from part_distillation.stages import SINGLE, StageSpec

SPEC = StageSpec("sample_photos", SamplePhotosStageConfig, SINGLE)


def run(cfg: RunConfig, context) -> StageSummary:
    summary = StageSummary(cfg.stage.name, output=cfg.data.root)
    if context.is_main:
        paths = write_photo_tree(cfg.data.root, cfg.data.split or "train")
        summary.seen = summary.written = len(paths)
    return summary.finish()
