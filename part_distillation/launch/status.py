"""Where each stage of a pipeline stands, as rows of a table (``stage=status`` prints it).

Per stage: shards done / running / failed / pending, records written (closed shards),
bad inputs (skip markers and refused records, by reason) and the last error line. It
combines the stores (``dag.stage_state``: what is done), the pipeline's own files under
its ``stage.output`` (the plan of its last run, the SLURM submission ledger, local errors)
and, when SLURM is there, ``squeue`` and ``sacct`` for the jobs of the ledger (what runs,
what failed); the error line of a failed SLURM job is the last error line of its log.
Works without SLURM (local runs) and before the pipeline ever ran (every stage pending).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from part_distillation.config import RunConfig
from part_distillation.launch import slurm
from part_distillation.launch.dag import (PlannedStage, compose_stage, load_plan, own_overrides, plan, read_errors,
                                          stage_state)


@dataclass
class StageStatus:
    """One row of the table."""

    position: int
    name: str
    shards: int
    done: list[int] = field(default_factory=list)
    running: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    records: int = 0
    bad_inputs: dict[str, int] = field(default_factory=dict)
    error: str = ""
    detail: str = ""
    output: str = ""

    @property
    def complete(self) -> bool:
        return len(self.done) == self.shards and not self.failed and not self.detail.startswith("every shard")

    def as_dict(self) -> dict:
        return {"stage": self.name, "shards": self.shards, "done": len(self.done), "running": len(self.running),
                "failed": len(self.failed), "pending": len(self.pending), "records": self.records,
                "bad_inputs": sum(self.bad_inputs.values()), "bad_by_reason": self.bad_inputs,
                "error": self.error, "detail": self.detail, "output": self.output}


def stage_status(stage: PlannedStage, pipeline_output: str, ledger: list[dict],
                 queue: list[tuple[str, str, str]], accounting: dict[int, tuple[str, str, bool]],
                 local_errors: dict[str, str]) -> StageStatus:
    """Combine the store (what is done), the queue (what runs) and the accounting (what failed)."""
    state = stage_state(stage, pipeline_output)
    entries = [e for e in ledger if e["stage"] == stage.name]
    active = slurm.active_shards(entries, queue)
    row = StageStatus(stage.position, stage.name, stage.shards, records=state.records, detail=state.detail,
                      output=stage.output)
    row.bad_inputs = {**state.skipped}
    for reason, n in state.bad.items():
        row.bad_inputs[reason] = row.bad_inputs.get(reason, 0) + n
    by_job = {e["job_id"]: e for e in entries}
    errors = []
    for index in range(stage.shards):
        if index in state.done:
            row.done.append(index)
        elif index in state.running or (index in active and active[index][1] in ("RUNNING", "COMPLETING")):
            row.running.append(index)
        elif index in active:
            row.pending.append(index)  # queued
        elif index in state.failed:
            row.failed.append(index)
            errors.append(f"shard {index}: {state.failed[index]}")
        elif stage.name in local_errors:  # a local run of the stage stopped on an error
            row.failed.append(index)
        elif index in accounting and accounting[index][1] in slurm.FAILED_STATES and accounting[index][2]:
            row.failed.append(index)
            job_id, job_state, _ = accounting[index]
            entry = by_job.get(job_id.split("_")[0])
            line = slurm.log_error(entry, job_id) if entry else ""
            errors.append(f"job {job_id} {job_state}" + (f": {line}" if line else ""))
        else:
            row.pending.append(index)
    if state.needs_rerun:
        row.detail = f"every shard done, {stage.spec.merged_file} not written yet: rerun the pipeline"
    if state.problem:
        errors.append(state.problem)
    if stage.name in local_errors and not row.complete:
        errors.append(local_errors[stage.name])
    row.error = errors[-1] if errors else ""
    return row


def collect(cfg: RunConfig, base: list[str] | None = None) -> list[StageStatus]:
    """The status of every stage of the pipeline whose folder is ``cfg.stage.output``: the stages
    of its last run (its saved plan), else of ``stage=pipeline`` with ``base`` (default: this
    run's own overrides)."""
    pipeline_output = cfg.stage.output
    saved = load_plan(pipeline_output)
    if saved is None:
        base = own_overrides() if base is None else list(base)
        pipeline_cfg = compose_stage(base + ["stage=pipeline"])
        saved = {"base": base, "stages": list(pipeline_cfg.stage.stages),
                 "overrides": list(pipeline_cfg.stage.overrides), "shards": dict(pipeline_cfg.stage.shards)}
    planned = plan(saved["base"], saved["stages"], saved["overrides"], saved["shards"])
    ledger = slurm.read_ledger(pipeline_output)
    on_slurm = bool(ledger) and slurm.slurm_available()
    queue = slurm.queued_jobs([p.job_name() for p in planned]) if on_slurm else []
    local_errors = read_errors(pipeline_output)
    rows = []
    for stage in planned:
        entries = [e for e in ledger if e["stage"] == stage.name]
        stage_accounting = slurm.sacct_states(entries) if on_slurm else {}
        rows.append(stage_status(stage, pipeline_output, ledger, queue, stage_accounting, local_errors))
    return rows


def format_table(rows: list[StageStatus]) -> str:
    """The rows as a plain-text table, the last error line last (it may be long)."""
    header = ["#", "stage", "done", "running", "failed", "pending", "records", "bad inputs", "last error"]
    table = [header]
    for r in rows:
        bad = sum(r.bad_inputs.values())
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(r.bad_inputs.items(), key=lambda kv: -kv[1])[:3])
        table.append([str(r.position), r.name, f"{len(r.done)}/{r.shards}", str(len(r.running)), str(len(r.failed)),
                      str(len(r.pending)), str(r.records) + (f" ({r.detail})" if r.detail else ""),
                      str(bad) + (f" ({reasons})" if reasons else ""), r.error[:400]])
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    lines = []
    for row in table:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    return "\n".join(line.rstrip() for line in lines)
