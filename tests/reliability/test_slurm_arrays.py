"""A SLURM array with one failed task: rerunning the same array command redoes only the
failed shard; the completed shard's files are left exactly as they were.

The failure is deterministic and belongs to one shard: before the first run, shard 1's
output file path (``shards/00001-of-00002.rec``) is occupied by a folder, so its task
ends with the launcher's one-line error while task 0 completes. The folder is then
removed (the fault is fixed) and the same command is run again.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import submitit

from part_distillation.data.synthetic import make_synthetic_dataset
from part_distillation.store import RecordStore
from tests.helpers import run_entry
from tests.slurm_cluster import final_state, job_logs, slurm_cluster, submitit_job_ids

pytestmark = [pytest.mark.slurm, pytest.mark.integration, pytest.mark.requires("slurm")]
__all__ = ["slurm_cluster"]

INDEX_OUTPUT = Path("pseudo_labels") / "index" / "synthetic_train"


def _files(folder: Path) -> dict[str, tuple[int, bytes]]:
    """name -> (mtime in ns, bytes) of every file of ``folder``."""
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir()) if p.is_file()}


def _array_tasks(sweep: Path) -> dict[str, str]:
    """array index -> job id (``12_0``) of the tasks submitit made under ``sweep``."""
    return {j.split("_")[1]: j for j in submitit_job_ids(sweep / ".submitit") if "_" in j}


def _sacct_states(array_job: str) -> dict[str, str]:
    out = subprocess.run(["sacct", "-j", array_job, "-X", "-n", "-P", "--format=JobID,State"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    return dict(line.split("|", 1) for line in out.splitlines() if line.strip())


def test_rerun_of_an_array_redoes_only_its_failed_shard(slurm_cluster, tmp_path):
    made = make_synthetic_dataset(tmp_path / "data", num_classes=2, images_per_class=4, size=48, seed=2)
    out = tmp_path / "out"
    shards = out / INDEX_OUTPUT / "shards"
    poison = shards / "00001-of-00002.rec"
    poison.mkdir(parents=True)
    first_sweep, second_sweep = tmp_path / "sweep1", tmp_path / "sweep2"

    def array_command(sweep: Path) -> list[str]:
        return ["-m", "hydra/launcher=submitit_slurm", "stage=index", f"data.root={tmp_path / 'data'}",
                f"paths.root={out}", f"hydra.sweep.dir={sweep}", "shard.count=2", "shard.index=range(0,2)",
                "launcher.cpus_per_task=1", "launcher.timeout_min=5"]

    first = run_entry(*array_command(first_sweep), timeout=600)
    assert first.returncode != 0, "the array with a failing task should fail:\n" + first.stderr[-2000:]
    tasks = _array_tasks(first_sweep)
    assert sorted(tasks) == ["0", "1"], tasks
    job = {i: submitit.SlurmJob(folder=first_sweep / ".submitit" / "%j", job_id=j) for i, j in tasks.items()}
    assert final_state(job["0"]) == "COMPLETED" and final_state(job["1"]) == "FAILED"
    assert _sacct_states(tasks["0"].split("_")[0]) == {tasks["0"]: "COMPLETED", tasks["1"]: "FAILED"}
    # the failed task says why, in one line naming the path
    logs = job_logs(first_sweep / ".submitit")
    assert f"{poison}: Is a directory" in logs, logs
    store = RecordStore(out / INDEX_OUTPUT)
    done_first = list(store.iter_records(shards=[0]))
    assert len(done_first) > 0 and store.summary()["shards_closed"] == 1
    completed = _files(shards)  # shard 0's record file, summary and lock, as task 0 left them

    shutil.rmtree(poison)  # the fault is fixed; the same command again
    second = run_entry(*array_command(second_sweep), timeout=600)
    assert second.returncode == 0, second.stderr[-3000:] + job_logs(second_sweep / ".submitit")
    again = _array_tasks(second_sweep)
    summaries = {i: submitit.SlurmJob(folder=second_sweep / ".submitit" / "%j", job_id=j).result().return_value
                 for i, j in again.items()}
    assert summaries["0"]["written"] == 0 and summaries["0"]["already_done"] == len(done_first), summaries["0"]
    assert summaries["1"]["written"] == made.num_images - len(done_first), summaries["1"]

    # task 0 found its shard complete: its record file is untouched (bytes and mtime), its key
    # table has the same bytes; only the shard summary is rewritten, by the store's close(),
    # saying that this run resumed every record and wrote none
    after = _files(shards)
    rec, idx, summary = (f"00000-of-00002.{ext}" for ext in ("rec", "idx", "summary.json"))
    assert set(completed) == {rec, idx, summary}, sorted(completed)
    assert after[rec] == completed[rec], "the completed shard's record file was touched"
    assert after[idx][1] == completed[idx][1], "the completed shard's key table changed"
    before_summary, after_summary = (json.loads(files[summary][1]) for files in (completed, after))
    assert after_summary["records"] == before_summary["records"] == len(done_first)
    assert (after_summary["status"], after_summary["written_this_run"], after_summary["resumed_records"]) == \
        ("closed", 0, len(done_first)), after_summary
    # and the whole output is complete: every image once
    totals = RecordStore(out / INDEX_OUTPUT).summary()
    assert totals["status"] == {"closed": 2} and totals["records"] == made.num_images, totals
    keys = [r["key"] for r in RecordStore(out / INDEX_OUTPUT).iter_records()]
    assert len(keys) == len(set(keys)) == made.num_images
