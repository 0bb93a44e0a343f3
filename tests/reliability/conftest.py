"""The reliability suite: kills, requeues and bad inputs, counted.

Run it with ``make reliability`` (``tools/reliability.py``), not with ``make test``:
``tests/conftest.py`` leaves this folder out unless ``PD_RELIABILITY=1``.

Each test adds what it survived to the session's :class:`Tally` (fixture ``tally``):
``tally.add("kills")`` after a SIGKILL whose rerun gave the uninterrupted output,
``tally.add("requeues")`` after a SLURM requeue that resumed to the same result,
``tally.add("bad_inputs")`` after a bad input that ended with its one-line message and
nothing lost, and ``tally.add("lost", n)`` for records or files lost or corrupted (a
test that finds any also fails). The counts are written as JSON to
``$PD_RELIABILITY_TALLY`` when set; ``tools/reliability.py`` prints them as the
suite's last line.
"""
from __future__ import annotations

import collections
import json
import os

import pytest

KINDS = ("kills", "requeues", "bad_inputs", "lost")


class Tally:
    """Counts of what the suite survived (see the module notes)."""

    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter({k: 0 for k in KINDS})

    def add(self, kind: str, n: int = 1) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown tally kind {kind!r}; known: {', '.join(KINDS)}")
        self.counts[kind] += n

    def line(self) -> str:
        return "RELIABILITY " + " ".join(f"{k}={self.counts[k]}" for k in KINDS)


_TALLY = Tally()


@pytest.fixture(scope="session")
def tally() -> Tally:
    return _TALLY


def pytest_sessionfinish(session, exitstatus) -> None:
    path = os.environ.get("PD_RELIABILITY_TALLY")
    if path:
        with open(path, "w") as f:
            json.dump(dict(_TALLY.counts), f)


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    """The demo pipeline at test size run once from scratch (``demo_runs.Snapshot``): the
    reference of the kill tests, and stage outputs for the bad-input tests (read only)."""
    from tests.reliability.demo_runs import run_uninterrupted

    root = tmp_path_factory.mktemp("uninterrupted")
    snap = run_uninterrupted(root)
    assert (root / "outputs" / "evaluate" / "synthetic_train" / "metrics.json").is_file()
    evaluate_top = "outputs/evaluate/synthetic_train"  # the stage's own store: closed shards, no records
    assert len(snap.records[evaluate_top][0]) == 0
    assert all(len(records) == 6 for name, (records, _) in snap.records.items()
               if "part_ranking" not in name and name != evaluate_top), {k: len(r) for k, (r, _) in snap.records.items()}
    return snap
