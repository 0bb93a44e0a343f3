"""The launcher on a real SLURM cluster: arrays through Hydra, torch.distributed, requeue.

Needs a running cluster (``tools/slurm_test_cluster.sh start``); the tests only check
that it answers. Each test submits into its own ``tmp_path`` so that a job id reused
after the cluster's state was wiped can never hand back another run's results.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import submitit
from PIL import Image

from part_distillation.data.synthetic import make_synthetic_dataset
from part_distillation.store import RecordStore
from tests.helpers import run_entry
from tests.slurm_cluster import (all_reduce_job, final_state, job_logs, job_state, python_path_setup, slurm_cluster,
                                 submitit_job_ids, wait_for)

pytestmark = [pytest.mark.slurm, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[1]
INDEX_OUTPUT = Path("pseudo_labels") / "index" / "synthetic_train"
__all__ = ["slurm_cluster"]  # the fixture, imported so pytest finds it


def _records(out_root: Path) -> dict[str, dict]:
    return {r["key"]: r for r in RecordStore(out_root / INDEX_OUTPUT).iter_records()}


def _slurm_sweep(data_root: Path, out_root: Path, sweep_dir: Path, *extra: str) -> list[str]:
    return ["-m", "hydra/launcher=submitit_slurm", "stage=index", f"data.root={data_root}",
            f"paths.root={out_root}", f"hydra.sweep.dir={sweep_dir}", "launcher.cpus_per_task=1", *extra]


def test_index_array_job_through_hydra_writes_every_shard(slurm_cluster, tmp_path):
    made = make_synthetic_dataset(tmp_path / "data", num_classes=2, images_per_class=6, size=48, seed=5)
    sweep = tmp_path / "sweep"
    started = time.monotonic()
    result = run_entry(*_slurm_sweep(tmp_path / "data", tmp_path / "out", sweep, "shard.count=2",
                                  "shard.index=range(0,2)", "launcher.timeout_min=5"))
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:] + job_logs(sweep)

    # one SLURM array of two tasks, both completed according to the controller and sacct
    ids = submitit_job_ids(sweep / ".submitit")
    array_tasks = [j for j in ids if "_" in j]
    assert len(array_tasks) == 2 and len({j.split("_")[0] for j in array_tasks}) == 1, ids
    assert sorted(j.split("_")[1] for j in array_tasks) == ["0", "1"]
    for job_id in array_tasks:
        job = submitit.SlurmJob(folder=sweep / ".submitit" / "%j", job_id=job_id)
        assert final_state(job) == "COMPLETED"
        summary = job.result().return_value  # hydra's JobReturn around run_job's summary
        assert summary["stage"] == "index" and summary["written"] == 6, summary

    # the record store: both shards written once, together covering the whole tree
    store = RecordStore(tmp_path / "out" / INDEX_OUTPUT)
    assert store.num_shards == 2
    per_shard = [list(store.iter_records(shards=[i])) for i in range(2)]
    assert all(len(records) == 6 for records in per_shard)
    keys = [r["key"] for records in per_shard for r in records]
    assert len(keys) == len(set(keys)) == made.num_images == 12
    assert all(r["ok"] and (r["height"], r["width"]) == (48, 48) for records in per_shard for r in records)
    totals = store.summary()
    assert totals["shards_closed"] == 2 and totals["status"] == {"closed": 2} and totals["records"] == 12
    # each job ran with its own sweep value
    for i in range(2):
        assert f"shard.index={i}" in (sweep / str(i) / ".hydra" / "overrides.yaml").read_text()
    assert elapsed < 120


def test_two_task_job_all_reduces_over_gloo(slurm_cluster, tmp_path):
    if slurm_cluster.cpus < 2:
        pytest.skip(f"a 2-task job needs 2 CPUs on one node, the cluster has {slurm_cluster.cpus}")
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit" / "%j", cluster="slurm")
    executor.update_parameters(name="pd_test_all_reduce", timeout_min=5, nodes=1, tasks_per_node=2,
                               cpus_per_task=1, slurm_setup=python_path_setup())
    job = executor.submit(all_reduce_job)
    try:
        results = job.results()
    except Exception:  # noqa: BLE001 - show the job's own logs
        pytest.fail(f"the 2-task job failed:\n{job_logs(tmp_path / 'submitit')}")
    assert final_state(job) == "COMPLETED"
    assert len(results) == 2
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert sorted(r["slurm_procid"] for r in results) == ["0", "1"]
    for r in results:
        assert r["world_size"] == r["dist_world_size"] == 2
        assert r["sum"] == 3.0
        assert r["backend"] == "gloo"
        assert r["on_slurm"] and r["job_id"] == job.job_id


def _slow_tree(root: Path, per_class: int) -> Path:
    """A real image tree whose index takes seconds: many hard links of one noisy 1 Mpx JPEG."""
    made = make_synthetic_dataset(root, num_classes=2, images_per_class=2, size=48, seed=7)
    big = root / "noise.jpg"
    pixels = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(big, quality=90)
    for wnid in made.wnids:
        for i in range(per_class):
            target = made.image_dir / wnid / f"{wnid}_big_{i:04d}.JPEG"
            try:
                os.link(big, target)
            except OSError:
                target.write_bytes(big.read_bytes())
    return root


def test_preempted_index_job_is_requeued_and_matches_an_uninterrupted_run(slurm_cluster, tmp_path):
    data = _slow_tree(tmp_path / "data", per_class=60)
    sweep = tmp_path / "sweep"
    out = tmp_path / "slurm"
    shard = out / INDEX_OUTPUT / "shards" / "00000-of-00001.rec"
    # submitit treats the signal as a preemption only before min(0.8 * limit, limit - 10 min)
    # of run time, so the limit is 60 min here; with 5 min every signal counts as a time-out.
    cmd = [sys.executable, "-m", "part_distillation",
           *_slurm_sweep(data, out, sweep, "launcher.timeout_min=60", "launcher.max_num_timeout=1")]
    launcher = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def launcher_alive():
        if launcher.poll() is not None:
            pytest.fail(f"the launcher exited early ({launcher.returncode}):\n{launcher.stdout.read()[-3000:]}"
                        f"\n{job_logs(sweep / '.submitit')}")
        return True

    def submitted_job():  # one job is submitted as a plain job, several as an array (ids 12_0, ...)
        ids = submitit_job_ids(sweep / ".submitit")
        return launcher_alive() and next((j for j in ids if "_" in j), ids[0] if ids else None)

    try:
        job_id = wait_for(submitted_job, 60, what="the job to be submitted")
        wait_for(lambda: launcher_alive() and shard.exists() and shard.stat().st_size > 0, 60, 0.01,
                 what=f"job {job_id} to write its first record")
        # what a preempting scheduler does (and submitit's own Job._interrupt): TERM, then USR2
        for sig in ("TERM", "USR2"):
            subprocess.run(["scancel", f"--signal={sig}", job_id], check=True, timeout=30)
        output, _ = launcher.communicate(timeout=150)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            subprocess.run(["scancel", *submitit_job_ids(sweep / ".submitit")], timeout=30)
    logs = job_logs(sweep / ".submitit")
    assert launcher.returncode == 0, output[-3000:] + logs

    # it really was interrupted midway and requeued by the launcher's checkpoint()
    assert "this job is preempted" in logs, logs
    assert f"Requeued job {job_id}" in logs, logs
    assert job_state(job_id).get("Restarts") == "1", job_state(job_id)
    assert final_state(submitit.SlurmJob(folder=sweep / ".submitit" / "%j", job_id=job_id)) == "COMPLETED"
    total = 2 * 2 + 2 * 60
    summary = RecordStore(out / INDEX_OUTPUT).summary()
    assert summary["records"] == total and summary["status"] == {"closed": 1}, summary
    shard_summary = json.loads(shard.with_name("00000-of-00001.summary.json").read_text())
    assert 0 < shard_summary["resumed_records"] < total, shard_summary
    assert shard_summary["resumed_records"] + shard_summary["written_this_run"] == total

    # the same records as a run that was never interrupted
    reference = tmp_path / "reference"
    ran = run_entry("stage=index", f"data.root={data}", f"paths.root={reference}", f"hydra.run.dir={reference}/run")
    assert ran.returncode == 0, ran.stderr[-3000:]
    expected, got = _records(reference), _records(out)
    assert len(got) == total and got.keys() == expected.keys()
    for key, record in got.items():
        assert record == expected[key], key
