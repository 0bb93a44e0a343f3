"""A stage-4 training job on the local SLURM cluster, submitted through the project's
launcher (``-m hydra/launcher=submitit_slurm``), survives a requeue and a cancel.

- Requeued with ``scontrol requeue`` (what a preempting scheduler does) after its first
  checkpoint: SLURM kills it and starts it again, the stage resumes from the checkpoint,
  and the final weights are bitwise those of an uninterrupted run.
- Cancelled with ``scancel`` after its first checkpoint, then the same command submitted
  again: the new job resumes and ends with the same weights.

The uninterrupted run is computed once, in this process, from the same overrides
(composed by Hydra as the job composes them). CPU, ``stage.deterministic=true`` and one
thread everywhere (``OMP_NUM_THREADS=1`` reaches the job through sbatch's exported
environment), so equality is exact.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import submitit
import torch

from part_distillation.engine import checkpoint as ckpt
from tests.data.part_fixtures import write_part_segments
from tests.slurm_cluster import final_state, job_logs, job_state, slurm_cluster, submitit_job_ids, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.integration, pytest.mark.requires("slurm")]
__all__ = ["slurm_cluster"]

REPO = Path(__file__).resolve().parents[2]
#: Long enough that the job is still training when SLURM kills it: submitit ignores SIGTERM,
#: so a requeued or cancelled job trains on for KillWait (5 s on the test cluster, about
#: 50 iterations of this tiny model on a quiet CPU) before SIGKILL.
MAX_ITER = 240
PERIOD = 4  # checkpoint every 4 iterations: the first lands a few seconds into training
#: Seconds allowed for one launcher or job step (generous: the 2 CPUs may be shared)
SLOW = 300


def _training_overrides(records: Path, data_root: Path, output: Path) -> list[str]:
    """The job's settings: a tiny deterministic CPU run of stage 4 on the fixture records."""
    return ["stage=proposal_learning", "model=mask2former_tiny", "model.allow_tiny=true",
            f"stage.input={records}", f"stage.output={output}", f"data.root={data_root}",
            f"paths.root={output.parent / 'paths'}",
            "stage.batch_size=2", "stage.per_device_batch=2", f"stage.max_iter={MAX_ITER}", "stage.steps=[200]",
            "stage.lr=0.001", "stage.image_size=64", "stage.num_workers=0", "stage.num_points=256",
            f"stage.checkpoint_period={PERIOD}", "stage.checkpoint_minutes=0", "stage.keep_last=2",
            "stage.preview_period=0", "stage.log_period=4", "stage.deterministic=true", "model.device=cpu",
            "seed=3"]


def _launcher_cmd(overrides: list[str], sweep: Path) -> list[str]:
    # timeout 60 min: submitit counts a signal as a preemption (not a time-out) before
    # min(0.8 x limit, limit - 10 min); the requeue here comes from outside anyway
    return [sys.executable, "-m", "part_distillation", "-m", "hydra/launcher=submitit_slurm", *overrides,
            f"hydra.sweep.dir={sweep}", "launcher.gpus_per_node=0", "launcher.cpus_per_task=1",
            "launcher.timeout_min=60"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Stage-3 records of the synthetic dataset (written in-process, about a second)."""
    root = tmp_path_factory.mktemp("slurm_training")
    records = write_part_segments(root / "synthetic", root / "records", num_classes=2, images_per_class=3)
    return root, records


@pytest.fixture(scope="module")
def uninterrupted(inputs):
    """The final checkpoint of the same run, never interrupted, trained in this process."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from part_distillation.__main__ import config_dir
    from part_distillation.config import validate
    from part_distillation.launch import JobContext
    from part_distillation.stages import proposal_learning

    root, records = inputs
    output = root / "uninterrupted" / "run"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        run = validate(compose(config_name="config", overrides=_training_overrides(records, root / "synthetic",
                                                                                    output)))
    GlobalHydra.instance().clear()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = proposal_learning.run(run, JobContext())
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)  # the stage set it for this process
    assert summary.extra["iterations"] == MAX_ITER and summary.extra["resumed_at"] == 0
    return ckpt.load_checkpoint(ckpt.checkpoint_path(output, MAX_ITER))


def _assert_same_training_state(got: dict, expected: dict) -> None:
    """Model weights and optimiser state bitwise equal; same iteration."""
    assert got["iteration"] == expected["iteration"] == MAX_ITER
    assert got["model"].keys() == expected["model"].keys()
    differ = [k for k, v in got["model"].items() if not torch.equal(v, expected["model"][k])]
    assert not differ, f"{len(differ)} of {len(got['model'])} tensors differ, e.g. {differ[:3]}"
    for key, state in got["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(expected["optimizer"]["state"][key][name])), \
                (key, name)


class Launcher:
    """``python -m part_distillation -m hydra/launcher=submitit_slurm ...`` running in the background."""

    def __init__(self, cmd: list[str], sweep: Path):
        self.sweep = sweep
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"the launcher exited early ({self.proc.returncode}):\n{self.proc.stdout.read()[-3000:]}"
                        f"\n{job_logs(self.sweep / '.submitit')}")
        return True

    def job_id(self) -> str:
        return wait_for(lambda: self.alive() and next(iter(submitit_job_ids(self.sweep / ".submitit")), None),
                        SLOW, 0.1, what="the training job to be submitted")

    def finish(self, timeout: float) -> str:
        """Wait for the launcher to exit; its output."""
        output, _ = self.proc.communicate(timeout=timeout)
        return output

    def __enter__(self) -> "Launcher":
        return self

    def __exit__(self, *exc) -> None:
        """A test that failed midway leaves no launcher and no job behind."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        jobs = submitit_job_ids(self.sweep / ".submitit")
        if exc[0] is not None and jobs:
            subprocess.run(["scancel", *jobs], timeout=30)


def _wait_for_first_checkpoint(launcher: Launcher, run_dir: Path, job_id: str) -> int:
    found = wait_for(lambda: launcher.alive() and ckpt.list_checkpoints(run_dir), SLOW, 0.02,
                     what=f"job {job_id} to write its first checkpoint")
    return found[0][0]


def _resumed_at(logs: str) -> list[int]:
    return [int(m) for m in re.findall(r"resumed from \S+ at iteration (\d+)", logs)]


def test_requeued_training_job_resumes_to_the_uninterrupted_weights(slurm_cluster, inputs, uninterrupted,
                                                                    tmp_path, tally):
    root, records = inputs
    run_dir = tmp_path / "slurm" / "run"
    sweep = tmp_path / "sweep"
    with Launcher(_launcher_cmd(_training_overrides(records, root / "synthetic", run_dir), sweep), sweep) as launcher:
        job_id = launcher.job_id()
        first = _wait_for_first_checkpoint(launcher, run_dir, job_id)
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30, capture_output=True)
        output = launcher.finish(timeout=2 * SLOW)
    logs = job_logs(sweep / ".submitit", tail=10**8)  # whole logs: the resume line is near the start
    assert launcher.proc.returncode == 0, output[-3000:] + logs

    # SLURM restarted the job once; the second run resumed from a checkpoint midway
    assert job_state(job_id).get("Restarts") == "1", job_state(job_id)
    job = submitit.SlurmJob(folder=sweep / ".submitit" / "%j", job_id=job_id)
    assert final_state(job) == "COMPLETED"
    summary = job.result().return_value
    assert first <= summary["resumed_at"] < MAX_ITER, (first, summary)
    assert summary["iterations"] == MAX_ITER
    assert _resumed_at(logs) == [summary["resumed_at"]], logs

    _assert_same_training_state(ckpt.load_checkpoint(ckpt.checkpoint_path(run_dir, MAX_ITER)), uninterrupted)
    assert not list((run_dir / "checkpoints").glob(".*.tmp")), "a temporary checkpoint file was left behind"
    tally.add("requeues")


def test_cancelled_training_job_resubmitted_gives_the_same_weights(slurm_cluster, inputs, uninterrupted, tmp_path,
                                                                   tally):
    root, records = inputs
    run_dir = tmp_path / "slurm" / "run"
    sweep = tmp_path / "sweep"
    cmd = _launcher_cmd(_training_overrides(records, root / "synthetic", run_dir), sweep)
    with Launcher(cmd, sweep) as launcher:
        job_id = launcher.job_id()
        first = _wait_for_first_checkpoint(launcher, run_dir, job_id)
        subprocess.run(["scancel", job_id], check=True, timeout=30)
        output = launcher.finish(timeout=SLOW)
    assert launcher.proc.returncode != 0, "the launcher should report the cancelled job:\n" + output[-3000:]
    cancelled = submitit.SlurmJob(folder=sweep / ".submitit" / "%j", job_id=job_id)
    assert final_state(cancelled).startswith("CANCELLED")
    stopped_at = max(i for i, _ in ckpt.list_checkpoints(run_dir))
    assert first <= stopped_at < MAX_ITER, "the job ended before it was cancelled"

    # the same command again: a new job, which resumes from the last checkpoint
    with Launcher(cmd, sweep) as again:
        output = again.finish(timeout=2 * SLOW)
    logs = job_logs(sweep / ".submitit")
    assert again.proc.returncode == 0, output[-3000:] + logs
    new_ids = [j for j in submitit_job_ids(sweep / ".submitit") if j != job_id]
    assert len(new_ids) == 1, new_ids
    summary = submitit.SlurmJob(folder=sweep / ".submitit" / "%j", job_id=new_ids[0]).result().return_value
    assert summary["resumed_at"] == stopped_at, (stopped_at, summary)  # the newest checkpoint
    _assert_same_training_state(ckpt.load_checkpoint(ckpt.checkpoint_path(run_dir, MAX_ITER)), uninterrupted)
    tally.add("kills")
