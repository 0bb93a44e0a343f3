"""Stage summaries and progress reporting.

Every stage ends with one summary (inputs seen, records written, skipped with reasons,
wall time, throughput). Progress is a tqdm bar on an interactive console and periodic
log lines otherwise (SLURM logs), so logs stay readable at ImageNet scale.
"""
from __future__ import annotations

import collections
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
log = logging.getLogger("part_distillation")


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
    extra: dict = field(default_factory=dict)
    output: str | None = None  #: where this stage's results are
    #: a pipeline's stages, in order: their counts are reported apart, never added up
    parts: list["StageSummary"] = field(default_factory=list)

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def finish(self) -> "StageSummary":
        self.wall_s = time.monotonic() - self.started
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
                "wall_s": round(self.wall_s, 3), "per_s": round(self.throughput, 2), "output": self.output,
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


def progress(items: Iterable[T], total: int | None, desc: str, every: int = 200) -> Iterator[T]:
    """Iterate with a tqdm bar on a terminal, else a log line every ``every`` items."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, dynamic_ncols=True)
        return
    start = time.monotonic()
    for i, item in enumerate(items, 1):
        yield item
        if i % every == 0:
            rate = i / max(time.monotonic() - start, 1e-9)
            log.info("[%s] %d/%s (%.1f/s)", desc, i, total if total is not None else "?", rate)
