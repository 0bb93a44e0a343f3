"""Stage ``status``: where each stage of the pipeline stands, printed as a table.

Per stage: shards done / running / failed / pending, records written, bad inputs by
reason and the last error line, from the stores, the pipeline's folder (``stage.output``)
and SLURM's queue and accounting when there is one (``launch/status.py``).
"""
from __future__ import annotations

from part_distillation.config import RunConfig, StatusStageConfig
from part_distillation.context import JobContext
from part_distillation.launch.status import collect, format_table
from part_distillation.stages import SINGLE, StageSpec
from part_distillation.summaries import StageSummary

SPEC = StageSpec("status", StatusStageConfig, SINGLE, reported=False)


def run(cfg: RunConfig, context: JobContext) -> StageSummary:
    summary = StageSummary(cfg.stage.name, output=cfg.stage.output)
    rows = collect(cfg)
    print(format_table(rows), flush=True)
    summary.seen = len(rows)
    summary.extra["stages"] = {r.name: r.as_dict() for r in rows}
    summary.extra["complete"] = all(r.complete for r in rows)
    return summary.finish()
