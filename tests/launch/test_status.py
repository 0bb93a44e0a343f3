"""Where each stage of a pipeline stands, as a table (``launch/status.py``); no SLURM here."""
from __future__ import annotations

from part_distillation.launch import dag, status


def test_status_before_any_run_lists_the_demo_stages_pending(tmp_path):
    cfg = dag.compose_stage(["stage=status", "experiment=demo", f"paths.root={tmp_path}"])
    rows = status.collect(cfg, base=["experiment=demo", f"paths.root={tmp_path}"])
    demo = dag.compose_stage(["stage=pipeline", "experiment=demo"]).stage.stages
    assert [r.name for r in rows] == list(demo)
    for row in rows:
        assert row.done == [] and row.running == [] and row.failed == [] and row.pending == list(range(row.shards))
        assert row.error == "" and row.records == 0
    table = status.format_table(rows)
    assert table.splitlines()[0].split()[:6] == ["#", "stage", "done", "running", "failed", "pending"]
    assert len(table.splitlines()) == len(demo) + 1
