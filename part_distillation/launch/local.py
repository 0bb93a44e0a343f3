"""One stage job in this process: validate its config, set up torch.distributed, run the
stage, save its summary, and turn a fault of the environment into one line.

Every way of running a stage ends here: ``python -m part_distillation`` (in-process, or
inside a job of Hydra's submitit launcher: ``hydra/launcher=submitit_slurm`` makes a
multirun over ``shard.index`` an array), the pipeline's SLURM jobs (``launch.slurm.StageJob``)
and the in-process pipeline (``launch.dag.run_local``, through :func:`run_in_context`).

Preemption and time-outs: submitit signals the job, and the launcher plugin's
``checkpoint()`` requeues the same call (up to ``launcher.max_num_timeout`` times).
Stages resume where they stopped because the record store skips the records already
complete, so a requeued job needs no state of its own.
"""
from __future__ import annotations

import atexit
import errno
import logging
import os
import socket
import sys
from contextlib import contextmanager
from typing import Any, Iterator

from hydra.errors import CompactHydraException
from omegaconf import DictConfig

from part_distillation import stages
from part_distillation.config import ConfigError, RunConfig, config_dir, register_configs, validate
from part_distillation.errors import CheckpointMismatchError, UnsafePickleError
from part_distillation.context import JobContext  # re-exported: launch.JobContext
from part_distillation.summaries import StageSummary, record_summary

log = logging.getLogger("part_distillation")

__all__ = ["JobContext", "JobFailed", "compose_config", "configure_logging", "distributed_context",
           "fail_submitit_job_at_exit", "job_error_message", "job_errors", "run_in_context", "run_job"]


class JobFailed(CompactHydraException):
    """A job stopped on a fault of its environment (a file, the disk, the weights); one line.

    Hydra prints a ``CompactHydraException`` as its message alone, in-process and for a
    multirun; the traceback is in the job log at DEBUG.
    """


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
    """Validate ``cfg``, run its stage in this process, return the stage summary (also saved
    as JSON next to the stage's output: ``summaries.record_summary``).

    A fault of the environment (unwritable or full output, missing file, wrong weights,
    an output made with another config) ends the job with :class:`JobFailed`, one line
    naming the file and what to do; its traceback goes to the log at DEBUG. Any other
    exception is a bug and keeps its traceback.
    """
    run: RunConfig = validate(cfg)
    configure_logging(run.log_level)
    stage_run = stages.get(run.stage.name)
    with job_errors(run):
        with distributed_context() as context:
            summary = _run_stage(stage_run, run, context)
    return summary.as_dict()


def run_in_context(run: RunConfig, context: JobContext) -> StageSummary:
    """Run ``run``'s stage with an existing job context, as :func:`run_job` does (summary saved
    and logged, environment faults ending in :class:`JobFailed`): how the in-process pipeline
    runs each of its stages."""
    stage_run = stages.get(run.stage.name)
    with job_errors(run):
        return _run_stage(stage_run, run, context)


def _run_stage(stage_run, run: RunConfig, context: JobContext) -> StageSummary:
    """The stage's ``run``, then its summary saved next to its output and logged."""
    summary = stage_run(run, context)
    summary_file = record_summary(run, summary, context)
    summary.log()
    if summary_file is not None:
        log.debug("summary saved to %s", summary_file)
    return summary


@contextmanager
def job_errors(run: RunConfig) -> Iterator[None]:
    """An exception inside: mark the submitit job failed; a fault of the environment becomes
    :class:`JobFailed` (one line, logged; the traceback at DEBUG), a bug keeps its traceback."""
    try:
        yield
    except Exception as exc:
        fail_submitit_job_at_exit()
        message = job_error_message(exc, run)
        if message is None:
            raise
        log.debug("job failed", exc_info=True)
        log.error("%s", message)
        raise JobFailed(f"part_distillation: job failed: {message}") from None


def fail_submitit_job_at_exit() -> None:
    """Make a failed stage's submitit job (SLURM or local) end with exit status 1.

    Hydra's launcher catches the stage's exception and returns it in its ``JobReturn``,
    so submitit stores a successful result and the job would exit 0: SLURM's accounting
    would say COMPLETED for a failed shard, ``afterok`` dependents would start, and a
    status read from ``sacct`` would be wrong. The launcher still reads the stored result
    (and prints the one-line error); the process exits 1 once submitit has stored it.
    Outside a submitit job (in-process runs, tests) this does nothing.
    """
    global _EXIT_HOOKED
    if "SUBMITIT_EXECUTOR" not in os.environ or _EXIT_HOOKED:
        return

    def exit_failed() -> None:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    atexit.register(exit_failed)
    _EXIT_HOOKED = True


_EXIT_HOOKED = False

OUTPUT_HINT = "choose another paths.root (or stage.output)"
_ERRNO_HINTS = {
    errno.ENOSPC: f"the disk is full: free space or {OUTPUT_HINT}, then rerun (finished records are kept)",
    errno.EDQUOT: f"the disk quota is exceeded: free space or {OUTPUT_HINT}, then rerun (finished records are kept)",
    errno.EROFS: f"the file system is read-only: {OUTPUT_HINT}",
    errno.EACCES: f"permission denied: fix the permissions or {OUTPUT_HINT}",
    errno.EPERM: f"not permitted: fix the permissions or {OUTPUT_HINT}",
}


def job_error_message(exc: BaseException, run: RunConfig) -> str | None:
    """One line for an error that is the environment's fault, or None for a bug.

    A failed write is often followed by a second error while cleaning up (the shard's
    close); the first OS error with a known cause in the chain is the one reported.
    """
    from part_distillation.store import StoreError
    from part_distillation.store.manifest import one_line

    chain, seen = [], exc
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for err in chain:
        if isinstance(err, OSError) and err.errno in _ERRNO_HINTS:
            where = os.fsdecode(err.filename) if err.filename is not None else run.stage.output
            return f"{where}: {_ERRNO_HINTS[err.errno]}"
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{os.fsdecode(exc.filename)}: {exc.strerror or exc}"
    if isinstance(exc, (OSError, StoreError, ConfigError)):
        return one_line(exc)
    if isinstance(exc, (CheckpointMismatchError, UnsafePickleError)) or type(exc).__module__.startswith(
            "part_distillation.models"):  # a checkpoint that does not fit
        return (f"{run.model.weights}: not the weights model={run.model.name} expects ({exc}); "
                f"see weights/README.md for the file to use")
    return None


def compose_config(overrides: list[str]) -> DictConfig:
    """The configuration ``python -m part_distillation <overrides>`` would run, composed here
    (in a job, or in a pipeline outside its own Hydra app)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name="config", overrides=list(overrides))
    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))
