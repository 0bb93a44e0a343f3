"""Stage summaries: what each stage job did, logged, returned and saved.

Every stage ends with one summary (inputs seen, records written, skipped with reasons,
wall time, throughput). Each job's summary is also saved as JSON next to its output
(:func:`record_summary`), where the report and a status command read it back. (Progress
while a stage runs: ``progress.py``.)
"""
from __future__ import annotations

import collections
import datetime
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("part_distillation")


def _cpu_seconds() -> float:
    """User + system CPU time of this process and of its children that have ended."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass
class StageSummary:
    """Counts of one stage job; ``as_dict()`` is what the job returns and logs."""

    stage: str
    seen: int = 0
    written: int = 0
    already_done: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)
    started: float = field(default_factory=time.monotonic)
    wall_s: float = 0.0
    #: CPU seconds of this process (all its threads) and of its finished child processes
    #: (e.g. CRF workers) during the stage: a time a busy shared machine inflates less than the wall time
    cpu_started: float = field(default_factory=lambda: _cpu_seconds())
    cpu_s: float = 0.0
    extra: dict = field(default_factory=dict)
    output: str | None = None  #: where this stage's results are
    #: a pipeline's stages, in order: their counts are reported apart, never added up
    parts: list["StageSummary"] = field(default_factory=list)

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def finish(self) -> "StageSummary":
        self.wall_s = time.monotonic() - self.started
        self.cpu_s = _cpu_seconds() - self.cpu_started
        return self

    @property
    def throughput(self) -> float:
        return self.seen / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict:
        if self.parts:
            return {"stage": self.stage, "wall_s": round(self.wall_s, 3), "output": self.output,
                    "stages": {part.stage: part.as_dict() for part in self.parts}, **self.extra}
        return {"stage": self.stage, "seen": self.seen, "written": self.written,
                "already_done": self.already_done, "skipped": dict(self.skipped),
                "wall_s": round(self.wall_s, 3), "cpu_s": round(self.cpu_s, 3), "per_s": round(self.throughput, 2),
                "output": self.output,
                **self.extra}

    def log(self) -> None:
        if self.parts:
            outputs = ", ".join(f"{part.stage}: {part.output}" for part in self.parts)
            log.info("[%s] done: %d stages in %.1f s; outputs: %s", self.stage, len(self.parts), self.wall_s,
                     outputs)
            return
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        log.info("[%s] done: %d inputs seen, %d records written, %d already done, skipped: %s; "
                 "%.1f s wall, %.1f inputs/s%s", self.stage, self.seen, self.written,
                 self.already_done, skipped, self.wall_s, self.throughput,
                 f"; output: {self.output}" if self.output else "")


#: Folder of a stage output holding the stage's persisted summaries, one JSON per job.
SUMMARY_FOLDER = "summaries"
#: ... when the output is an image tree (``synthetic_data``, ``sample_photos``): a hidden folder,
#: which the image-tree lister skips, so it never becomes a class folder.
HIDDEN_SUMMARY_FOLDER = ".summaries"


def _is_within(path: str | os.PathLike, folder: str | os.PathLike | None) -> bool:
    if not folder:
        return False
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def summary_path(cfg, rank: int = 0, world_size: int = 1) -> Path:
    """Where the job of ``cfg`` (a ``RunConfig``) keeps its summary:
    ``<stage.output>/summaries/<stage>-shard<index>-of-<count>.json`` (``.rank<r>`` added for
    each process of a multi-process job; ``.summaries`` when the output is the image tree)."""
    output = Path(cfg.stage.output)
    folder = HIDDEN_SUMMARY_FOLDER if _is_within(output, getattr(cfg.data, "root", None)) else SUMMARY_FOLDER
    name = f"{cfg.stage.name}-shard{cfg.shard.index}-of-{cfg.shard.count}"
    if world_size > 1:
        name += f".rank{rank}"
    return output / folder / f"{name}.json"


def record_summary(cfg, summary: StageSummary, context=None) -> Path | None:
    """Persist one job's summary as JSON (atomically: readers see the old file or the new
    one) next to its output, so a report or a status command can read every stage's counts,
    skip reasons and time after the fact, from any process or SLURM job. A rerun replaces
    the file; shards (and ranks) have a file each. Returns the path, or None when it could
    not be written (logged; the stage's own output is complete either way).
    """
    from part_distillation.store import atomic_write_json

    rank = getattr(context, "rank", 0) if context is not None else 0
    world_size = getattr(context, "world_size", 1) if context is not None else 1
    path = summary_path(cfg, rank, world_size)
    job = {"shard_index": cfg.shard.index, "shard_count": cfg.shard.count, "rank": rank,
           "world_size": world_size, "data": getattr(cfg.data, "name", None), "experiment": cfg.experiment,
           "job_id": getattr(context, "job_id", None) if context is not None else None,
           "host": socket.gethostname(),
           "finished_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {**summary.as_dict(), "job": job})
    except OSError as err:
        log.warning("[%s] summary not saved to %s: %s", summary.stage, path, err)
        return None
    return path


def read_summaries(output: str | os.PathLike, stage: str | None = None) -> list[dict]:
    """The persisted summaries of one stage output (every shard and rank), in shard order;
    ``stage`` keeps only that stage's. A file that cannot be read is left out (logged)."""
    found = []
    for folder in (SUMMARY_FOLDER, HIDDEN_SUMMARY_FOLDER):
        for path in sorted((Path(output) / folder).glob("*.json")):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                log.warning("summary %s cannot be read: %s", path, err)
                continue
            if isinstance(data, dict) and (stage is None or data.get("stage") == stage):
                found.append(data)
    job = lambda d: (d.get("job") or {})  # noqa: E731
    return sorted(found, key=lambda d: (job(d).get("shard_index", 0), job(d).get("rank", 0)))
