"""Helpers of the SLURM tests (tests/test_launch.py): find the cluster, read job state.

The cluster is started outside the tests (``tools/slurm_test_cluster.sh start``; the CI
script does it before pytest). The ``slurm_cluster`` fixture only checks that it answers:
without one the SLURM tests skip with a reason, and under ``CI=true`` they fail.

This module is also imported *inside* SLURM jobs (``all_reduce_job`` is pickled by
reference), so its top level imports nothing heavy.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
START_HINT = "start one with `tools/slurm_test_cluster.sh start`"
SLURM_TOOLS = ("scontrol", "sinfo", "sbatch", "squeue", "scancel", "sacct")
USABLE_NODE_STATES = {"idle", "mixed", "allocated", "completing"}


@dataclass
class ClusterInfo:
    nodes: list[str]
    cpus: int


def _run(*cmd: str, timeout: float = 15) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def probe_cluster() -> tuple[Optional[ClusterInfo], str]:
    """(info, "") when a SLURM controller answers with a usable node and accounting, else (None, why)."""
    missing = [t for t in SLURM_TOOLS if shutil.which(t) is None]
    if missing:
        return None, f"SLURM client tools not installed ({', '.join(missing)}); {START_HINT}"
    try:
        ping = _run("scontrol", "ping")
        if ping.returncode != 0 or "UP" not in ping.stdout:
            said = ((ping.stdout + ping.stderr).strip().splitlines() or ["no output"])[0]
            return None, f"no SLURM controller answers `scontrol ping` ({said}); {START_HINT}"
        sinfo = _run("sinfo", "-h", "-N", "-o", "%N %T %c")
        nodes, cpus = [], 0
        for line in sinfo.stdout.splitlines():
            name, state, ncpu = line.split()
            if state.rstrip("*~#!%$@^-") in USABLE_NODE_STATES:
                nodes.append(name)
                cpus = max(cpus, int(ncpu))
        if not nodes:
            return None, f"SLURM answers but no node is usable (sinfo: {sinfo.stdout.strip() or sinfo.stderr.strip()})"
        # submitit reads final job states through sacct: without accounting they stay UNKNOWN
        sacct = _run("sacct", "-n", "-X", "-S", "now-1minutes")
        if sacct.returncode != 0:
            return None, f"SLURM accounting does not answer (sacct: {sacct.stderr.strip()}); {START_HINT}"
    except (subprocess.TimeoutExpired, OSError, ValueError) as err:
        return None, f"SLURM cluster probe failed: {err!r}; {START_HINT}"
    return ClusterInfo(nodes=nodes, cpus=cpus), ""


def require_cluster() -> ClusterInfo:
    """The running cluster; skip (fail under CI=true) when there is none."""
    from tests.conftest import require

    info, reason = probe_cluster()
    require("slurm", info is not None, reason)
    return info


@pytest.fixture(scope="session")
def slurm_cluster() -> ClusterInfo:
    return require_cluster()


# --------------------------------------------------------------------------- job state

def job_state(job_id: str) -> dict[str, str]:
    """``scontrol show job -o`` as a dict (JobState, Restarts, ...); {} once SLURM forgot it."""
    out = _run("scontrol", "show", "job", "-o", job_id)
    if out.returncode != 0:
        return {}
    first = out.stdout.splitlines()[0] if out.stdout else ""
    return dict(item.split("=", 1) for item in first.split() if "=" in item)


def submitit_job_ids(submitit_dir: Path) -> list[str]:
    """Job ids (``12`` or ``12_0``) of the per-job folders submitit made in ``submitit_dir``."""
    if not submitit_dir.is_dir():
        return []
    ids = [p.name for p in submitit_dir.iterdir() if p.is_dir() and re.fullmatch(r"\d+(_\d+)?", p.name)]
    return sorted(ids, key=lambda j: [int(x) for x in j.split("_")])


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; return it or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED",
                 "UNKNOWN", "READY"}


def final_state(job, timeout: float = 60) -> str:
    """The state SLURM ends ``job`` (a submitit job) in, once it has left the running states.

    Results are readable a moment before SLURM marks the job finished, so poll with
    ``get_info(mode="force")`` (bypasses submitit's cached state) instead of trusting it.
    """
    def ended():
        state = job.get_info(mode="force").get("State", "UNKNOWN").split()[0]
        return None if state in ACTIVE_STATES else state

    return wait_for(ended, timeout, 0.25, what=f"job {job.job_id} to leave the running states")


def job_logs(folder: Path, tail: int = 4000) -> str:
    """The end of every submitit log under ``folder``, for assertion messages."""
    parts = []
    for path in sorted(Path(folder).rglob("*_log.*")):
        text = path.read_text(errors="replace")
        parts.append(f"----- {path}\n{text[-tail:]}")
    return "\n".join(parts) or f"(no submitit logs under {folder})"


def python_path_setup() -> list[str]:
    """sbatch setup lines that make this repository (and so ``tests.*``) importable in a job."""
    return [f"export PYTHONPATH={REPO_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"]


# --------------------------------------------------------------------------- job functions

def all_reduce_job() -> dict:
    """Runs in every task of a SLURM job: join torch.distributed, all-reduce rank + 1."""
    import torch
    import torch.distributed as dist

    from part_distillation.launch import distributed_context

    with distributed_context() as context:
        value = torch.tensor([float(context.rank + 1)])
        dist.all_reduce(value)
        return {"rank": context.rank, "world_size": context.world_size,
                "dist_world_size": dist.get_world_size(), "sum": value.item(),
                "backend": str(dist.get_backend()), "job_id": context.job_id,
                "on_slurm": context.on_slurm, "slurm_procid": os.environ.get("SLURM_PROCID")}
