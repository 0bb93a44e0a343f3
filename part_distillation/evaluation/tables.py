"""Markdown tables of metrics: one writer for the evaluate stage's ``metrics.md`` and the report."""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence


def metric_cell(value: Any) -> str:
    """A metric as the tables show it: one decimal; ``–`` where there is none (None, NaN, not a number)."""
    if value is None or isinstance(value, (bool, str)):
        return "–"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "–"
    return "–" if math.isnan(number) else f"{number:.1f}"


def render_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table: the header row, the rule, a line per row (cells already formatted)."""
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


__all__ = ["metric_cell", "render_table"]
