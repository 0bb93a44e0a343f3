"""A pipeline's stages: composed in order, what each reads, and where each stands from its output."""
from __future__ import annotations

from pathlib import Path

import pytest

from part_distillation.launch import dag
from tests.launch.plans import close_shard, compose, make_plan


def test_a_complete_training_or_evaluation_is_not_redone(tmp_path):
    out = str(tmp_path / "outputs" / "pipeline")
    training, = make_plan(tmp_path, ["proposal_learning"], entries=["proposal_learning:stage.max_iter=4"])
    checkpoints = Path(training.output) / "checkpoints"
    checkpoints.mkdir(parents=True)
    assert dag.stage_state(training, out).missing == [0]
    (checkpoints / "model_0000002.pth").write_bytes(b"")
    state = dag.stage_state(training, out)
    assert not state.complete and state.detail == "iteration 2/4"
    (checkpoints / "model_0000004.pth").write_bytes(b"")
    assert dag.stage_state(training, out).complete

    evaluate, = make_plan(tmp_path, ["evaluate"], {"evaluate": 2})
    close_shard(evaluate, 0)
    assert dag.stage_state(evaluate, out).missing == [1]
    close_shard(evaluate, 1)
    assert dag.stage_state(evaluate, out).missing == [0]  # every shard closed, metrics not merged: one job merges
    (Path(evaluate.output) / "metrics.json").write_text("{}")
    assert dag.stage_state(evaluate, out).complete


def test_plan_refuses_shards_of_a_stage_that_is_not_sharded(tmp_path):
    with pytest.raises(ValueError, match="stage.shards.proposal_learning=4"):
        make_plan(tmp_path, ["proposal_learning"], {"proposal_learning": 4})
    with pytest.raises(ValueError, match="not stages of stage.stages"):
        make_plan(tmp_path, ["index"], {"dense_crf": 4})


def test_reference_experiments_are_configurations_of_the_same_pipeline(tmp_path):
    cfg = compose(tmp_path, "stage=pipeline", "experiment=in22k")
    planned = dag.plan(["experiment=in22k", f"paths.root={tmp_path}"], list(cfg.stage.stages),
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

    cfg = compose(tmp_path, "stage=pipeline", f"experiment={experiment}")
    planned = dag.plan([f"experiment={experiment}", f"paths.root={tmp_path}"], list(cfg.stage.stages),
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
    assert part_ranking.proposal_checkpoint(ranking) == ckpt.checkpoint_path(ranking.proposal_run, iteration or 50000)


def test_a_complete_stage_made_with_another_config_is_not_taken_as_done(tmp_path):
    out = str(tmp_path / "outputs" / "pipeline")
    grouping, = make_plan(tmp_path, ["pixel_grouping"])
    close_shard(grouping, 0)
    assert dag.stage_state(grouping, out).complete
    changed, = make_plan(tmp_path, ["pixel_grouping"], entries=["pixel_grouping:stage.num_parts=5"])
    state = dag.stage_state(changed, out)
    assert not state.complete and "different config" in state.problem and "num_parts" in state.problem
    with pytest.raises(Exception, match="different config"):
        dag.preflight([changed], {"pixel_grouping": state})
    again, = make_plan(tmp_path, ["pixel_grouping"], entries=["pixel_grouping:stage.num_parts=5",
                                                          "pixel_grouping:overwrite_config=true"])
    assert dag.stage_state(again, out).missing == [0]  # redone from scratch


def test_the_baselines_are_training_stages_complete_at_their_final_checkpoint(tmp_path):
    out = str(tmp_path / "outputs" / "pipeline")
    for name in ("supervised_learning", "fewshot_learning"):
        baseline, = make_plan(tmp_path, [name], entries=[f"{name}:stage.max_iter=4"])
        assert baseline.kind == "training"
        checkpoints = Path(baseline.output) / "checkpoints"
        checkpoints.mkdir(parents=True)
        (checkpoints / "model_0000002.pth").write_bytes(b"")
        state = dag.stage_state(baseline, out)
        assert not state.complete and state.detail == "iteration 2/4"  # no done marker makes it complete
        (checkpoints / "model_0000004.pth").write_bytes(b"")
        assert dag.stage_state(baseline, out).complete
        with pytest.raises(ValueError, match=f"stage.shards.{name}=2: stage {name} is not sharded"):
            make_plan(tmp_path, [name], {name: 2})


def test_the_local_pipeline_runs_each_stage_as_a_job_and_fails_in_one_line(tmp_path, monkeypatch):
    import errno
    import json

    from part_distillation import stages
    from part_distillation.context import JobContext
    from part_distillation.launch import local
    from part_distillation.summaries import read_summaries

    real_get = stages.get
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "full" / "shard.rec"))

    def get(name):
        if name == "index":
            def no_space(cfg, context):
                raise full
            return no_space
        return real_get(name)

    monkeypatch.setattr(stages, "get", get)
    monkeypatch.setattr(local, "configure_logging", lambda level: None)
    names = ["synthetic_data", "index"]
    cfg = compose(tmp_path, "stage=pipeline", "stage.stages=[synthetic_data,index]")
    planned = make_plan(tmp_path, names, entries=["synthetic_data:stage.classes=2",
                                                  "synthetic_data:stage.images_per_class=2"])
    with pytest.raises(local.JobFailed, match="disk is full"):
        dag.run_local(cfg, planned, JobContext())
    synthetic = planned[0]
    assert [s["stage"] for s in read_summaries(synthetic.output)] == ["synthetic_data"]  # saved as run_job saves it
    assert dag.stage_state(synthetic, cfg.stage.output).complete  # its done marker
    errors = json.loads((Path(cfg.stage.output) / "errors.json").read_text())
    assert list(errors) == ["index"] and "shard.rec: the disk is full" in errors["index"]


def test_a_stage_runs_twice_as_steps_of_their_own(tmp_path):
    """``<stage>@<tag>``: the same stage on other data, with its own overrides, output and done
    state (the demo runs stages 1-3 on its held-out images so)."""
    cfg = compose(tmp_path, "stage=pipeline", "experiment=demo")
    planned = dag.plan(["experiment=demo", f"paths.root={tmp_path}"], list(cfg.stage.stages),
                       list(cfg.stage.overrides), dict(cfg.stage.shards))
    by_name = {p.name: p for p in planned}
    train, heldout = by_name["dense_crf"], by_name["dense_crf@heldout"]
    assert heldout.stage == "dense_crf" and heldout.kind == "sharded" and heldout.spec is train.spec
    assert heldout.run.data.split == "heldout" and train.run.data.split != "heldout"
    assert heldout.output.endswith("synthetic_heldout") and train.output.endswith("synthetic_train")
    assert heldout.job_name().startswith("pd_dense_crf_") and heldout.job_name() != train.job_name()
    assert "pixel_grouping@heldout" in heldout.after and "pixel_grouping" not in heldout.after
    # the held-out part ranking uses the training run's proposal model; evaluate waits for the records it scores
    assert by_name["part_ranking@heldout"].run.stage.proposal_run == by_name["proposal_learning"].output
    assert {"dense_crf@heldout", "part_ranking@heldout", "proposal_learning"} <= set(by_name["evaluate"].after)
    out = str(tmp_path / "outputs" / "pipeline")
    dag.write_marker(out, by_name["synthetic_data@heldout"])
    assert dag.stage_state(by_name["synthetic_data@heldout"], out).complete
    assert not dag.stage_state(by_name["synthetic_data"], out).complete


def test_a_stage_named_twice_without_a_step_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"more than once.*index@heldout"):
        make_plan(tmp_path, ["synthetic_data", "index", "index"])
    with pytest.raises(ValueError, match="stage.overrides entry"):
        make_plan(tmp_path, ["index@heldout"], entries=["indx@heldout:data.split=heldout"])   # no such stage
    # an entry for a step the list leaves out (an experiment's, after a shorter stage.stages) is left out too
    planned, = make_plan(tmp_path, ["index@heldout"], entries=["index@other:data.split=nowhere",
                                                               "index@heldout:data.split=heldout"])
    assert planned.run.data.split == "heldout"
