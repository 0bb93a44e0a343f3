"""Stage ``pipeline``: the stages of ``stage.stages`` as one DAG, in this process or on SLURM.

``stage.launcher=local`` runs the stages here in order (``launch.dag.run_local``);
``stage.launcher=slurm`` submits them all at once as jobs chained by dependencies and
exits (``launch.slurm.submit``). Either way a complete stage is skipped and a stage with
some shards done runs only the missing ones. How the stages are composed, ordered and
found complete: ``launch/dag.py``.
"""
from __future__ import annotations

from part_distillation.config import PipelineStageConfig, RunConfig
from part_distillation.context import JobContext
from part_distillation.launch import dag, slurm
from part_distillation.stages import DRIVER, StageSpec
from part_distillation.summaries import StageSummary

SPEC = StageSpec("pipeline", PipelineStageConfig, DRIVER, reported=False)


def run(cfg: RunConfig, context: JobContext) -> StageSummary:
    st = cfg.stage
    base = dag.own_overrides()
    planned = dag.plan(base, list(st.stages), list(st.overrides), dict(st.shards))
    if context.is_main:
        dag.save_plan(st.output, base, list(st.stages), list(st.overrides), dict(st.shards))
    if st.launcher == "slurm":
        return slurm.submit(cfg, planned)
    return dag.run_local(cfg, planned, context)
