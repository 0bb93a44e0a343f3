"""A 2-task training job on the local SLURM cluster through submitit equals one process
accumulating twice (the engine's DDP path from the launcher's environment)."""
import pytest
import submitit
import torch

from tests.slurm_cluster import final_state, job_logs, python_path_setup, slurm_cluster  # noqa: F401

from . import toy
from .test_distributed import ATOL, RTOL

pytestmark = [pytest.mark.slurm, pytest.mark.integration]


def test_two_task_training_job_equals_one_process_with_accumulation(slurm_cluster, tmp_path):  # noqa: F811
    if slurm_cluster.cpus < 2:
        pytest.skip(f"a 2-task job needs 2 CPUs on one node, the cluster has {slurm_cluster.cpus}")
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit" / "%j", cluster="slurm")
    executor.update_parameters(name="pd_test_training", timeout_min=10, nodes=1, tasks_per_node=2,
                               cpus_per_task=1, slurm_setup=python_path_setup())
    job = executor.submit(toy.slurm_training_job, str(tmp_path / "slurm_run"))
    try:
        results = job.results()
    except Exception:  # noqa: BLE001 - show the job's own logs
        pytest.fail(f"the 2-task training job failed:\n{job_logs(tmp_path / 'submitit')}")
    assert final_state(job) == "COMPLETED"
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["world_size"] == 2 and r["accum"] == 1 and r["on_slurm"] for r in results)
    single = toy.train(tmp_path / "single", max_iter=6, global_batch=4, per_device_batch=2, period=3, noise=False)
    assert single.accum == 2
    for name, value in single.module.state_dict().items():
        a, b = (torch.tensor(r["params"][name]) for r in results)
        assert torch.equal(a, b), name
        torch.testing.assert_close(a, value, rtol=RTOL, atol=ATOL, msg=name)
