"""The stages of a pipeline as one DAG: composed, ordered, and where each stands.

Each stage is composed from the pipeline run's own command-line overrides plus
``stage=<name>``, its entries of ``stage.overrides`` and, for a sharded stage,
``shard.count=<stage.shards[name]>``; so ``experiment=demo paths.root=/tmp/x`` reaches
every stage and ``'stage.overrides=[proposal_learning:stage.max_iter=10]'`` one of them.
A stage depends on the earlier stages whose output it reads (``stage.input``, any path
setting of the stage, ``data.root``, ``model.weights`` at or under that output).

A stage may run more than once in a pipeline as ``<stage>@<tag>`` (a step), each with its
own ``stage.overrides`` entries (``"pixel_grouping@heldout:data.split=heldout"``): the demo
runs stages 1-3 on its training and on its held-out images so.

Where a stage stands is read from its output alone (no scheduler): its kind
(``StageSpec.kind``) says how. A sharded stage is complete when every shard file is
closed (and its ``merged_file``, if it has one, is there); a training stage when the
final checkpoint (``stage.max_iter``) is there; any other stage when its done marker
(the config's fingerprint, under the pipeline's folder) is there.

:func:`run_local` runs the stages here, in order, each shard through the same
``launch.local.run_in_context`` as a job of its own; ``launch.slurm.submit`` submits
them instead. Either way a complete stage is skipped and a stage with some shards done
runs only the missing ones.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from part_distillation import stages
from part_distillation.config import RunConfig, validate
from part_distillation.context import JobContext
from part_distillation.launch.local import JobFailed, compose_config, run_in_context
from part_distillation.launch.preflight import PreflightError, check_job, paths_read, under_any
from part_distillation.store import atomic_write_json
from part_distillation.summaries import StageSummary

log = logging.getLogger("part_distillation")

PLAN_FILE = "plan.json"
ERRORS_FILE = "errors.json"


def own_overrides() -> list[str]:
    """This run's command-line overrides that are not about its own stage (they reach every stage)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        task = list(HydraConfig.get().overrides.task)
    except ValueError:  # composed outside a Hydra app (tests): nothing to carry over
        task = []
    return [o for o in task if not o.lstrip("+~").startswith("stage")]


def stage_overrides(entries: list[str], names: list[str]) -> dict[str, list[str]]:
    """``["<stage>:<override>", ...]`` -> overrides per step of ``names``. An entry for a step
    that is not in ``names`` but runs a registered stage is left out (an experiment's entries
    for the steps a shorter ``stage.stages`` drops); one that names no stage is an error."""
    known = set(stages.names())
    out: dict[str, list[str]] = {}
    for entry in entries:
        name, sep, override = entry.partition(":")
        if not sep or not override or stages.stage_of(name) not in known:
            raise ValueError(f"stage.overrides entry {entry!r}: expected '<stage>:<override>' (or "
                             f"'<stage>@<tag>:<override>') with a stage of stage.stages {list(names)}")
        if name in names:
            out.setdefault(name, []).append(override)
    return out


# --------------------------------------------------------------------------- the plan

@dataclass
class PlannedStage:
    """One stage of the pipeline, composed (shard 0's config stands for every shard)."""

    position: int  # 1-based, in stage.stages order
    name: str  # the step: the stage's name, or <stage>@<tag> for a stage that runs more than once
    overrides: list[str]  # what `python -m part_distillation` gets for it, shard.index aside
    run: RunConfig
    shards: int
    after: list[str] = field(default_factory=list)  # earlier stages whose outputs it reads

    @property
    def stage(self) -> str:
        return stages.stage_of(self.name)

    @property
    def spec(self) -> stages.StageSpec:
        return stages.spec(self.stage)

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def output(self) -> str:
        return self.spec.output(self.run)

    def overrides_for(self, shard_index: int | None) -> list[str]:
        return self.overrides + ([f"shard.index={shard_index}"] if self.kind == stages.SHARDED else [])

    def job_name(self) -> str:
        """``pd_<stage>_<hash of its output path>``: the SLURM job name of this stage's jobs."""
        return f"pd_{self.stage}_{hashlib.sha1(os.path.abspath(self.output).encode()).hexdigest()[:8]}"


def compose_stage(overrides: list[str]) -> RunConfig:
    """The validated config ``python -m part_distillation <overrides>`` runs."""
    return validate(compose_config(overrides))


def plan(base: list[str], names: list[str], entries: list[str], shards: dict[str, int]) -> list[PlannedStage]:
    """Compose every stage of ``names`` (see the module notes) and find what each reads."""
    per_stage = stage_overrides(list(entries), list(names))
    unknown = sorted(set(shards) - set(names))
    if unknown:
        raise ValueError(f"stage.shards names {unknown}, not stages of stage.stages {list(names)}")
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    if repeated:
        raise ValueError(f"stage.stages names {repeated} more than once: a stage that runs again needs a step "
                         f"name of its own, <stage>@<tag> (e.g. {repeated[0]}@heldout)")
    planned: list[PlannedStage] = []
    for position, name in enumerate(names, 1):
        spec = stages.spec(stages.stage_of(name))  # an unknown stage fails here, before anything runs
        if spec.kind == stages.DRIVER:
            raise ValueError(f"stage.stages may not contain '{name}': it runs stages itself")
        count = int(shards.get(name, 1))
        if count < 1:
            raise ValueError(f"stage.shards.{name}={count}: expected >= 1")
        sharded = spec.kind == stages.SHARDED
        if count > 1 and not sharded:
            raise ValueError(f"stage.shards.{name}={count}: stage {stages.stage_of(name)} is not sharded "
                             f"(sharded: {', '.join(n for n in stages.names() if _is_sharded(n))})")
        overrides = list(base) + [f"stage={stages.stage_of(name)}"] + per_stage.get(name, [])
        if sharded and name in shards:
            overrides.append(f"shard.count={count}")
        run = compose_stage(overrides)
        count = run.shard.count if sharded else 1
        reads = paths_read(run)
        after = [p.name for p in planned if any(under_any(r, [p.output]) for r in reads)]
        planned.append(PlannedStage(position, name, overrides, run, count, after))
    return planned


def _is_sharded(name: str) -> bool:
    return stages.spec(stages.stage_of(name)).kind == stages.SHARDED


def save_plan(folder: str | os.PathLike, base: list[str], names: list[str], entries: list[str],
              shards: dict[str, int]) -> None:
    """What :func:`plan` needs, so that ``stage=status`` finds the stages this pipeline ran."""
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
    needs_rerun: bool = False  # every shard done but the stage's merged file is missing (evaluate's metrics)
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


def write_marker(pipeline_output: str, stage: PlannedStage) -> None:
    """A stage without a store or checkpoints is done: its marker, with this config's fingerprint."""
    marker = done_marker(pipeline_output, stage)
    marker.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, marker_content(stage))


def stage_state(stage: PlannedStage, pipeline_output: str) -> StageState:
    """Where ``stage`` stands according to its output (see the module notes)."""
    state = StageState(shards=stage.shards)
    if stage.kind != stages.SINGLE:
        changed = _config_change(stage)
        if changed is not None:
            if not stage.run.overwrite_config:
                state.problem = changed  # complete or not, its output is not this configuration's
                return state
            return state  # overwrite_config: the stage starts afresh (the store moves the old output aside)
    if stage.kind == stages.TRAINING:
        _read_checkpoints(stage, state)
        return state
    if stage.kind == stages.SINGLE:
        marker = done_marker(pipeline_output, stage)
        try:
            if json.loads(marker.read_text()).get("fingerprint") == marker_content(stage)["fingerprint"]:
                state.done.add(0)
        except (FileNotFoundError, ValueError):
            pass
        return state
    _read_shards(stage, state)
    merged = stage.spec.merged_file
    if merged and not state.missing and not (Path(stage.output) / merged).is_file():
        state.needs_rerun = True  # the merge did not happen: one shard job does it
    return state


def _read_checkpoints(stage: PlannedStage, state: StageState) -> None:
    """A training run: done at its final checkpoint, started at any checkpoint."""
    from part_distillation.engine.checkpoint import checkpoint_path, list_checkpoints

    max_iter = stage.run.stage.max_iter
    iterations = [iteration for iteration, _ in list_checkpoints(stage.output)]
    state.detail = f"iteration {max(iterations, default=0)}/{max_iter}"
    if checkpoint_path(stage.output, max_iter).is_file():
        state.done.add(0)
    elif iterations:
        state.started.add(0)


def _config_change(stage: PlannedStage) -> str | None:
    """Why the stage's existing output is not this configuration's (``shard_io.output_conflict``
    ignoring ``overwrite_config``), or None."""
    from part_distillation.stages.shard_io import output_conflict

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
    from part_distillation.store.reader import writer_active

    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            if writer_active(fd):
                return True
        except OSError:  # not a shard file (a folder in its place): no writer
            continue
        finally:
            os.close(fd)
    return False


def preflight(planned: list[PlannedStage], states: dict[str, StageState], to_run: set[str] | None = None) -> None:
    """``check_job`` for every stage that will run (``to_run``; default: every stage not
    complete), before any of them runs; the outputs of earlier stages not complete yet are
    not required to exist."""
    for stage in planned:
        state = states[stage.name]
        if state.problem:
            raise PreflightError(state.problem)
        if state.complete or (to_run is not None and stage.name not in to_run):
            continue
        check_job(stage.run, pending=_pending_outputs(planned, states, stage.position))


def _pending_outputs(planned: list[PlannedStage], states: dict[str, StageState], upto: int) -> tuple[str, ...]:
    """Outputs of the stages before position ``upto`` that are still to be written."""
    return tuple(p.output for p in planned[:upto - 1] if not states[p.name].complete)


# --------------------------------------------------------------------------- running here

def _stage_log(stage: PlannedStage, total: int, message: str) -> None:
    log.info("[pipeline] stage %d/%d %s: %s", stage.position, total, stage.name, message)


def run_local(cfg: RunConfig, planned: list[PlannedStage], context: JobContext) -> StageSummary:
    """Every stage here, in order, each shard as ``launch.local.run_in_context`` runs a job;
    complete stages and shards are skipped."""
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
        _stage_log(stage, total, "started" + (f" (shards {ranges(shards)} of {stage.shards})"
                                              if stage.shards > 1 else ""))
        try:
            for index in shards:
                result = run_in_context(compose_stage(stage.overrides_for(index)), context)
                result.stage = stage.name  # the step (dense_crf@heldout), once its job has saved its summary
                summary.parts.append(result)  # reported per stage: counts of different things never add up
        except BaseException as exc:
            if context.is_main:
                line = str(exc) if isinstance(exc, JobFailed) else f"{type(exc).__name__}: {exc}"
                record_error(cfg.stage.output, stage.name, line)
            _stage_log(stage, total, f"failed after {time.monotonic() - started:.1f} s")
            raise
        if context.is_main:
            if stage.kind == stages.SINGLE:
                write_marker(cfg.stage.output, stage)
            record_error(cfg.stage.output, stage.name, None)
        _stage_log(stage, total, f"done in {time.monotonic() - started:.1f} s")
    summary.output = summary.parts[-1].output if summary.parts else None
    return summary.finish()


def record_error(pipeline_output: str, name: str, line: str | None) -> None:
    """The last error of a local run per stage (``stage=status`` shows it); None clears it."""
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


def ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    out, start = [], None
    for i, value in enumerate(indices):
        if start is None:
            start = value
        if i + 1 == len(indices) or indices[i + 1] != value + 1:
            out.append(f"{start}" if start == value else f"{start}-{value}")
            start = None
    return ",".join(out)
