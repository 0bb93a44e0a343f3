"""The demo pipeline (`experiment=demo`), run the way `make demo` runs it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from part_distillation.store import RecordStore

REPO = Path(__file__).resolve().parents[2]


#: The demo at test size: 2 classes x 3 images, 4 training iterations.
SMALL_DEMO = ("stage.overrides=['synthetic_data:stage.classes=2','synthetic_data:stage.images_per_class=3',"
              "'proposal_learning:stage.max_iter=4','proposal_learning:stage.steps=[3]',"
              "'proposal_learning:stage.checkpoint_period=2','evaluate:stage.predictors=[proposal,records,strips]']")
#: Stage 6 is left out at this size: a 4-iteration proposal model gives part ranking too
#: few embeddings per class for part classes (tests/stages/test_part_distillation.py
#: trains stage 6 on fixture records; `make demo` runs it on part ranking's records).
SMALL_DEMO_STAGES = ("stage.stages=[synthetic_data,index,detic_labeling,pixel_grouping,dense_crf,"
                     "proposal_learning,part_ranking,evaluate,collage]")


@pytest.mark.integration
def test_demo_pipeline_runs_every_stage_and_is_idempotent(tmp_path):
    cmd = [sys.executable, "-m", "part_distillation", "experiment=demo", f"paths.root={tmp_path}",
           f"hydra.run.dir={tmp_path}/run", SMALL_DEMO, SMALL_DEMO_STAGES]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    labels = tmp_path / "pseudo_labels"
    outputs = {
        "index": labels / "index" / "synthetic_train",
        "detic_labeling": labels / "object_labels" / "synthetic_train" / "detic_predictions",
        "pixel_grouping": labels / "part_labels" / "proposal_generation" / "synthetic_train",
        "dense_crf": labels / "part_labels" / "proposal_generation_dcrf" / "synthetic_train",
    }
    for stage, folder in outputs.items():
        records = list(RecordStore(folder).iter_records())
        assert len(records) == 6, stage
    assert all(r["ok"] for r in RecordStore(outputs["index"]).iter_records())
    checkpoints = sorted((tmp_path / "outputs" / "proposal_learning" / "synthetic_train" / "checkpoints").glob("*.pth"))
    assert [p.name for p in checkpoints][-1] == "model_0000004.pth"
    ranking = RecordStore(labels / "part_labels" / "part_ranking" / "synthetic_train")
    assert len(ranking.keys()) + len(ranking.skipped()) == 6  # labelled, or skipped (class with <= K embeddings)
    centroids = json.loads((ranking.path / "part_classes" / "0-of-1" / "centroids.json").read_text())
    assert centroids["num_clusters"] == 4 and centroids["checkpoint"].endswith("model_0000004.pth")
    metrics = json.loads((tmp_path / "outputs" / "evaluate" / "synthetic_train" / "metrics.json").read_text())
    assert list(metrics["predictors"]) == ["proposal", "records_dense_crf", "strips"]
    records = metrics["predictors"]["records_dense_crf"]   # evaluated on train_eval: 1 of each class's 3 images
    assert records["images"] == 2 and 0 < records["reference"]["C-mIoU"] <= 100
    log = first.stderr + first.stdout
    assert "| reference |" in log and "| strict |" in log   # the metrics table is printed

    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stderr + second.stdout
    # every stage is complete: none runs again (not even to skip its records one by one)
    assert "[pipeline] stage 2/9 index: complete, skipped" in log and "[index] done" not in log
    assert "[pipeline] stage 6/9 proposal_learning: complete, skipped" in log
    assert "[pipeline] stage 8/9 evaluate: complete, skipped" in log
    assert log.count("complete, skipped") == 9
    # the summary says where each stage's output is
    assert f"index: {outputs['index']}" in log and f"dense_crf: {outputs['dense_crf']}" in log
    for folder in outputs.values():
        assert len(list(RecordStore(folder).iter_records())) == 6


def test_pipeline_refuses_other_synthetic_settings_in_same_root(tmp_path):
    base = [sys.executable, "-m", "part_distillation", "stage=synthetic_data", f"paths.root={tmp_path}",
            f"hydra.run.dir={tmp_path}/run", "stage.images_per_class=2", "stage.classes=2"]
    assert subprocess.run(base, cwd=REPO, capture_output=True).returncode == 0
    other = subprocess.run(base + ["stage.seed=5"], cwd=REPO, capture_output=True, text=True)
    assert other.returncode != 0 and "overwrite_config" in other.stderr


# --------------------------------------------------------------------------- resume and the SLURM plan

from part_distillation.data.synthetic import make_synthetic_dataset  # noqa: E402
from part_distillation.stages import pipeline  # noqa: E402
from part_distillation.store import ShardWriter  # noqa: E402
from tests.helpers import kill_entry_after_first_record, run_entry  # noqa: E402

SMALL_DATA = "stage.overrides=['synthetic_data:stage.classes=2','synthetic_data:stage.images_per_class=3']"
FIRST_STAGES = "stage.stages=[synthetic_data,index,detic_labeling]"


@pytest.mark.integration
def test_local_rerun_skips_complete_stages_and_redoes_a_killed_one(tmp_path):
    args = ["experiment=demo", f"paths.root={tmp_path}", f"hydra.run.dir={tmp_path}/run", SMALL_DATA, FIRST_STAGES]
    detic = tmp_path / "pseudo_labels" / "object_labels" / "synthetic_train" / "detic_predictions"
    index_shard = tmp_path / "pseudo_labels" / "index" / "synthetic_train" / "shards" / "00000-of-00001.rec"
    assert kill_entry_after_first_record(*args, shards=detic / "shards"), "the kill did not land inside stage 3"
    index_before = index_shard.stat()

    second = run_entry(*args, check=True)
    log = second.stderr + second.stdout
    assert "[pipeline] stage 1/3 synthetic_data: complete, skipped" in log
    assert "[pipeline] stage 2/3 index: complete, skipped" in log
    assert "[pipeline] stage 3/3 detic_labeling: started" in log and "[pipeline] stage 3/3 detic_labeling: done in" in log
    assert "[index] done" not in log  # not run at all
    index_after = index_shard.stat()
    assert (index_after.st_size, index_after.st_mtime_ns) == (index_before.st_size, index_before.st_mtime_ns)
    assert len(list(RecordStore(detic).iter_records())) == 6
    assert RecordStore(detic).summary()["shards_closed"] == 1

    third = run_entry(*args, check=True)
    assert (third.stderr + third.stdout).count("complete, skipped") == 3


def _compose(tmp_path, *extra: str):
    return pipeline.compose_stage(["experiment=demo", f"paths.root={tmp_path}", *extra])


def _plan(tmp_path, names, shards=None, entries=()):
    return pipeline.plan(["experiment=demo", f"paths.root={tmp_path}"], list(names), list(entries), shards or {})


class FakeSlurm:
    """Stands in for sbatch/squeue: numbers the submissions, remembers what each waits for."""

    def __init__(self, first_id: int = 100):
        self.next_id = first_id
        self.calls: list[tuple[str, list[int], list[str]]] = []
        self.queue: list[tuple[str, str, str]] = []

    def submit(self, stage, shards, dependencies):
        self.calls.append((stage.name, list(shards), list(dependencies)))
        job_id, self.next_id = str(self.next_id), self.next_id + 1
        return job_id, stage.kind == "sharded" and stage.shards > 1

    def squeue(self, names):
        return list(self.queue)


def _closed_shard(stage: pipeline.PlannedStage, index: int, status: str = "closed") -> None:
    import dataclasses

    writer = ShardWriter(stage.output, index, stage.shards, stage=stage.name, config=dataclasses.asdict(stage.run))
    writer.close(status)


STAGES5 = ["synthetic_data", "index", "detic_labeling", "pixel_grouping", "dense_crf"]


def test_slurm_submission_waits_for_the_stages_each_reads_and_resumes_only_what_is_missing(tmp_path):
    cfg = _compose(tmp_path, "stage=pipeline", "stage.launcher=slurm")
    planned = _plan(tmp_path, STAGES5, {"detic_labeling": 3, "dense_crf": 2})
    # every stage reads data.root, which synthetic_data writes
    assert [p.after for p in planned] == [[], ["synthetic_data"], ["synthetic_data"], ["synthetic_data", "detic_labeling"],
                                          ["synthetic_data", "pixel_grouping"]]
    slurm = FakeSlurm()
    summary = pipeline.submit(cfg, planned, submit_fn=slurm.submit, queue_fn=slurm.squeue)
    # everything at once: synthetic 100, index 101, detic 102 (array of 3), grouping 103, dense CRF 104 (array of 2)
    assert slurm.calls == [("synthetic_data", [0], []), ("index", [0], ["100"]), ("detic_labeling", [0, 1, 2], ["100"]),
                           ("pixel_grouping", [0], ["100", "102"]), ("dense_crf", [0, 1], ["100", "103"])]
    assert summary.extra["submitted"] == {"synthetic_data": "100", "index": "101", "detic_labeling": "102",
                                          "pixel_grouping": "103", "dense_crf": "104"}
    ledger = pipeline.read_ledger(cfg.stage.output)
    assert [(e["stage"], e["job_id"], e["array"], e["shards"]) for e in ledger][2] == ("detic_labeling", "102", True,
                                                                                     [0, 1, 2])

    # then: stages 1-2 complete, detic shards 0 and 2 closed, shard 1 still running, the rest cancelled
    by_name = {p.name: p for p in planned}
    make_synthetic_dataset(by_name["synthetic_data"].run.data.root, num_classes=2, images_per_class=3, size=48)
    pipeline._write_marker(cfg.stage.output, by_name["synthetic_data"])
    _closed_shard(by_name["index"], 0)
    _closed_shard(by_name["detic_labeling"], 0)
    _closed_shard(by_name["detic_labeling"], 2)
    slurm.calls.clear()
    slurm.queue = [("102", "1", "RUNNING")]
    pipeline.submit(cfg, planned, submit_fn=slurm.submit, queue_fn=slurm.squeue)
    assert slurm.calls == [("pixel_grouping", [0], ["102_1"]), ("dense_crf", [0, 1], ["105"])]

    # detic shard 1 failed (its summary says so) and left the queue: that shard alone is resubmitted
    _closed_shard(by_name["detic_labeling"], 1, status="error: RuntimeError")
    slurm.calls.clear()
    slurm.queue = []
    pipeline.submit(cfg, planned, submit_fn=slurm.submit, queue_fn=slurm.squeue)
    assert slurm.calls[0] == ("detic_labeling", [1], [])
    assert [c[0] for c in slurm.calls] == ["detic_labeling", "pixel_grouping", "dense_crf"]
    assert slurm.calls[1][2] == ["107"] and slurm.calls[2][2] == ["108"]

    # jobs of this pipeline in the queue that the ledger does not know: refused, nothing submitted
    (Path(cfg.stage.output) / "submissions.json").unlink()
    slurm.calls.clear()
    slurm.queue = [("108", "", "RUNNING")]
    with pytest.raises(Exception, match="108 of this pipeline .* not in"):
        pipeline.submit(cfg, planned, submit_fn=slurm.submit, queue_fn=slurm.squeue)
    assert slurm.calls == []


def test_a_complete_training_or_evaluation_is_not_redone(tmp_path):
    out = str(tmp_path / "outputs" / "pipeline")
    training, = _plan(tmp_path, ["proposal_learning"], entries=["proposal_learning:stage.max_iter=4"])
    checkpoints = Path(training.output) / "checkpoints"
    checkpoints.mkdir(parents=True)
    assert pipeline.stage_state(training, out).missing == [0]
    (checkpoints / "model_0000002.pth").write_bytes(b"")
    state = pipeline.stage_state(training, out)
    assert not state.complete and state.detail == "iteration 2/4"
    (checkpoints / "model_0000004.pth").write_bytes(b"")
    assert pipeline.stage_state(training, out).complete

    evaluate, = _plan(tmp_path, ["evaluate"], {"evaluate": 2})
    _closed_shard(evaluate, 0)
    assert pipeline.stage_state(evaluate, out).missing == [1]
    _closed_shard(evaluate, 1)
    assert pipeline.stage_state(evaluate, out).missing == [0]  # every shard closed, metrics not merged: one job merges
    (Path(evaluate.output) / "metrics.json").write_text("{}")
    assert pipeline.stage_state(evaluate, out).complete


def test_plan_refuses_shards_of_a_stage_that_is_not_sharded(tmp_path):
    with pytest.raises(ValueError, match="stage.shards.proposal_learning=4"):
        _plan(tmp_path, ["proposal_learning"], {"proposal_learning": 4})
    with pytest.raises(ValueError, match="not stages of stage.stages"):
        _plan(tmp_path, ["index"], {"dense_crf": 4})


def test_slurm_launcher_without_slurm_tools_says_so_before_anything(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline.shutil, "which", lambda tool: None)
    cfg = _compose(tmp_path, "stage=pipeline", "stage.launcher=slurm")
    with pytest.raises(Exception, match="SLURM tools"):
        pipeline.submit(cfg, _plan(tmp_path, ["synthetic_data"]))
    assert not (tmp_path / "outputs" / "pipeline" / "submissions.json").exists()


def test_reference_experiments_are_configurations_of_the_same_pipeline(tmp_path):
    cfg = _compose(tmp_path, "stage=pipeline", "experiment=in22k")
    planned = pipeline.plan(["experiment=in22k", f"paths.root={tmp_path}"], list(cfg.stage.stages),
                            list(cfg.stage.overrides), dict(cfg.stage.shards))
    by_name = {p.name: p for p in planned}
    # the job counts and resources of sh_files/*
    assert {n: p.shards for n, p in by_name.items() if p.kind == "sharded"} == {
        "index": 20, "detic_labeling": 60, "pixel_grouping": 40, "dense_crf": 100, "part_ranking": 50}
    assert by_name["detic_labeling"].run.model.name == "detic" and by_name["detic_labeling"].run.launcher.gpus_per_node == 1
    training = by_name["proposal_learning"].run.launcher
    assert (training.nodes, training.tasks_per_node, training.gpus_per_node) == (4, 8, 8)
    assert by_name["part_ranking"].after == ["dense_crf", "proposal_learning"]
    assert by_name["part_distillation"].after == ["part_ranking"]
    assert by_name["dense_crf"].overrides_for(7)[-2:] == ["shard.count=100", "shard.index=7"]


@pytest.mark.parametrize("experiment, iteration", [("in22k", 40000), ("in1k", 40000), ("demo", None)])
def test_reference_pipelines_rank_parts_with_the_40k_proposal_checkpoint(tmp_path, experiment, iteration):
    """The reference ranks with the 40k checkpoint of its 50k proposal training; the demo's
    100-iteration training has none, so the demo ranks with its newest."""
    from part_distillation.engine import checkpoint as ckpt
    from part_distillation.stages import part_ranking

    cfg = _compose(tmp_path, "stage=pipeline", f"experiment={experiment}")
    planned = pipeline.plan([f"experiment={experiment}", f"paths.root={tmp_path}"], list(cfg.stage.stages),
                            list(cfg.stage.overrides), dict(cfg.stage.shards))
    by_name = {p.name: p for p in planned}
    ranking = by_name["part_ranking"].run.stage
    assert ranking.checkpoint is None and ranking.checkpoint_iteration == iteration
    stage4 = by_name["proposal_learning"].run.stage
    assert stage4.max_iter > (iteration or 0)
    if iteration:  # stage 4 keeps it: among its keep_last newest periodic saves (timed saves do not count)
        periodic = list(range(stage4.checkpoint_period, stage4.max_iter + 1, stage4.checkpoint_period))
        assert iteration in periodic[-stage4.keep_last:]
    for i in (40000, 50000):  # the run folder part ranking reads, holding the 40k and 50k checkpoints
        ckpt.checkpoint_path(ranking.proposal_run, i).parent.mkdir(parents=True, exist_ok=True)
        ckpt.checkpoint_path(ranking.proposal_run, i).write_bytes(b"")
    assert part_ranking.resolve_checkpoint(ranking) == ckpt.checkpoint_path(ranking.proposal_run, iteration or 50000)


def test_a_complete_stage_made_with_another_config_is_not_taken_as_done(tmp_path):
    out = str(tmp_path / "outputs" / "pipeline")
    grouping, = _plan(tmp_path, ["pixel_grouping"])
    _closed_shard(grouping, 0)
    assert pipeline.stage_state(grouping, out).complete
    changed, = _plan(tmp_path, ["pixel_grouping"], entries=["pixel_grouping:stage.num_parts=5"])
    state = pipeline.stage_state(changed, out)
    assert not state.complete and "different config" in state.problem and "num_parts" in state.problem
    with pytest.raises(Exception, match="different config"):
        pipeline.preflight([changed], {"pixel_grouping": state})
    again, = _plan(tmp_path, ["pixel_grouping"], entries=["pixel_grouping:stage.num_parts=5",
                                                          "pixel_grouping:overwrite_config=true"])
    assert pipeline.stage_state(again, out).missing == [0]  # redone from scratch
