"""Progress of a running stage: a tqdm bar on an interactive console, periodic log lines
otherwise (SLURM logs), with an ETA when the total is known, so logs stay readable at
ImageNet scale. (What a stage did, once done: ``summaries.py``.)
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
log = logging.getLogger("part_distillation")


def format_eta(seconds: float) -> str:
    """``1h02m``, ``4m05s`` or ``12s``: short enough for a log line."""
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def progress(items: Iterable[T], total: int | None, desc: str, every: int = 200, *,
             interval_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> Iterator[T]:
    """Iterate with a tqdm bar on a terminal, else a log line every ``every`` items or
    ``interval_s`` seconds, whichever comes first.

    A line reads ``[desc] 400/1000 (12.5/s, eta 48s)``; the ETA (items left / rate so far)
    is there when ``total`` is known. ``clock`` is injectable for tests.
    """
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, dynamic_ncols=True)
        return
    start = last = clock()
    for i, item in enumerate(items, 1):
        yield item
        now = clock()
        if i % every == 0 or now - last >= interval_s:
            last = now
            log.info("%s", progress_line(desc, i, total, now - start))


def progress_line(desc: str, done: int, total: int | None, elapsed_s: float) -> str:
    """``[desc] done/total (rate/s, eta ...)`` (``s each`` below one item a second); no ETA
    without a total."""
    rate = done / max(elapsed_s, 1e-9)
    speed = f"{rate:.1f}/s" if rate >= 1 or done == 0 else f"{elapsed_s / done:.1f} s each"
    if total is None:
        return f"[{desc}] {done}/? ({speed})"
    eta = format_eta((total - done) / rate) if done < total and rate > 0 else "0s"
    return f"[{desc}] {done}/{total} ({speed}, eta {eta})"
