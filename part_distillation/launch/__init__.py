"""Launching stages: one job in this process, a pipeline of stages here or on SLURM.

- ``local``: one stage job in this process (``run_job``): validate, torch.distributed,
  run, save the summary, one-line errors. Every other way of running a stage ends there.
- ``preflight``: what a job needs, checked before anything runs or is submitted.
- ``dag``: a pipeline's stages composed and ordered, where each stands (from its output
  alone), and the in-process run of them.
- ``slurm``: the pipeline on SLURM: submitit submission, the submission ledger,
  ``squeue``/``sacct`` and the job logs.
- ``status``: the table of where each stage of a pipeline stands.

Single stage jobs reach SLURM through Hydra's submitit launcher plugin
(``hydra/launcher=submitit_slurm``); the pipeline submits through ``slurm``. The stages
``pipeline`` and ``status`` are thin ``run()``s over ``dag``, ``slurm`` and ``status``.
Launching finds stages through the registry (``part_distillation.stages``) by name and
asks their specs, never their names. Only the stages about the pipeline (``pipeline``,
``status``, ``report``) import this package, and nothing it imports imports them or it
back (checked by tests/launch/test_init.py): no import cycle.
"""
from __future__ import annotations

from part_distillation.context import JobContext
from part_distillation.launch.local import (JobFailed, compose_config, configure_logging, distributed_context,
                                            fail_submitit_job_at_exit, job_error_message, run_in_context, run_job)
from part_distillation.launch.preflight import DATA_HINT, PreflightError, check_job, check_model, preflight_sweep
from part_distillation.launch.slurm import StageJob

__all__ = ["DATA_HINT", "JobContext", "JobFailed", "PreflightError", "StageJob", "check_job", "check_model",
           "compose_config",
           "configure_logging", "distributed_context", "fail_submitit_job_at_exit", "job_error_message",
           "preflight_sweep", "run_in_context", "run_job"]
