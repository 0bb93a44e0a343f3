"""Where a process stands in its job; handed to every stage's ``run``.

Kept apart from ``launch`` (which imports the stages) so that stages can import it
without a cycle. ``part_distillation.launch.JobContext`` re-exports it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class JobContext:
    """Rank and world size of this process, and the scheduler's job id when there is one."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    job_id: Optional[str] = None
    on_slurm: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0
