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

import atexit
import errno
import logging
import os
import socket
import sys
import tempfile
from contextlib import contextmanager
from typing import Any, Iterator

from hydra.errors import CompactHydraException
from omegaconf import DictConfig

from part_distillation import stages
from part_distillation.config import ConfigError, RunConfig, validate
from part_distillation.context import JobContext  # re-exported: launch.JobContext
from part_distillation.progress import record_summary

log = logging.getLogger("part_distillation")

__all__ = ["JobContext", "JobFailed", "PreflightError", "StageJob", "check_job", "compose_config",
           "distributed_context", "preflight_sweep", "run_job"]

#: Appended to a data-tree error: what a new user runs instead.
DATA_HINT = ("for the demo run `make demo` (python -m part_distillation experiment=demo); "
             "for your own images give data.root=<folder of class folders>")


class PreflightError(ConfigError):
    """Something a job needs is missing or unusable; found before anything ran. One line."""


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
    as JSON next to the stage's output: ``progress.record_summary``).

    A fault of the environment (unwritable or full output, missing file, wrong weights,
    an output made with another config) ends the job with :class:`JobFailed`, one line
    naming the file and what to do; its traceback goes to the log at DEBUG. Any other
    exception is a bug and keeps its traceback.
    """
    run: RunConfig = validate(cfg)
    configure_logging(run.log_level)
    stage_run = stages.get(run.stage.name)
    try:
        with distributed_context() as context:
            summary = stage_run(run, context)
            summary_file = record_summary(run, summary, context)
    except Exception as exc:
        fail_submitit_job_at_exit()
        message = job_error_message(exc, run)
        if message is None:
            raise
        log.debug("job failed", exc_info=True)
        log.error("%s", message)
        raise JobFailed(f"part_distillation: job failed: {message}") from None
    summary.log()
    if summary_file is not None:
        log.debug("summary saved to %s", summary_file)
    return summary.as_dict()


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

_OUTPUT_HINT = "choose another paths.root (or stage.output)"
_ERRNO_HINTS = {
    errno.ENOSPC: f"the disk is full: free space or {_OUTPUT_HINT}, then rerun (finished records are kept)",
    errno.EDQUOT: f"the disk quota is exceeded: free space or {_OUTPUT_HINT}, then rerun (finished records are kept)",
    errno.EROFS: f"the file system is read-only: {_OUTPUT_HINT}",
    errno.EACCES: f"permission denied: fix the permissions or {_OUTPUT_HINT}",
    errno.EPERM: f"not permitted: fix the permissions or {_OUTPUT_HINT}",
}


def job_error_message(exc: BaseException, run: RunConfig) -> str | None:
    """One line for an error that is the environment's fault, or None for a bug.

    A failed write is often followed by a second error while cleaning up (the shard's
    close); the first OS error with a known cause in the chain is the one reported.
    """
    from part_distillation.store import StoreError

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
    if isinstance(exc, (OSError, StoreError, ConfigError, stages.StageNotAvailable)):
        return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if type(exc).__module__.startswith("part_distillation.models"):  # a checkpoint that does not fit
        return (f"{run.model.weights}: not the weights model={run.model.name} expects ({exc}); "
                f"see weights/README.md for the file to use")
    return None


def preflight_sweep(config_dir: str, overrides: list[str]) -> int:
    """Validate every job of a multirun, then check what it needs (``check_job``), before anything
    is submitted; return the job count.

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
        runs = [validate(compose(config_name="config", overrides=fixed + variant)) for variant in variants]
    GlobalHydra.instance().clear()
    for run in runs:  # values first (cheap, they name the key), then what each job needs on disk
        check_job(run)
    return jobs


def check_job(run: RunConfig, pending: tuple[str, ...] = ()) -> None:
    """Everything about one job that can be checked before it is submitted.

    The stage (and a pipeline's stages) exist; the image tree holds images; the input
    (``stage.input``, the previous stage's output) exists; the weights
    file is there; the output folder is writable and, when it exists, was made with this
    config and shard count. Raises :class:`PreflightError` (or ``StageNotAvailable``)
    with one line naming the path or key.

    ``pending``: folders that jobs submitted before this one will write (a pipeline's
    earlier stages); a file or folder at or under one of them is not required yet.
    """
    def coming(path) -> bool:
        return bool(path) and _under_any(str(path), pending)

    stages.get(run.stage.name)
    if run.stage.name == "pipeline":
        for name in run.stage.stages:
            if name == "pipeline":
                raise PreflightError("config key 'stage.stages' may not contain 'pipeline' itself")
            stages.get(name)
        return  # each sub-stage is composed and checked when the pipeline reaches it
    if run.stage.name in stages.READS_IMAGE_TREE and not coming(run.data.root):
        from part_distillation.data.imagenet import check_image_tree

        try:
            check_image_tree(run.data.root, split=run.data.split, words_file=run.data.words_file)
        except FileNotFoundError as err:
            raise PreflightError(f"{err}; {DATA_HINT}") from None
        except OSError as err:  # e.g. a folder that cannot be listed
            raise PreflightError(f"image tree {run.data.root} (data.root) cannot be read: {err}") from None
    check_model(run)
    following = getattr(run.stage, "follow", False)  # waits for an input that is still to come
    if (run.stage.input is not None and not following and not coming(run.stage.input)
            and not os.path.isdir(run.stage.input)):
        raise PreflightError(f"input {run.stage.input} (stage.input) does not exist: run the stage that writes "
                             f"it first, or set stage.input=<its output folder>")
    for extra in getattr(run.stage, "extra_inputs", None) or ():  # further record sets trained on with input
        if not following and not coming(extra) and not os.path.isdir(extra):
            raise PreflightError(f"input {extra} (stage.extra_inputs) does not exist: run the stages that write it "
                                 f"on that dataset first, or leave it out of stage.extra_inputs")
    if (stages.loads_weights(run) and run.model.weights and not coming(run.model.weights)
            and not os.path.isfile(run.model.weights)):
        raise PreflightError(f"weights file {run.model.weights} (model.weights) not found: place it there "
                             f"(weights/README.md says where to get it) or set paths.weights=<folder>")
    if not any(coming(path) for path in _paths_read(run)):  # a stage's own checks look at its input files
        stages.check(run)
    _check_writable(run.stage.output)
    from part_distillation.stages.common import output_conflict

    conflict = output_conflict(run)
    if conflict:
        raise PreflightError(conflict)


#: What to choose instead, by network family (configs/model/).
_MODEL_CHOICES = {"mask2former": "model=mask2former_swinl (the reference; experiment=in1k/in22k choose it)",
                  "detic": "model=detic_swinb (the reference; experiment=in1k/in22k choose it)"}


def check_model(run: RunConfig) -> None:
    """A job that builds a network has one of the family it needs, and the demo's tiny
    Mask2Former only in ``experiment=demo`` or with ``model.allow_tiny=true`` (without
    ``model=`` a stage would otherwise train the 20-query demo network from scratch)."""
    family = stages.model_needed(run)
    if family is None:
        return
    choice = _MODEL_CHOICES[family]
    if run.model.name != family:
        raise PreflightError(f"config key 'model' is {run.model.name!r}: stage {run.stage.name} builds a {family} "
                             f"network; choose {choice}")
    if (family == "mask2former" and run.model.size == "tiny" and run.experiment != "demo"
            and not run.model.allow_tiny):
        raise PreflightError(f"config key 'model.size' is 'tiny' (the demo's 20-query network) outside experiment=demo: "
                             f"choose {choice}, or add model.allow_tiny=true for a small trial")


def _check_writable(folder: str) -> None:
    """``folder`` (or its nearest existing parent, where it will be made) accepts new files."""
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise PreflightError(f"output folder {folder} (stage.output) cannot be made: {path} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".pd_write_check.")
    except OSError as err:
        raise PreflightError(f"output folder {folder} (stage.output) is not writable ({path}: "
                             f"{err.strerror or err}): {_OUTPUT_HINT}") from None
    os.close(fd)
    os.unlink(probe)


def _under_any(path: str, folders) -> bool:
    """``path`` is one of ``folders`` or inside one of them (absolute, normalised paths)."""
    path = os.path.abspath(path)
    for folder in folders:
        folder = os.path.abspath(folder)
        if path == folder or path.startswith(folder.rstrip(os.sep) + os.sep):
            return True
    return False


def _paths_read(run: RunConfig) -> list[str]:
    """Every path-like setting a job may read: its stage's strings (output and name aside),
    ``data.root`` and ``model.weights``."""
    import dataclasses

    found = [run.data.root, run.model.weights or ""]
    for f in dataclasses.fields(run.stage):
        if f.name in ("name", "output"):
            continue
        value = getattr(run.stage, f.name)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, str) and os.sep in item:
                found.append(item)
    return [p for p in found if p]


def compose_config(overrides: list[str]) -> DictConfig:
    """The configuration ``python -m part_distillation <overrides>`` would run, composed here
    (in a job, or in a pipeline outside its own Hydra app)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from part_distillation.__main__ import config_dir  # also registers the schemas

    if GlobalHydra.instance().is_initialized():
        return compose(config_name="config", overrides=list(overrides))
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


class StageJob:
    """One stage job as submitit runs it for the pipeline: compose the stage's config from
    ``overrides`` (plus ``shard.index`` for an array task) inside the job and :func:`run_job`
    it, the same job ``python -m part_distillation <overrides>`` runs.

    Preemption and time-outs: submitit calls :meth:`checkpoint`, which requeues the same call
    (as Hydra's submitit launcher does); the stage resumes from its store or checkpoints.
    ``done_marker``: a JSON file written after success (stages without a record store).
    """

    def __init__(self, overrides: list[str], done_marker: str | None = None, marker_content: dict | None = None):
        self.overrides = list(overrides)
        self.done_marker = done_marker
        self.marker_content = marker_content or {}

    def __call__(self, shard_index: int | None = None) -> dict[str, Any]:
        overrides = self.overrides + ([f"shard.index={shard_index}"] if shard_index is not None else [])
        result = run_job(compose_config(overrides))
        if self.done_marker:
            from part_distillation.store import atomic_write_json

            os.makedirs(os.path.dirname(self.done_marker), exist_ok=True)
            atomic_write_json(self.done_marker, self.marker_content)
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)
