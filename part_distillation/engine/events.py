"""The trainer's event store: where the loop and the hooks put their scalars and read them back
(detectron2's ``EventStorage`` idea), so no hook needs to know which other hook made a number.

The trainer puts each step's losses, ``lr``, ``grad_norm``, timings and ``images_per_s`` at
that step's iteration; ``PeriodicEval`` puts its results as ``eval/<name>``. Readers:
``ProgressLog`` (the latest values), ``TensorBoardWriter`` (what was put at this step),
the stages' summaries (the final loss). Nothing in it is needed to resume a run (every
value is made again by the step that puts it), so it is not part of a checkpoint.
"""
from __future__ import annotations

from collections import deque
from typing import Mapping


class EventStorage:
    """Scalars by name, each with its history of ``(iteration, value)`` (the newest
    ``max_history`` kept: a long run puts ~10 scalars per step)."""

    def __init__(self, max_history: int = 10_000):
        self.iter = 0  #: the iteration a put belongs to unless it names one (the trainer sets it)
        self.max_history = int(max_history)
        self._history: dict[str, deque[tuple[int, float]]] = {}

    def put_scalar(self, name: str, value: float, iteration: int | None = None) -> None:
        """Record ``value`` (a number or a 0-d tensor) for ``name`` at ``iteration`` (default ``self.iter``)."""
        history = self._history.setdefault(name, deque(maxlen=self.max_history))
        history.append((self.iter if iteration is None else int(iteration), float(value)))

    def put_scalars(self, values: Mapping[str, float], prefix: str = "", iteration: int | None = None) -> None:
        """:meth:`put_scalar` for each item, the names prefixed with ``prefix`` (e.g. ``"eval/"``)."""
        for name, value in values.items():
            self.put_scalar(prefix + name, value, iteration)

    def latest(self, prefix: str = "") -> dict[str, float]:
        """The newest value of every name that starts with ``prefix``."""
        return {name: h[-1][1] for name, h in self._history.items() if h and name.startswith(prefix)}

    def put_at(self, iteration: int, prefix: str = "") -> dict[str, float]:
        """The values put at ``iteration`` (names starting with ``prefix``): one step's events."""
        return {name: h[-1][1] for name, h in self._history.items()
                if h and h[-1][0] == iteration and name.startswith(prefix)}

    def history(self, name: str) -> list[tuple[int, float]]:
        """``[(iteration, value), ...]`` of ``name``, oldest first ([] if never put)."""
        return list(self._history.get(name, ()))

    def __contains__(self, name: str) -> bool:
        return bool(self._history.get(name))
