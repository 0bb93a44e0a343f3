"""The demo pipeline on the local SLURM cluster: every stage submitted at once as dependent jobs.

One small demo (2 classes x 3 images, 4 training iterations at 64 pixels, no GPU) is
submitted with one dense-CRF array task made to fail: its shard file's place is taken by
a folder, an environment fault the job reports in one line. The stages after it are
cancelled by SLURM (their dependency can no longer be met). Rerunning the same command
after the folder is gone resubmits that one shard and the stages after it, nothing
else; the pipeline then ends with the records of an in-process run of the same
configuration, and a third submission finds nothing to do.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from part_distillation.store import RecordStore
from tests.helpers import REPO_ROOT, TRAIN_HALVES_EVALUATION, run_entry
from tests.slurm_cluster import slurm_cluster, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.integration]
__all__ = ["slurm_cluster"]  # the fixture, imported so pytest finds it

STAGES = "stage.stages=[synthetic_data,index,detic_labeling,pixel_grouping,dense_crf,proposal_learning,part_ranking,evaluate]"
SMALL = ("stage.overrides=['synthetic_data:stage.classes=2','synthetic_data:stage.images_per_class=3',"
         "'proposal_learning:stage.max_iter=4','proposal_learning:stage.steps=[3]',"
         "'proposal_learning:stage.checkpoint_period=2','proposal_learning:stage.image_size=64',"
         "'proposal_learning:stage.num_points=256','part_ranking:stage.image_size=64',"
         "'evaluate:stage.predictors=[proposal,records,strips]'," + TRAIN_HALVES_EVALUATION + "]")
LABELS = Path("pseudo_labels")
RECORD_OUTPUTS = {
    "index": LABELS / "index" / "synthetic_train",
    "detic_labeling": LABELS / "object_labels" / "synthetic_train" / "detic_predictions",
    "pixel_grouping": LABELS / "part_labels" / "proposal_generation" / "synthetic_train",
    "dense_crf": LABELS / "part_labels" / "proposal_generation_dcrf" / "synthetic_train",
}
DCRF = RECORD_OUTPUTS["dense_crf"]


def _args(root: Path, *extra: str) -> list[str]:
    return ["experiment=demo", "model=mask2former_tiny", f"paths.root={root}", f"hydra.run.dir={root}/run",
            STAGES, SMALL,
            "+stage.shards.dense_crf=2", "launcher.cpus_per_task=1", "launcher.timeout_min=10", *extra]


def _ledger(root: Path) -> list[dict]:
    path = root / "outputs" / "pipeline" / "submissions.json"
    return json.loads(path.read_text())["jobs"] if path.is_file() else []


def _wait_until_idle(root: Path, timeout: float) -> None:
    """Until SLURM holds none of the jobs this pipeline submitted."""
    names = sorted({e["name"] for e in _ledger(root)})

    def idle():
        out = subprocess.run(["squeue", "-h", f"--name={','.join(names)}", "-o", "%i"], capture_output=True,
                             text=True, timeout=30)
        return out.returncode == 0 and not out.stdout.strip()

    wait_for(idle, timeout, 1.0, what=f"the pipeline's jobs ({', '.join(names)}) to end")


def _logs(root: Path) -> str:
    parts = []
    for path in sorted((root / "outputs" / "pipeline" / "submitit").rglob("*_log.err")):
        parts.append(f"----- {path}\n{path.read_text(errors='replace')[-1500:]}")
    return "\n".join(parts)


def _sacct(job_ids: list[str]) -> dict[str, str]:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", ",".join(job_ids), "-o", "JobID,State"],
                         capture_output=True, text=True, timeout=30)
    return dict(line.split("|")[:2] for line in out.stdout.split() if "|" in line)


def _status(root: Path) -> dict:
    """``stage=status``'s rows (in this process: a subprocess would add a minute on a busy machine)."""
    from part_distillation.launch import dag, status

    cfg = dag.compose_stage(["stage=status", "experiment=demo", f"paths.root={root}"])
    return {row.name: row for row in status.collect(cfg)}


def _normalised(value, root: str):
    """A record with numpy arrays as (dtype, shape, bytes), ``root`` out of its paths and no mtime."""
    if isinstance(value, dict):  # (an index record's mtime is the image file's: two runs, two files)
        return {k: _normalised(v, root) for k, v in value.items() if k != "mtime"}
    if isinstance(value, (list, tuple)):
        return [_normalised(v, root) for v in value]
    if isinstance(value, np.ndarray):
        return (str(value.dtype), value.shape, value.tobytes())
    if isinstance(value, str):
        return value.replace(root, "<root>")
    return value


def _records(root: Path, output: Path) -> dict:
    return {r["key"]: _normalised(r, str(root)) for r in RecordStore(root / output).iter_records()}


@pytest.fixture(scope="module")
def failed_then_resumed(slurm_cluster, tmp_path_factory):
    """Submit with dense-CRF shard 1 poisoned, rerun once it is fixed; the in-process run of the
    same configuration goes on meanwhile. Returns what the tests look at."""
    base = tmp_path_factory.mktemp("slurm_pipeline")
    root, local_root = base / "slurm", base / "local"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", ""))
                                                       if p), "OMP_NUM_THREADS": "1"}
    local = subprocess.Popen([sys.executable, "-m", "part_distillation", *_args(local_root)], cwd=REPO_ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    poison = root / DCRF / "shards" / "00001-of-00002.rec"
    poison.mkdir(parents=True)  # the shard file cannot be opened: that array task fails
    started = time.monotonic()
    first = run_entry(*_args(root, "stage.launcher=slurm"), timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    _wait_until_idle(root, timeout=400)
    failed_status = _status(root)
    shutil.rmtree(poison)
    shard0 = root / DCRF / "shards" / "00000-of-00002.rec"
    shard0_before = shard0.stat() if shard0.exists() else None
    first_jobs = _ledger(root)
    second = run_entry(*_args(root, "stage.launcher=slurm"), timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    _wait_until_idle(root, timeout=400)
    elapsed = time.monotonic() - started
    _, local_err = local.communicate(timeout=600)
    assert local.returncode == 0, local_err[-3000:]
    return {"root": root, "local_root": local_root, "first": first, "second": second, "first_jobs": first_jobs,
            "jobs": _ledger(root), "failed_status": failed_status, "shard0_before": shard0_before,
            "shard0": shard0, "elapsed": elapsed}


def test_failed_array_task_is_redone_alone_by_rerunning_the_pipeline(failed_then_resumed):
    run = failed_then_resumed
    root, first_jobs, jobs = run["root"], run["first_jobs"], run["jobs"]
    assert "[pipeline] stage 5/8 dense_crf: array" in run["first"].stdout, run["first"].stdout
    # every stage was submitted at once, chained by dependencies
    assert [e["stage"] for e in first_jobs] == ["synthetic_data", "index", "detic_labeling", "pixel_grouping",
                                                "dense_crf", "proposal_learning", "part_ranking", "evaluate"]
    dcrf = next(e for e in first_jobs if e["stage"] == "dense_crf")
    states = _sacct([e["job_id"] for e in first_jobs])
    assert states.get(f"{dcrf['job_id']}_0") == "COMPLETED" and states.get(f"{dcrf['job_id']}_1") == "FAILED", states
    later = [e for e in first_jobs if e["stage"] in ("proposal_learning", "part_ranking", "evaluate")]
    assert all(states.get(e["job_id"], "").startswith("CANCELLED") for e in later), states  # never ran

    # the status between the two submissions: shard 1 failed, with the job's one-line error
    rows = run["failed_status"]
    dcrf_row = rows["dense_crf"]
    assert (dcrf_row.done, dcrf_row.running, dcrf_row.failed, dcrf_row.pending) == ([0], [], [1], []), dcrf_row
    assert "Is a directory" in dcrf_row.error and dcrf_row.error.startswith(f"job {dcrf['job_id']}_1 FAILED"), dcrf_row
    assert rows["pixel_grouping"].done == [0] and rows["pixel_grouping"].records == 6
    assert rows["evaluate"].pending == [0] and not rows["evaluate"].failed  # cancelled before it started

    # the rerun: complete stages untouched, dense_crf shard 1 alone, then the stages after it
    second = run["second"].stdout
    for n, stage in enumerate(["synthetic_data", "index", "detic_labeling", "pixel_grouping"], 1):
        assert f"stage {n}/8 {stage}: complete, nothing submitted" in second, second
    resubmitted = jobs[len(first_jobs):]
    assert [(e["stage"], e["shards"]) for e in resubmitted] == [
        ("dense_crf", [1]), ("proposal_learning", [0]), ("part_ranking", [0]), ("evaluate", [0])], resubmitted
    after = run["shard0"].stat()
    assert run["shard0_before"] is not None
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (run["shard0_before"].st_ino, run["shard0_before"].st_size,
                                                                run["shard0_before"].st_mtime_ns)
    states = _sacct([e["job_id"] for e in resubmitted])
    assert all(state == "COMPLETED" for state in states.values()) and len(states) == 4, states + _logs(root)


def test_pipeline_on_slurm_ends_with_the_records_of_the_local_run(failed_then_resumed):
    root, local_root = failed_then_resumed["root"], failed_then_resumed["local_root"]
    for stage, output in RECORD_OUTPUTS.items():
        slurm, local = _records(root, output), _records(local_root, output)
        assert len(slurm) == 6 and slurm.keys() == local.keys(), stage
        assert slurm == local, f"{stage}: records differ from the in-process run"
    metrics = json.loads((root / "outputs" / "evaluate" / "synthetic_train" / "metrics.json").read_text())
    local_metrics = json.loads((local_root / "outputs" / "evaluate" / "synthetic_train" / "metrics.json").read_text())
    assert metrics == local_metrics
    checkpoint = root / "outputs" / "proposal_learning" / "synthetic_train" / "checkpoints" / "model_0000004.pth"
    assert checkpoint.is_file()
    ranking = RecordStore(root / LABELS / "part_labels" / "part_ranking" / "synthetic_train")
    local_ranking = RecordStore(local_root / LABELS / "part_labels" / "part_ranking" / "synthetic_train")
    for store in (ranking, local_ranking):  # labelled, or skipped (a class with <= K embeddings)
        assert len(store.keys()) + len(store.skipped()) == 6


def test_rerunning_a_finished_pipeline_submits_nothing(failed_then_resumed):
    root = failed_then_resumed["root"]
    before = _ledger(root)
    again = run_entry(*_args(root, "stage.launcher=slurm"), timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("complete, nothing submitted") == 8, again.stdout
    assert _ledger(root) == before
    rows = _status(root)
    assert len(rows) == 8 and all(r.complete and r.error == "" for r in rows.values()), rows
