import numpy as np

from part_distillation.evaluation.tables import metric_cell, render_table


def test_a_metric_cell_has_one_decimal_or_a_dash():
    assert [metric_cell(v) for v in (12.345, 3, np.float32(0.25), np.int64(7))] == ["12.3", "3.0", "0.2", "7.0"]
    assert {metric_cell(v) for v in (None, float("nan"), np.float64("nan"), True, "x", [1])} == {"–"}


def test_render_table_rows_under_one_rule():
    assert render_table(["a", "b"], [["1", "2"], ("x", "–")]) == "| a | b |\n|---|---|\n| 1 | 2 |\n| x | – |\n"
    assert render_table(["only"], []) == "| only |\n|---|\n"
