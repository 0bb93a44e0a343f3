"""Stage ``pipeline``: several stages in order, in this process (the demo).

Each sub-stage is composed from this run's own command-line overrides plus
``stage=<name>``, so ``experiment=demo paths.root=/tmp/x`` reaches every stage. The
summary lists each stage's counts and output folder apart.
"""
from __future__ import annotations

import logging

from hydra import compose
from hydra.core.hydra_config import HydraConfig

from part_distillation import stages
from part_distillation.config import RunConfig, validate
from part_distillation.context import JobContext
from part_distillation.progress import StageSummary

log = logging.getLogger("part_distillation")


def _own_overrides() -> list[str]:
    try:
        task = list(HydraConfig.get().overrides.task)
    except ValueError:  # composed outside a Hydra app (tests): nothing to carry over
        task = []
    return [o for o in task if not o.lstrip("+~").startswith("stage")]


def run(cfg: RunConfig, context: JobContext) -> StageSummary:
    summary = StageSummary(cfg.stage.name)
    base = _own_overrides()
    for name in cfg.stage.stages:
        if name == "pipeline":
            raise ValueError("stage.stages may not contain 'pipeline' itself")
        log.info("pipeline: stage %s", name)
        sub_cfg = validate(compose(config_name="config", overrides=base + [f"stage={name}"]))
        result = stages.get(name)(sub_cfg, context).finish()
        result.log()
        summary.parts.append(result)  # reported per stage: counts of different things never add up
    summary.output = summary.parts[-1].output if summary.parts else None
    return summary.finish()
