"""Stage ``collage``: draw stage outputs' records as PNG collages (a row per class).

Each folder of ``stage.inputs`` that holds a stage output becomes
``<output>/<stage name>.png`` (image, object outline, coloured parts: ``viz.py``); a
folder that does not exist yet is skipped with a warning, so one collage stage serves
any prefix of the pipeline. ``tools/collage.py`` does the same for one folder.
"""
from __future__ import annotations

import logging
from pathlib import Path

from part_distillation.config import RunConfig
from part_distillation.store import RecordStore, manifest_path
from part_distillation.summaries import StageSummary
from part_distillation.viz import class_collage, write_png

from part_distillation.config import CollageStageConfig
from part_distillation.stages import SINGLE, StageSpec

SPEC = StageSpec("collage", CollageStageConfig, SINGLE)

log = logging.getLogger("part_distillation")


def run(cfg: RunConfig, context) -> StageSummary:
    st = cfg.stage
    summary = StageSummary(st.name, output=st.output)
    if not context.is_main:
        return summary.finish()
    for folder in st.inputs:
        summary.seen += 1
        if not manifest_path(folder).is_file():
            log.warning("collage: %s holds no stage output yet; skipped", folder)
            summary.skip("no_output")
            continue
        store = RecordStore(folder)
        path = write_png(Path(st.output) / f"{store.stage}.png",
                         class_collage(store.iter_records(), st.per_class, st.classes, st.cell))
        log.info("collage of %s: %s", folder, path)
        summary.written += 1
    return summary.finish()
