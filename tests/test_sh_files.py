"""The seed scripts of stages 4-6 (``sh_files/``), run the way issue #8's "Done when" runs them.

After stage-3 records of the demo data (written here from the synthetic dataset's true
parts, the shape of dense_crf's output), ``PD_EXPERIMENT=demo NODES=1 JOBS=2`` and then
``proposal_learning/train_multi.sh``, ``part_ranking/run.sh`` and
``part_distillation_training/train.sh``, each scaled down with overrides given as its
arguments (the scripts pass ``"$@"`` through, after their own settings, so they win):

- ``PD_LAUNCHER=basic``: the three stages run in-process and exit 0;
- ``PD_LAUNCHER=submitit_slurm`` (needs the local cluster): the jobs the scripts submit
  have the node and task counts, CPUs, time limit, array size and name the script and its
  arguments ask for, read back from ``scontrol show job`` and ``sacct``; each job's own
  ``.hydra/overrides.yaml`` holds the script's overrides; every job completes.

Stage 4 trains 4 iterations here, too few for the proposal model to predict any part
(its mask logits are still all negative: part ranking skips every image, classes have
no part classes; ``tests/stages/test_pipeline.py`` leaves stage 6 out for that reason),
so ``train.sh`` is given stage-5-shaped records of the same dataset
(``stage.input=...``, fixture PART_LABELS) to train on.

No GPU here, so the arguments set ``launcher.gpus_per_node=0`` and fewer tasks and CPUs
than the reference's 8 x 8 GPUs; the time limits (3 days) and the array size are the
scripts' own.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import submitit
import yaml

from part_distillation.engine import checkpoint as ckpt
from part_distillation.store import RecordStore
from tests.data.part_fixtures import write_part_labels, write_part_segments
from tests.slurm_cluster import final_state, job_logs, job_state, submitit_job_ids

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "sh_files"
DATA = "synthetic_train"  # the demo's data.name

#: Scaled-down settings per script (its arguments).
TRAIN_MULTI_ARGS = ["launcher.tasks_per_node=2", "launcher.gpus_per_node=0", "launcher.cpus_per_task=1",
                    "stage.batch_size=2", "stage.per_device_batch=1", "stage.max_iter=4", "stage.steps=[3]",
                    "stage.checkpoint_period=2", "stage.image_size=64", "stage.num_points=256",
                    "stage.preview_period=0"]
RUN_ARGS = ["launcher.gpus_per_node=0", "launcher.cpus_per_task=1", "stage.image_size=64", "stage.n_init=1"]
TRAIN_ARGS = ["launcher.tasks_per_node=1", "launcher.gpus_per_node=0", "launcher.cpus_per_task=1",
              "stage.max_iter=2", "stage.steps=[1]", "stage.checkpoint_period=2", "stage.image_size=64",
              "stage.num_points=256", "stage.preview_period=0"]


def _demo_root_with_stage3_records(root: Path) -> Path:
    """A demo root (``PD_DEMO_ROOT``) holding the synthetic dataset and its stage-3 records,
    and (under ``fixture/``) stage-5-shaped records of the same classes for stage 6."""
    write_part_segments(root / "datasets" / "synthetic",
                        root / "pseudo_labels" / "part_labels" / "proposal_generation_dcrf" / DATA,
                        num_classes=2, images_per_class=3, size=96, fit_size=128)
    write_part_labels(root / "fixture" / "synthetic", root / "fixture" / "part_labels", num_classes=2,
                      images_per_class=3, size=96, fit_size=128)
    return root


def _script(path: str, launcher: str, demo_root: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PD_LAUNCHER": launcher, "PD_EXPERIMENT": "demo", "NODES": "1", "JOBS": "2",
           "PD_DEMO_ROOT": str(demo_root), "PD_PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    return subprocess.run(["bash", str(SCRIPTS / path), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _run_chain(demo_root: Path, launcher: str, timeout: float, check_jobs=None) -> None:
    """The three scripts in order; each must exit 0 and leave its stage's output."""
    steps = [("proposal_learning/train_multi.sh", TRAIN_MULTI_ARGS, "proposal_learning"),
             ("part_ranking/run.sh", RUN_ARGS, "part_ranking"),
             ("part_distillation_training/train.sh",
              TRAIN_ARGS + [f"stage.input={demo_root / 'fixture' / 'part_labels'}"], "part_distillation")]
    for script, args, stage in steps:
        done = _script(script, launcher, demo_root, *args, timeout=timeout)
        sweeps = sorted((demo_root / "outputs" / stage).glob("multirun_*"))
        assert done.returncode == 0, f"{script}:\n{done.stderr[-4000:]}\n" + "".join(job_logs(s) for s in sweeps)
        assert len(sweeps) == 1, sweeps
        if check_jobs is not None:
            check_jobs(stage, sweeps[0])
    outputs = demo_root / "outputs"
    assert [i for i, _ in ckpt.list_checkpoints(outputs / "proposal_learning" / DATA)] == [2, 4]
    ranking = RecordStore(demo_root / "pseudo_labels" / "part_labels" / "part_ranking" / DATA)
    totals = ranking.summary()  # both shards (one class each) done; every image labelled or skipped
    assert totals["status"] == {"closed": 2} and totals["records"] + sum(totals["skipped"].values()) == 6, totals
    assert all((ranking.path / "part_classes" / f"{i}-of-2" / "centroids.json").is_file() for i in range(2))
    assert [i for i, _ in ckpt.list_checkpoints(outputs / "part_distillation" / DATA)] == [2]


def test_seed_scripts_run_stages_4_to_6_in_process(tmp_path):
    """Issue #8's "Done when": PD_LAUNCHER=basic, the three scripts one after another, exit 0."""
    _run_chain(_demo_root_with_stage3_records(tmp_path / "demo"), "basic", timeout=300)


# --------------------------------------------------------------------------- on SLURM

def _slurm_jobs(sweep: Path) -> list[str]:
    """Job ids submitit made for one script (``12`` or ``12_0``, ``12_1``)."""
    return submitit_job_ids(sweep / ".submitit")


def _scontrol(job_id: str) -> dict[str, str]:
    state = job_state(job_id)
    assert state, f"scontrol no longer knows job {job_id}"
    return state


def _sacct(job_id: str) -> dict[str, str]:
    fields = "JobID,JobName,NNodes,AllocCPUS,Timelimit,State,ReqTRES"
    out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", f"--format={fields}"], capture_output=True,
                         text=True, timeout=30, check=True).stdout.splitlines()
    rows = [dict(zip(fields.split(","), line.split("|"))) for line in out if line.strip()]
    assert len(rows) == 1, (job_id, out)
    return rows[0]


def _job_overrides(sweep: Path, num: int) -> list[str]:
    return yaml.safe_load((sweep / str(num) / ".hydra" / "overrides.yaml").read_text())


#: What each script asks for, after its arguments: (job name, tasks per node, CPUs per task,
#: array size or None, overrides the job must have been given).
EXPECTED = {
    "proposal_learning": ("pd_proposal_learning", 2, 1, None,
                          ["experiment=demo", "stage=proposal_learning", "model=mask2former_effnet",
                           "launcher.nodes=1", "launcher.timeout_min=4320", "stage.max_iter=4"]),
    "part_ranking": ("pd_part_ranking", 1, 1, 2,
                     ["experiment=demo", "stage=part_ranking", "shard.count=2", "model=mask2former_effnet",
                      "shard.by=class", "launcher.timeout_min=4320", "stage.n_init=1"]),
    "part_distillation": ("pd_part_distillation", 1, 1, None,
                          ["experiment=demo", "stage=part_distillation", "model=mask2former_effnet",
                           "launcher.nodes=1", "launcher.timeout_min=4320", "stage.max_iter=2"]),
}


def _check_slurm_jobs(stage: str, sweep: Path) -> None:
    name, tasks, cpus, array, overrides = EXPECTED[stage]
    ids = _slurm_jobs(sweep)
    if array is None:
        assert len(ids) == 1 and "_" not in ids[0], ids
    else:  # one array, one task per shard (submitit also makes a folder for the array's own id)
        ids = [j for j in ids if "_" in j]
        assert len(ids) == array and {j.split("_")[0] for j in ids} == {ids[0].split("_")[0]}, ids
        assert sorted(int(j.split("_")[1]) for j in ids) == list(range(array))
    for num, job_id in enumerate(ids):
        # the launcher reads results a moment before SLURM marks the job finished
        assert final_state(submitit.SlurmJob(folder=sweep / ".submitit" / "%j", job_id=job_id)) == "COMPLETED"
        info, acct = _scontrol(job_id), _sacct(job_id)
        assert info["JobName"] == acct["JobName"] == name
        assert info["JobState"] == acct["State"] == "COMPLETED", (info["JobState"], acct)
        assert info["NumNodes"] == acct["NNodes"] == "1"  # NODES=1
        assert info["NumTasks"] == str(tasks)
        assert info["CPUs/Task"] == str(cpus)
        assert int(acct["AllocCPUS"]) == tasks * cpus
        assert info["TimeLimit"] == acct["Timelimit"] == "3-00:00:00"  # launcher.timeout_min=4320
        assert "gpu" not in acct["ReqTRES"]  # launcher.gpus_per_node=0 from the arguments
        if array is not None:
            assert info["ArrayTaskId"] == str(num) and info["ArrayJobId"] == job_id.split("_")[0]
        given = _job_overrides(sweep, num)
        missing = [o for o in overrides if o not in given]
        assert not missing, (stage, missing, given)
        if array is not None:
            assert f"shard.index={num}" in given


@pytest.mark.slurm
@pytest.mark.integration
@pytest.mark.requires("slurm")
def test_seed_scripts_submit_the_jobs_they_describe(tmp_path):
    _run_chain(_demo_root_with_stage3_records(tmp_path / "demo"), "submitit_slurm", timeout=600,
               check_jobs=_check_slurm_jobs)


@pytest.mark.parametrize("experiment, iteration", [("in22k", 40000), ("in1k", 40000), ("demo", None)])
def test_part_ranking_script_ranks_with_the_40k_checkpoint_in_the_reference_experiments(tmp_path, experiment,
                                                                                         iteration):
    """``part_ranking/run.sh`` (``PD_PYTHON`` replaced by a script that prints its arguments),
    composed as its jobs compose it: the reference experiments pick the 40k checkpoint of a
    run holding 40k and 50k, the demo its newest."""
    from part_distillation.config import validate
    from part_distillation.launch import compose_config
    from part_distillation.stages import part_ranking

    echo = tmp_path / "echo_python"
    echo.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    echo.chmod(0o755)
    run_dir = tmp_path / "proposal_run"
    for i in (40000, 50000):
        ckpt.checkpoint_path(run_dir, i).parent.mkdir(parents=True, exist_ok=True)
        ckpt.checkpoint_path(run_dir, i).write_bytes(b"")
    env = {**os.environ, "PD_PYTHON": str(echo), "PD_EXPERIMENT": experiment, "JOBS": "2"}
    args = subprocess.run(["bash", str(SCRIPTS / "part_ranking" / "run.sh"), f"paths.root={tmp_path}",
                           f"stage.proposal_run={run_dir}"], env=env, capture_output=True, text=True,
                          check=True).stdout.splitlines()
    assert args[:3] == ["-m", "part_distillation", "-m"] and "shard.index=range(0,2)" in args
    job = [a for a in args[3:] if not a.startswith(("hydra/launcher=", "shard.index="))] + ["shard.index=1"]
    stage = validate(compose_config(job)).stage
    assert stage.name == "part_ranking" and stage.checkpoint_iteration == iteration
    assert part_ranking.proposal_checkpoint(stage) == ckpt.checkpoint_path(run_dir, iteration or 50000)


#: The script that submits each stage of the reference pipeline.
PIPELINE_SCRIPTS = {"detic_labeling": "detic/run.sh", "pixel_grouping": "proposal_generation/run.sh",
                    "dense_crf": "dcrf/run.sh", "proposal_learning": "proposal_learning/train_multi.sh",
                    "part_ranking": "part_ranking/run.sh", "part_distillation": "part_distillation_training/train.sh"}


@pytest.mark.parametrize("experiment", ["in22k", "in1k"])
@pytest.mark.parametrize("stage", sorted(PIPELINE_SCRIPTS))
def test_scripts_submit_the_jobs_of_the_reference_pipeline(tmp_path, experiment, stage):
    """``sh_files/`` and ``stage=pipeline experiment=in22k|in1k`` (configs/cluster/reference.yaml,
    through the experiments' pipeline tunings) ask for the same jobs: each script, run with its
    own defaults (``PD_PYTHON`` a script that prints its arguments, no ``JOBS``/``NODES``), gives
    the pipeline's job count for its stage and exactly the pipeline's overrides of that stage
    (model, sharding, stage settings, SLURM resources)."""
    from part_distillation.config import validate
    from part_distillation.launch import compose_config

    pipeline = validate(compose_config(["stage=pipeline", f"experiment={experiment}"])).stage
    expected = sorted(o.split(":", 1)[1] for o in pipeline.overrides if o.split(":", 1)[0] == stage)
    echo = tmp_path / "echo_python"
    echo.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    echo.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("JOBS", "NODES")}
    env.update(PD_PYTHON=str(echo), PD_EXPERIMENT=experiment)
    args = subprocess.run(["bash", str(SCRIPTS / PIPELINE_SCRIPTS[stage])], env=env, capture_output=True,
                          text=True, check=True).stdout.splitlines()
    assert args[:3] == ["-m", "part_distillation", "-m"], args
    assert f"experiment={experiment}" in args and f"stage={stage}" in args
    count = [a.split("=", 1)[1] for a in args if a.startswith("shard.count=")]
    assert count == ([str(pipeline.shards[stage])] if stage in pipeline.shards else []), (stage, count)
    given = sorted(a for a in args[3:] if not a.startswith(("hydra/launcher=", "experiment=", "stage=", "shard.count=",
                                                            "shard.index=")) or a.startswith("stage."))
    assert given == expected, f"{PIPELINE_SCRIPTS[stage]} vs configs/cluster/reference.yaml"
