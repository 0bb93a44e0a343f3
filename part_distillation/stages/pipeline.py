"""Stage ``pipeline``: the stages of ``stage.stages`` as one DAG, in this process or on SLURM.

Each sub-stage is composed from this run's own command-line overrides plus
``stage=<name>``, its entries of ``stage.overrides`` and, for a sharded stage,
``shard.count=<stage.shards[name]>``; so ``experiment=demo paths.root=/tmp/x`` reaches
every stage and ``'stage.overrides=[proposal_learning:stage.max_iter=10]'`` one of them.

A stage depends on the earlier stages whose output it reads (``stage.input``, any path
setting of the stage, ``data.root``, ``model.weights`` at or under that output).

``stage.launcher=local`` runs the stages here in order. ``stage.launcher=slurm`` checks
every stage (``launch.check_job``), then submits them all at once with submitit:
arrays over ``shard.index`` for the sharded stages, one job with the stage's
``launcher.*`` resources for the others (training: several nodes and tasks), each
waiting (``afterok``) for the jobs of the stages it reads; it prints the job ids and the
outputs and exits. Each job runs :class:`launch.StageJob`, i.e. ``launch.run_job`` on the
composed config, requeued on preemption.

Rerunning resumes either way: a complete stage (every shard closed in its store; a
training run's final checkpoint; a marker for the stages without a store) is skipped, a
stage with shards done runs only the missing ones, and jobs still queued or running from
an earlier submission (``<stage.output>/submissions.json``, then ``squeue``) are not
submitted again: later stages wait for them instead.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from part_distillation import stages
from part_distillation.config import RunConfig, validate
from part_distillation.context import JobContext
from part_distillation.progress import StageSummary, record_summary

log = logging.getLogger("part_distillation")

#: Stages that write a record store, one shard file per job: sharded over ``shard.index``.
SHARDED_STAGES = frozenset({"index", "detic_labeling", "pixel_grouping", "dense_crf", "part_ranking", "evaluate"})
#: Training stages: complete when the final checkpoint (``max_iter``) is there.
TRAINING_STAGES = frozenset({"proposal_learning", "part_distillation"})

PLAN_FILE = "plan.json"
LEDGER_FILE = "submissions.json"
ERRORS_FILE = "errors.json"


def _own_overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        task = list(HydraConfig.get().overrides.task)
    except ValueError:  # composed outside a Hydra app (tests): nothing to carry over
        task = []
    return [o for o in task if not o.lstrip("+~").startswith("stage")]


def stage_overrides(entries: list[str], names: list[str]) -> dict[str, list[str]]:
    """``["<stage>:<override>", ...]`` -> overrides per stage; a stage not in ``names`` is an error."""
    out: dict[str, list[str]] = {}
    for entry in entries:
        name, sep, override = entry.partition(":")
        if not sep or not override or name not in names:
            raise ValueError(f"stage.overrides entry {entry!r}: expected '<stage>:<override>' with a stage of "
                             f"stage.stages {list(names)}")
        out.setdefault(name, []).append(override)
    return out


# --------------------------------------------------------------------------- the plan

@dataclass
class PlannedStage:
    """One stage of the pipeline, composed (shard 0's config stands for every shard)."""

    position: int  # 1-based, in stage.stages order
    name: str
    overrides: list[str]  # what `python -m part_distillation` gets for it, shard.index aside
    run: RunConfig
    shards: int
    after: list[str] = field(default_factory=list)  # earlier stages whose outputs it reads

    @property
    def kind(self) -> str:
        if self.name in SHARDED_STAGES:
            return "sharded"
        return "training" if self.name in TRAINING_STAGES else "single"

    @property
    def output(self) -> str:
        return str(self.run.stage.output)

    def overrides_for(self, shard_index: int | None) -> list[str]:
        return self.overrides + ([f"shard.index={shard_index}"] if self.kind == "sharded" else [])

    def job_name(self) -> str:
        """``pd_<stage>_<hash of its output path>``: the SLURM job name of this stage's jobs."""
        return f"pd_{self.name}_{hashlib.sha1(os.path.abspath(self.output).encode()).hexdigest()[:8]}"


def compose_stage(overrides: list[str]) -> RunConfig:
    from part_distillation.launch import compose_config

    return validate(compose_config(overrides))


def plan(base: list[str], names: list[str], entries: list[str], shards: dict[str, int]) -> list[PlannedStage]:
    """Compose every stage of ``names`` (see the module notes) and find what each reads."""
    from part_distillation.launch import _paths_read, _under_any

    per_stage = stage_overrides(list(entries), list(names))
    unknown = sorted(set(shards) - set(names))
    if unknown:
        raise ValueError(f"stage.shards names {unknown}, not stages of stage.stages {list(names)}")
    planned: list[PlannedStage] = []
    for position, name in enumerate(names, 1):
        if name == "pipeline":
            raise ValueError("stage.stages may not contain 'pipeline' itself")
        stages.get(name)  # an unknown stage fails here, before anything runs
        count = int(shards.get(name, 1))
        if count < 1:
            raise ValueError(f"stage.shards.{name}={count}: expected >= 1")
        if count > 1 and name not in SHARDED_STAGES:
            raise ValueError(f"stage.shards.{name}={count}: stage {name} is not sharded "
                             f"(sharded: {', '.join(sorted(SHARDED_STAGES))})")
        overrides = list(base) + [f"stage={name}"] + per_stage.get(name, [])
        if name in SHARDED_STAGES and name in shards:
            overrides.append(f"shard.count={count}")
        run = compose_stage(overrides)
        count = run.shard.count if name in SHARDED_STAGES else 1
        reads = _paths_read(run)
        after = [p.name for p in planned if any(_under_any(r, [p.output]) for r in reads)]
        planned.append(PlannedStage(position, name, overrides, run, count, after))
    return planned


def save_plan(folder: str | os.PathLike, base: list[str], names: list[str], entries: list[str],
              shards: dict[str, int]) -> None:
    """What :func:`plan` needs, so that ``stage=status`` finds the stages this pipeline ran."""
    from part_distillation.store import atomic_write_json

    Path(folder).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(folder) / PLAN_FILE, {"base": list(base), "stages": list(names),
                                                 "overrides": list(entries), "shards": dict(shards)})


def load_plan(folder: str | os.PathLike) -> dict | None:
    try:
        return json.loads((Path(folder) / PLAN_FILE).read_text())
    except FileNotFoundError:
        return None


# --------------------------------------------------------------------------- where a stage stands

@dataclass
class StageState:
    """What a stage's output says about it (no scheduler involved)."""

    done: set[int] = field(default_factory=set)  # shards closed without error
    failed: dict[int, str] = field(default_factory=dict)  # shard -> its summary's error status
    started: set[int] = field(default_factory=set)  # a shard file without summary (running, or killed)
    running: set[int] = field(default_factory=set)  # a writer holds the shard file now
    records: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    bad: dict[str, int] = field(default_factory=dict)
    detail: str = ""
    shards: int = 1
    needs_rerun: bool = False  # every shard done but the stage's last step is missing (evaluate's merge)
    problem: str = ""  # the output cannot be resumed as planned (another shard count)

    @property
    def missing(self) -> list[int]:
        missing = sorted(set(range(self.shards)) - self.done)
        return missing or ([0] if self.needs_rerun else [])

    @property
    def complete(self) -> bool:
        return not self.missing and not self.problem


def done_marker(pipeline_output: str, stage: PlannedStage) -> Path:
    return Path(pipeline_output) / "done" / f"{stage.name}.json"


def marker_content(stage: PlannedStage) -> dict:
    from part_distillation.store import config_fingerprint

    return {"stage": stage.name, "output": stage.output,
            "fingerprint": config_fingerprint(dataclasses.asdict(stage.run))}


def stage_state(stage: PlannedStage, pipeline_output: str) -> StageState:
    """Where ``stage`` stands according to its output (see the module notes)."""
    state = StageState(shards=stage.shards)
    if stage.kind != "single":
        changed = _config_change(stage)
        if changed is not None:
            if not stage.run.overwrite_config:
                state.problem = changed  # complete or not, its output is not this configuration's
                return state
            return state  # overwrite_config: the stage starts afresh (the store moves the old output aside)
    if stage.kind == "training":
        from part_distillation.engine.checkpoint import CHECKPOINT_RE, checkpoint_path

        max_iter = stage.run.stage.max_iter
        folder = Path(stage.output) / "checkpoints"
        iterations = [int(m.group(1)) for p in (folder.glob("model_*.pth") if folder.is_dir() else [])
                      if (m := CHECKPOINT_RE.match(p.name))]
        state.detail = f"iteration {max(iterations, default=0)}/{max_iter}"
        if checkpoint_path(stage.output, max_iter).is_file():
            state.done.add(0)
        elif iterations:
            state.started.add(0)
        return state
    if stage.kind == "single":
        marker = done_marker(pipeline_output, stage)
        try:
            if json.loads(marker.read_text()).get("fingerprint") == marker_content(stage)["fingerprint"]:
                state.done.add(0)
        except (FileNotFoundError, ValueError):
            pass
        return state
    _read_shards(stage, state)
    if stage.name == "evaluate" and not state.missing and not (Path(stage.output) / "metrics.json").is_file():
        state.needs_rerun = True  # the merge into metrics.json did not happen: one shard job does it
    return state


def _config_change(stage: PlannedStage) -> str | None:
    """Why the stage's existing output is not this configuration's (``common.output_conflict``
    ignoring ``overwrite_config``), or None."""
    from part_distillation.stages.common import output_conflict

    if not stage.run.overwrite_config:
        return output_conflict(stage.run)
    return output_conflict(dataclasses.replace(stage.run, overwrite_config=False))


def _read_shards(stage: PlannedStage, state: StageState) -> None:
    """Per shard file: its summary (written at close: status, counts) and whether a writer holds it."""
    from part_distillation.store import manifest_path, read_manifest, shard_name
    from part_distillation.store.errors import StoreError

    if not manifest_path(stage.output).is_file():
        return
    try:
        made_with = int(read_manifest(stage.output).get("num_shards", stage.shards))
    except (StoreError, ValueError) as err:
        state.problem = str(err)
        return
    if made_with != stage.shards:
        state.problem = (f"{stage.output} was made with shard.count={made_with}, the pipeline asks for "
                         f"{stage.shards} (stage.shards.{stage.name})")
        return
    folder = Path(stage.output) / "shards"
    for index in range(stage.shards):
        files = sorted(folder.glob(f"{shard_name(index, stage.shards)}*.rec"))
        if not files:
            continue
        statuses = []
        for path in files:
            try:
                summary = json.loads(path.with_name(path.name[:-len(".rec")] + ".summary.json").read_text())
            except (FileNotFoundError, ValueError):
                statuses.append(None)
                continue
            statuses.append(summary.get("status", "closed"))
            state.records += int(summary.get("records", 0))
            for what, counts in (("skipped", state.skipped), ("bad", state.bad)):
                for reason, n in summary.get(what, {}).items():
                    counts[reason] = counts.get(reason, 0) + int(n)
        if _any_locked(files):  # a writer is at it now (a rerun reopening a closed shard too)
            state.started.add(index)
            state.running.add(index)
        elif any(s is None for s in statuses):  # opened and never closed: killed, or a job that died
            state.started.add(index)
        elif all(s == "closed" for s in statuses):
            state.done.add(index)
        else:
            state.failed[index] = next(s for s in statuses if s != "closed")


def _any_locked(files: list[Path]) -> bool:
    from part_distillation.store.reader import _writer_active

    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            if _writer_active(fd):
                return True
        except OSError:  # not a shard file (a folder in its place): no writer
            continue
        finally:
            os.close(fd)
    return False


# --------------------------------------------------------------------------- SLURM: ledger and queue

def read_ledger(pipeline_output: str) -> list[dict]:
    """Every submission of this pipeline: ``{"stage", "job_id", "array", "shards", "name", "folder"}``."""
    try:
        return json.loads((Path(pipeline_output) / LEDGER_FILE).read_text())["jobs"]
    except (FileNotFoundError, ValueError, KeyError):
        return []


def _append_ledger(pipeline_output: str, entry: dict) -> None:
    from part_distillation.store import atomic_write_json

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
        from part_distillation.launch import PreflightError

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


# --------------------------------------------------------------------------- running

def run(cfg: RunConfig, context: JobContext) -> StageSummary:
    st = cfg.stage
    base = _own_overrides()
    planned = plan(base, list(st.stages), list(st.overrides), dict(st.shards))
    if context.is_main:
        save_plan(st.output, base, list(st.stages), list(st.overrides), dict(st.shards))
    if st.launcher == "slurm":
        return submit(cfg, planned)
    return run_local(cfg, planned, context)


def _stage_log(stage: PlannedStage, total: int, message: str) -> None:
    log.info("[pipeline] stage %d/%d %s: %s", stage.position, total, stage.name, message)


def _pending_outputs(planned: list[PlannedStage], states: dict[str, StageState], upto: int) -> tuple[str, ...]:
    """Outputs of the stages before position ``upto`` that are still to be written."""
    return tuple(p.output for p in planned[:upto - 1] if not states[p.name].complete)


def preflight(planned: list[PlannedStage], states: dict[str, StageState], to_run: set[str] | None = None) -> None:
    """``launch.check_job`` for every stage that will run (``to_run``; default: every stage not
    complete), before any of them runs; the outputs of earlier stages not complete yet are
    not required to exist."""
    from part_distillation.launch import PreflightError, check_job

    for stage in planned:
        state = states[stage.name]
        if state.problem:
            raise PreflightError(state.problem)
        if state.complete or (to_run is not None and stage.name not in to_run):
            continue
        check_job(stage.run, pending=_pending_outputs(planned, states, stage.position))


def run_local(cfg: RunConfig, planned: list[PlannedStage], context: JobContext) -> StageSummary:
    """Every stage here, in order; complete stages and shards are skipped."""
    summary = StageSummary(cfg.stage.name, output=cfg.stage.output)
    states = {p.name: stage_state(p, cfg.stage.output) for p in planned}
    preflight(planned, states)
    total = len(planned)
    for stage in planned:
        state = stage_state(stage, cfg.stage.output)  # an earlier stage may have changed what is there
        if state.complete:
            _stage_log(stage, total, f"complete, skipped ({stage.output})")
            summary.parts.append(StageSummary(stage.name, output=stage.output, extra={"complete": True}).finish())
            continue
        started = time.monotonic()
        shards = state.missing
        _stage_log(stage, total, "started" + (f" (shards {_ranges(shards)} of {stage.shards})"
                                              if stage.shards > 1 else ""))
        try:
            for index in shards:
                sub_cfg = compose_stage(stage.overrides_for(index))
                result = stages.get(stage.name)(sub_cfg, context).finish()
                result.log()
                record_summary(sub_cfg, result, context)  # saved next to the stage's output, as run_job does
                summary.parts.append(result)  # reported per stage: counts of different things never add up
        except BaseException as exc:
            if context.is_main:
                _record_error(cfg.stage.output, stage.name, f"{type(exc).__name__}: {exc}")
            _stage_log(stage, total, f"failed after {time.monotonic() - started:.1f} s")
            raise
        if context.is_main:
            if stage.kind == "single":
                _write_marker(cfg.stage.output, stage)
            _record_error(cfg.stage.output, stage.name, None)
        _stage_log(stage, total, f"done in {time.monotonic() - started:.1f} s")
    summary.output = summary.parts[-1].output if summary.parts else None
    return summary.finish()


def _write_marker(pipeline_output: str, stage: PlannedStage) -> None:
    from part_distillation.store import atomic_write_json

    marker = done_marker(pipeline_output, stage)
    marker.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, marker_content(stage))


def _record_error(pipeline_output: str, name: str, line: str | None) -> None:
    """The last error of a local run per stage (``stage=status`` shows it); None clears it."""
    from part_distillation.store import atomic_write_json

    path = Path(pipeline_output) / ERRORS_FILE
    try:
        errors = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        errors = {}
    if line is None and name not in errors:
        return
    if line is None:
        errors.pop(name, None)
    else:
        errors[name] = " ".join(line.split())[:500]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, errors)


def read_errors(pipeline_output: str) -> dict[str, str]:
    try:
        return json.loads((Path(pipeline_output) / ERRORS_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    out, start = [], None
    for i, value in enumerate(indices):
        if start is None:
            start = value
        if i + 1 == len(indices) or indices[i + 1] != value + 1:
            out.append(f"{start}" if start == value else f"{start}-{value}")
            start = None
    return ",".join(out)


def _executor(cfg: RunConfig, stage: PlannedStage, dependencies: list[str]):
    """A submitit SLURM executor with ``stage``'s resources (its composed ``launcher.*``)."""
    import submitit

    res = stage.run.launcher
    folder = Path(cfg.stage.output) / "submitit" / "%j"
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=res.max_num_timeout)
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
    executor.update_parameters(**params)
    return executor


def submit(cfg: RunConfig, planned: list[PlannedStage], submit_fn=None, queue_fn=queued_jobs) -> StageSummary:
    """Submit every stage that is not complete as SLURM jobs chained by dependencies.

    ``submit_fn(stage, shards, dependencies) -> (job id, is_array)`` submits one stage's
    jobs (default: submitit) and ``queue_fn(job names)`` lists the jobs SLURM still holds
    (default: ``squeue``); tests pass their own to check the plan without a cluster.
    """
    from part_distillation.launch import PreflightError, StageJob

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
            executor = _executor(cfg, stage, dependencies)
            marker = str(done_marker(pipeline_output, stage)) if stage.kind == "single" else None
            job = StageJob(stage.overrides, done_marker=marker, marker_content=marker_content(stage))
            if stage.kind == "sharded" and (stage.shards > 1 or len(shards) > 1):
                jobs = executor.map_array(job, shards)
                return jobs[0].job_id.split("_")[0], True
            return executor.submit(job, *([shards[0]] if stage.kind == "sharded" else [])).job_id, False

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
            lines.append(f"stage {stage.position}/{total} {stage.name}: shard(s) {_ranges(sorted(still))} still "
                         f"queued or running (jobs {', '.join(waits[stage.name])})")
        shards = todo[stage.name]
        if shards:
            job_id, is_array = submit_fn(stage, shards, dependencies)
            _append_ledger(pipeline_output, {"stage": stage.name, "job_id": job_id, "array": is_array,
                                             "shards": shards, "name": stage.job_name(),
                                             "folder": str(Path(pipeline_output) / "submitit"),
                                             "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")})
            waits[stage.name].append(job_id)
            what = (f"array {job_id} of {len(shards)} task(s) over shard.index {_ranges(shards)} of {stage.shards}"
                    if is_array else f"job {job_id}" + (f" (shard {shards[0]} of {stage.shards})"
                                                         if stage.kind == "sharded" else ""))
            lines.append(f"stage {stage.position}/{total} {stage.name}: {what}"
                         f"{', after ' + ','.join(dependencies) if dependencies else ''} -> {stage.output}")
            summary.parts.append(StageSummary(stage.name, output=stage.output,
                                              extra={"job_id": job_id, "shards": shards, "after": dependencies}))
    for line in lines:
        log.debug("[pipeline] %s", line)
        print(f"[pipeline] {line}", flush=True)
    print(f"[pipeline] job logs: {Path(pipeline_output) / 'submitit'}; where each stage stands: "
          f"python -m part_distillation stage=status {' '.join(_own_overrides())}".rstrip(), flush=True)
    summary.extra["submitted"] = {p.stage: p.extra["job_id"] for p in summary.parts if "job_id" in p.extra}
    summary.output = str(pipeline_output)
    return summary.finish()


