"""Progress lines of a running stage: rate, and an ETA when the total is known."""
from __future__ import annotations

import logging

from part_distillation.progress import format_eta, progress, progress_line


class FakeClock:
    """A clock that moves ``step`` seconds each time it is read."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        value = self.now
        self.now += self.step
        return value


def _lines(caplog) -> list[str]:
    return [m for m in caplog.messages if m.startswith("[")]


def test_progress_lines_give_rate_and_eta_when_the_total_is_known(caplog):
    # the clock moves 0.5 s per item: after 5 items 2.5 s have passed, 2 items/s, 15 items left = 7.5 s
    with caplog.at_level(logging.INFO, logger="part_distillation"):
        assert list(progress(range(20), 20, "pixel_grouping 0/1", every=5, clock=FakeClock(0.5))) == list(range(20))
    assert _lines(caplog) == ["[pixel_grouping 0/1] 5/20 (2.0/s, eta 8s)",
                              "[pixel_grouping 0/1] 10/20 (2.0/s, eta 5s)",
                              "[pixel_grouping 0/1] 15/20 (2.0/s, eta 2s)",
                              "[pixel_grouping 0/1] 20/20 (2.0/s, eta 0s)"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="part_distillation"):  # slower than one a second: seconds each
        list(progress(range(6), 6, "part_ranking label pass", every=3, clock=FakeClock(4.0)))
    assert _lines(caplog) == ["[part_ranking label pass] 3/6 (4.0 s each, eta 12s)",
                              "[part_ranking label pass] 6/6 (4.0 s each, eta 0s)"]


def test_progress_without_a_total_has_no_eta_and_a_slow_stage_logs_by_time(caplog):
    with caplog.at_level(logging.INFO, logger="part_distillation"):
        list(progress(range(4), None, "evaluate", every=1000, interval_s=60, clock=FakeClock(40.0)))
    # 40 s per item, a line once 60 s have passed since the last: after items 2 and 4
    assert _lines(caplog) == ["[evaluate] 2/? (40.0 s each)", "[evaluate] 4/? (40.0 s each)"]


def test_eta_is_written_short():
    assert format_eta(7) == "7s"
    assert format_eta(125) == "2m05s"
    assert format_eta(2 * 3600 + 3 * 60 + 59) == "2h03m"
    # 1000 items at 4/s, 400 done: 600 left take 150 s
    assert progress_line("index 0/1", 400, 1000, 100.0) == "[index 0/1] 400/1000 (4.0/s, eta 2m30s)"
