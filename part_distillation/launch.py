"""Running one stage job: in-process, as a submitit local job, or on SLURM.

This is the only module that knows about SLURM. Hydra's launcher plugin submits the
jobs (``hydra/launcher=submitit_slurm``; a multirun over ``shard.index`` becomes an
array); inside each job :func:`run_job` validates the config, sets up torch.distributed
from the SLURM environment when the job has several tasks, and runs the stage.

Preemption and time-outs: submitit signals the job, and the launcher plugin's
``checkpoint()`` requeues the same call (up to ``launcher.max_num_timeout`` times).
Stages resume where they stopped because the record store skips the records already
complete, so a requeued job needs no state of its own.
"""
from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from omegaconf import DictConfig

from part_distillation import stages
from part_distillation.config import RunConfig, validate

log = logging.getLogger("part_distillation")


@dataclass
class JobContext:
    """Where this process stands in its job; handed to every stage's ``run``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    job_id: Optional[str] = None
    on_slurm: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _slurm_job_env():
    """submitit's view of the SLURM job, or None outside a submitit job."""
    if "SLURM_JOB_ID" not in os.environ or "SUBMITIT_EXECUTOR" not in os.environ:
        return None
    import submitit

    try:
        return submitit.JobEnvironment()
    except RuntimeError:
        return None


@contextmanager
def distributed_context() -> Iterator[JobContext]:
    """Initialise torch.distributed when the job has several processes; one code path.

    Under SLURM with several tasks, submitit's ``TorchDistributedEnvironment`` exports
    MASTER_ADDR/PORT, RANK and WORLD_SIZE; under torchrun they are already set. One
    process needs no process group. Backend: nccl on GPU, gloo on CPU.
    """
    job_env = _slurm_job_env()
    if job_env is not None and job_env.num_tasks > 1:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    initialised_here = False
    if world_size > 1:
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(local_rank % torch.cuda.device_count())
            dist.init_process_group(backend=backend, init_method="env://",
                                    world_size=world_size, rank=rank)
            initialised_here = True
            log.info("torch.distributed initialised: rank %d/%d (%s) on %s",
                     rank, world_size, backend, socket.gethostname())
    context = JobContext(rank=rank, world_size=world_size, local_rank=local_rank,
                         job_id=job_env.job_id if job_env else None,
                         on_slurm=job_env is not None)
    try:
        yield context
    finally:
        if initialised_here:
            import torch.distributed as dist

            dist.destroy_process_group()


def configure_logging(level: str) -> None:
    logging.getLogger("part_distillation").setLevel(level)


def run_job(cfg: DictConfig) -> dict[str, Any]:
    """Validate ``cfg``, run its stage in this process, return the stage summary."""
    run: RunConfig = validate(cfg)
    configure_logging(run.log_level)
    stage_run = stages.get(run.stage.name)
    with distributed_context() as context:
        summary = stage_run(run, context)
    summary.log()
    return summary.as_dict()


def preflight_sweep(config_dir: str, overrides: list[str]) -> int:
    """Validate every job of a multirun before anything is submitted; return the job count.

    Hydra composes each job's config only inside the job, so a bad value in a sweep of
    60 SLURM jobs would otherwise fail 60 times on the cluster. Each sweep value is
    checked with the other sweeps at their first value (sum, not product, of the sweep
    lengths), which covers per-job values such as ``shard.index=range(0,60)``.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    fixed = [o.input_line for o in parsed
             if not o.is_sweep_override() and not o.get_key_element().lstrip("+~").startswith("hydra")]
    sweeps = [(o.get_key_element(), list(o.sweep_string_iterator())) for o in parsed if o.is_sweep_override()]
    firsts = [f"{key}={values[0]}" for key, values in sweeps]
    variants = [firsts]
    for i, (key, values) in enumerate(sweeps):
        variants += [firsts[:i] + [f"{key}={v}"] + firsts[i + 1:] for v in values[1:]]
    jobs = 1
    for _, values in sweeps:
        jobs *= len(values)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        for variant in variants:
            cfg = compose(config_name="config", overrides=fixed + variant)
            run = validate(cfg)
            stages.get(run.stage.name)
            stages.check(run)
    GlobalHydra.instance().clear()
    return jobs
