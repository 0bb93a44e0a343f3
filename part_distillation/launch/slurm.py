"""The pipeline on SLURM: submission with submitit, the ledger of what was submitted, and
what SLURM says of those jobs (``squeue``, ``sacct``, their logs).

``stage.launcher=slurm`` checks every stage (``launch.preflight.check_job``), then
:func:`submit` submits them all at once: arrays over ``shard.index`` for the sharded
stages, one job with the stage's ``launcher.*`` resources for the others (training:
several nodes and tasks), each waiting (``afterok``) for the jobs of the stages it reads;
it prints the job ids and the outputs and exits. Each job runs :class:`StageJob`, i.e.
``launch.local.run_job`` on the composed config, requeued on preemption.

Rerunning resumes: jobs still queued or running from an earlier submission
(``<stage.output>/submissions.json``, then ``squeue``) are not submitted again; later
stages wait for them instead. Single jobs of a stage (``python -m part_distillation
hydra/launcher=submitit_slurm ...``) go through Hydra's submitit launcher plugin instead.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from part_distillation import stages
from part_distillation.config import RunConfig
from part_distillation.launch.dag import (PlannedStage, done_marker, marker_content, own_overrides, preflight,
                                          ranges, stage_state)
from part_distillation.launch.local import compose_config, run_job
from part_distillation.launch.preflight import PreflightError
from part_distillation.store import atomic_write_json
from part_distillation.summaries import StageSummary

log = logging.getLogger("part_distillation")

LEDGER_FILE = "submissions.json"

#: SLURM states of a job that ended without success.
FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
                 "PREEMPTED"}
_EXCEPTION_PREFIX = re.compile(r"^(\w+\.)*JobFailed: ")
_ERROR_LINE = re.compile(r"(error|exception|killed|traceback|failed)", re.IGNORECASE)


class StageJob:
    """One stage job as submitit runs it for the pipeline: compose the stage's config from
    ``overrides`` (plus ``shard.index`` for an array task) inside the job and ``run_job``
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
            os.makedirs(os.path.dirname(self.done_marker), exist_ok=True)
            atomic_write_json(self.done_marker, self.marker_content)
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


# --------------------------------------------------------------------------- the ledger and the queue

def read_ledger(pipeline_output: str) -> list[dict]:
    """Every submission of this pipeline: ``{"stage", "job_id", "array", "shards", "name", "folder"}``."""
    try:
        return json.loads((Path(pipeline_output) / LEDGER_FILE).read_text())["jobs"]
    except (FileNotFoundError, ValueError, KeyError):
        return []


def append_ledger(pipeline_output: str, entry: dict) -> None:
    jobs = read_ledger(pipeline_output) + [entry]
    atomic_write_json(Path(pipeline_output) / LEDGER_FILE, {"jobs": jobs})


def slurm_available() -> bool:
    return all(shutil.which(tool) for tool in ("sbatch", "squeue", "sacct"))


def queued_jobs(names: list[str]) -> list[tuple[str, str, str]]:
    """``(array job id or job id, array task id or "", state)`` of this pipeline's jobs that
    SLURM still holds (``squeue`` by job name)."""
    if not names or not shutil.which("squeue"):
        return []
    out = subprocess.run(["squeue", "-h", "-r", f"--name={','.join(sorted(set(names)))}", "-o", "%F|%K|%T"],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:  # without the queue a rerun could submit a running stage twice: stop here
        raise PreflightError(f"squeue failed ({out.stderr.strip() or out.returncode}): cannot tell which jobs of "
                             f"this pipeline still run; nothing submitted")
    rows = []
    for line in out.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            job, task, job_state = parts
            rows.append((job, task if task.isdigit() else "", job_state))
    return rows


def active_shards(entries: list[dict], queue: list[tuple[str, str, str]]) -> dict[int, tuple[str, str]]:
    """Shard index -> (SLURM id to depend on, state) for the ledger ``entries`` still in ``queue``."""
    found: dict[int, tuple[str, str]] = {}
    by_job = {e["job_id"]: e for e in entries}
    for job, task, job_state in queue:
        entry = by_job.get(job)
        if entry is None:
            continue
        if entry["array"] and task:
            found[entry["shards"][int(task)]] = (f"{job}_{task}", job_state)
        else:
            for index in entry["shards"]:
                found[index] = (job, job_state)
    return found


def sacct_states(entries: list[dict]) -> dict[int, tuple[str, str, bool]]:
    """Shard index -> (job id, final state, whether it started) from SLURM's accounting; the
    latest submission of a shard wins."""
    if not entries or not shutil.which("sacct"):
        return {}
    ids = ",".join(e["job_id"] for e in entries)
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", ids, "-o", "JobID,State,Start"],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        return {}
    rows: dict[str, tuple[str, bool]] = {}
    for line in out.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 3:
            rows[parts[0]] = (parts[1].split()[0] if parts[1] else "UNKNOWN", parts[2] not in ("", "Unknown", "None"))
    found: dict[int, tuple[str, str, bool]] = {}
    for entry in entries:  # in submission order: later ones overwrite
        for task, index in enumerate(entry["shards"]):
            job_id = f"{entry['job_id']}_{task}" if entry["array"] else entry["job_id"]
            if job_id in rows:
                found[index] = (job_id, *rows[job_id])
    return found


def last_error_line(text: str) -> str:
    """The last line of a job log that names an error (else its last non-empty line), without
    the exception's module path (``part_distillation.launch.JobFailed: ...`` -> its message)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    found = lines[-1] if lines else ""
    for line in reversed(lines):
        if _ERROR_LINE.search(line) and not line.startswith(("submitit", "srun:", "slurmstepd:")):
            found = line
            break
    return _EXCEPTION_PREFIX.sub("", found)


def log_error(entry: dict, job_id: str) -> str:
    """The last error line of the stderr log of SLURM job ``job_id`` (task 0) of a ledger entry."""
    folder = Path(entry.get("folder", ""))
    for path in (folder / job_id / f"{job_id}_0_log.err", folder / job_id / f"{job_id}_0_log.out"):
        try:
            line = last_error_line(path.read_text(errors="replace")[-20000:])
        except OSError:
            continue
        if line:
            return line
    return ""


# --------------------------------------------------------------------------- submission

def executor(cfg: RunConfig, stage: PlannedStage, dependencies: list[str]):
    """A submitit SLURM executor with ``stage``'s resources (its composed ``launcher.*``)."""
    import submitit

    res = stage.run.launcher
    folder = Path(cfg.stage.output) / "submitit" / "%j"
    slurm = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=res.max_num_timeout)
    extra = {"kill-on-invalid-dep": "yes"}  # a failed dependency cancels the job; a rerun resubmits it
    if dependencies:
        extra["dependency"] = "afterok:" + ":".join(dependencies)
    params = dict(name=stage.job_name(), nodes=res.nodes, tasks_per_node=res.tasks_per_node,
                  cpus_per_task=res.cpus_per_task, timeout_min=res.timeout_min,
                  slurm_signal_delay_s=res.signal_delay_s, slurm_array_parallelism=res.array_parallelism,
                  slurm_additional_parameters=extra)
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    if res.mem_gb is not None:
        params["mem_gb"] = res.mem_gb
    for key in ("partition", "account", "qos"):
        if getattr(res, key):
            params[f"slurm_{key}"] = getattr(res, key)
    slurm.update_parameters(**params)
    return slurm


def submit(cfg: RunConfig, planned: list[PlannedStage], submit_fn=None, queue_fn=queued_jobs) -> StageSummary:
    """Submit every stage that is not complete as SLURM jobs chained by dependencies.

    ``submit_fn(stage, shards, dependencies) -> (job id, is_array)`` submits one stage's
    jobs (default: submitit) and ``queue_fn(job names)`` lists the jobs SLURM still holds
    (default: ``squeue``); tests pass their own to check the plan without a cluster.
    """
    pipeline_output = cfg.stage.output
    summary = StageSummary(cfg.stage.name, output=pipeline_output)
    if submit_fn is None and not slurm_available():
        raise PreflightError("stage.launcher=slurm: the SLURM tools (sbatch, squeue, sacct) are not on PATH; "
                             "run on a SLURM login node, or use stage.launcher=local")
    states = {p.name: stage_state(p, pipeline_output) for p in planned}
    ledger = read_ledger(pipeline_output)
    queue = queue_fn([p.job_name() for p in planned])
    unknown = sorted({job for job, _, _ in queue} - {e["job_id"] for e in ledger})
    if unknown:  # submitted by a run whose ledger is gone: they would be submitted twice
        raise PreflightError(f"SLURM jobs {', '.join(unknown)} of this pipeline (names pd_<stage>_<hash>) are queued "
                             f"or running but not in {Path(pipeline_output) / LEDGER_FILE}: wait for them to end "
                             f"or scancel them, then rerun; nothing submitted")
    active = {p.name: active_shards([e for e in ledger if e["stage"] == p.name], queue) for p in planned}
    todo = {p.name: [i for i in states[p.name].missing if i not in active[p.name]] for p in planned}
    preflight(planned, states, to_run={name for name, shards in todo.items() if shards})
    Path(pipeline_output).mkdir(parents=True, exist_ok=True)

    if submit_fn is None:
        def submit_fn(stage: PlannedStage, shards: list[int], dependencies: list[str]) -> tuple[str, bool]:
            slurm = executor(cfg, stage, dependencies)
            marker = str(done_marker(pipeline_output, stage)) if stage.kind == stages.SINGLE else None
            job = StageJob(stage.overrides, done_marker=marker, marker_content=marker_content(stage))
            sharded = stage.kind == stages.SHARDED
            if sharded and (stage.shards > 1 or len(shards) > 1):
                jobs = slurm.map_array(job, shards)
                return jobs[0].job_id.split("_")[0], True
            return slurm.submit(job, *([shards[0]] if sharded else [])).job_id, False

    waits: dict[str, list[str]] = {}  # stage -> SLURM ids a later stage waits for
    total = len(planned)
    lines = []
    for stage in planned:
        state = states[stage.name]
        still = active[stage.name]
        dependencies = sorted({j for name in stage.after for j in waits.get(name, [])})
        waits[stage.name] = sorted({job for job, _ in still.values()})
        if state.complete:
            lines.append(f"stage {stage.position}/{total} {stage.name}: complete, nothing submitted ({stage.output})")
            summary.parts.append(StageSummary(stage.name, output=stage.output, extra={"complete": True}))
            continue
        if still:
            lines.append(f"stage {stage.position}/{total} {stage.name}: shard(s) {ranges(sorted(still))} still "
                         f"queued or running (jobs {', '.join(waits[stage.name])})")
        shards = todo[stage.name]
        if shards:
            job_id, is_array = submit_fn(stage, shards, dependencies)
            append_ledger(pipeline_output, {"stage": stage.name, "job_id": job_id, "array": is_array,
                                            "shards": shards, "name": stage.job_name(),
                                            "folder": str(Path(pipeline_output) / "submitit"),
                                            "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")})
            waits[stage.name].append(job_id)
            what = (f"array {job_id} of {len(shards)} task(s) over shard.index {ranges(shards)} of {stage.shards}"
                    if is_array else f"job {job_id}" + (f" (shard {shards[0]} of {stage.shards})"
                                                         if stage.kind == stages.SHARDED else ""))
            lines.append(f"stage {stage.position}/{total} {stage.name}: {what}"
                         f"{', after ' + ','.join(dependencies) if dependencies else ''} -> {stage.output}")
            summary.parts.append(StageSummary(stage.name, output=stage.output,
                                              extra={"job_id": job_id, "shards": shards, "after": dependencies}))
    for line in lines:
        log.debug("[pipeline] %s", line)
        print(f"[pipeline] {line}", flush=True)
    print(f"[pipeline] job logs: {Path(pipeline_output) / 'submitit'}; where each stage stands: "
          f"python -m part_distillation stage=status {' '.join(own_overrides())}".rstrip(), flush=True)
    summary.extra["submitted"] = {p.stage: p.extra["job_id"] for p in summary.parts if "job_id" in p.extra}
    summary.output = str(pipeline_output)
    return summary.finish()
