"""Plans of the demo pipeline for the launch tests: composed in this process, no stage run."""
from __future__ import annotations

import dataclasses

from part_distillation.launch import dag
from part_distillation.store import ShardWriter


def compose(tmp_path, *extra: str):
    return dag.compose_stage(["experiment=demo", f"paths.root={tmp_path}", *extra])


def make_plan(tmp_path, names, shards=None, entries=()):
    return dag.plan(["experiment=demo", f"paths.root={tmp_path}"], list(names), list(entries), shards or {})


def close_shard(stage: dag.PlannedStage, index: int, status: str = "closed") -> None:
    """Shard ``index`` of ``stage``'s store, opened and closed with ``status`` (no record)."""
    writer = ShardWriter(stage.output, index, stage.shards, stage=stage.name, config=dataclasses.asdict(stage.run))
    writer.close(status)
