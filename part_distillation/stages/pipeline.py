"""Stage ``pipeline``: several stages in order, in this process (the demo).

Each sub-stage is composed from this run's own command-line overrides plus
``stage=<name>`` and its entries of ``stage.overrides``, so ``experiment=demo
paths.root=/tmp/x`` reaches every stage and
``'stage.overrides=[proposal_learning:stage.max_iter=10]'`` one of them. The
summary lists each stage's counts and output folder apart.
"""
from __future__ import annotations

import logging

from hydra import compose
from hydra.core.hydra_config import HydraConfig

from part_distillation import stages
from part_distillation.config import RunConfig, validate
from part_distillation.context import JobContext
from part_distillation.progress import StageSummary, record_summary

log = logging.getLogger("part_distillation")


def _own_overrides() -> list[str]:
    try:
        task = list(HydraConfig.get().overrides.task)
    except ValueError:  # composed outside a Hydra app (tests): nothing to carry over
        task = []
    return [o for o in task if not o.lstrip("+~").startswith("stage")]


def stage_overrides(entries: list[str], names: list[str]) -> dict[str, list[str]]:
    """``["<stage>:<override>", ...]`` -> overrides per stage; a stage not in ``names`` is an error."""
    out: dict[str, list[str]] = {}
    for entry in entries:
        name, sep, override = entry.partition(":")
        if not sep or not override or name not in names:
            raise ValueError(f"stage.overrides entry {entry!r}: expected '<stage>:<override>' with a stage of "
                             f"stage.stages {list(names)}")
        out.setdefault(name, []).append(override)
    return out


def run(cfg: RunConfig, context: JobContext) -> StageSummary:
    summary = StageSummary(cfg.stage.name)
    base = _own_overrides()
    per_stage = stage_overrides(cfg.stage.overrides, cfg.stage.stages)
    for name in cfg.stage.stages:
        if name == "pipeline":
            raise ValueError("stage.stages may not contain 'pipeline' itself")
        log.info("pipeline: stage %s", name)
        sub_cfg = validate(compose(config_name="config", overrides=base + [f"stage={name}"] + per_stage.get(name, [])))
        result = stages.get(name)(sub_cfg, context).finish()
        result.log()
        record_summary(sub_cfg, result, context)  # saved next to the stage's output, as run_job does
        summary.parts.append(result)  # reported per stage: counts of different things never add up
    summary.output = summary.parts[-1].output if summary.parts else None
    return summary.finish()
