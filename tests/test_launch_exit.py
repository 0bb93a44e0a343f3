"""A failed stage's submitit job ends with exit status 1 (``launch.fail_submitit_job_at_exit``).

Hydra's submitit launcher catches the stage's exception inside the job and returns it,
so without this the job process exits 0 and SLURM records COMPLETED for a failed shard
(``afterok`` dependents start; ``sacct`` misreports it). The SLURM side is checked in
``tests/reliability/test_slurm_arrays.py``; here the mechanism, without a cluster.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from part_distillation import launch
from part_distillation.launch import local
from tests.helpers import REPO_ROOT
from tests.test_main import _compose

pytestmark = pytest.mark.filterwarnings("ignore:(?s).*is validated against ConfigStore schema")

JOB = """
import sys
from part_distillation.launch import fail_submitit_job_at_exit
fail_submitit_job_at_exit()
fail_submitit_job_at_exit()  # once is enough
print("the job's result is stored", flush=True)
sys.exit(0)  # what submitit's job process does after storing the result
"""


@pytest.mark.parametrize("executor, status", [("slurm", 1), ("local", 1), (None, 0)])
def test_a_submitit_job_whose_stage_failed_exits_1_after_it_ends(executor, status):
    env = {k: v for k, v in os.environ.items() if k != "SUBMITIT_EXECUTOR"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    if executor:
        env["SUBMITIT_EXECUTOR"] = executor
    done = subprocess.run([sys.executable, "-c", JOB], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == status, done.stderr[-2000:]
    assert done.stdout == "the job's result is stored\n"  # the process ran to its end first


def test_run_job_marks_the_job_failed_on_any_stage_error_and_only_then(monkeypatch):
    calls = []
    monkeypatch.setattr(local, "fail_submitit_job_at_exit", lambda: calls.append("failed"))
    monkeypatch.setattr(local, "configure_logging", lambda level: None)  # leave other tests' log levels alone

    def stage_with(error):
        def run(cfg, context):
            if error is not None:
                raise error
            from part_distillation.summaries import StageSummary

            return StageSummary("index").finish()
        return run

    for error, raised in ((OSError(28, "No space left on device", "/x/shard.rec"), launch.JobFailed),
                          (ZeroDivisionError("a bug"), ZeroDivisionError)):
        monkeypatch.setattr(local.stages, "get", lambda name, error=error: stage_with(error))
        with pytest.raises(raised):
            launch.run_job(_compose("stage=index", "paths.root=/scratch/pd"))
    assert calls == ["failed", "failed"]
    monkeypatch.setattr(local.stages, "get", lambda name: stage_with(None))
    launch.run_job(_compose("stage=index", "paths.root=/scratch/pd"))
    assert calls == ["failed", "failed"]  # a stage that succeeds leaves the exit status alone
