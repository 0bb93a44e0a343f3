"""Stage summaries: a pipeline reports each stage apart, with where its output is."""
from __future__ import annotations

import logging

from part_distillation.progress import StageSummary


def test_a_pipeline_summary_keeps_stage_counts_apart_and_names_the_outputs(caplog):
    made = StageSummary("synthetic_data", written=48, output="/data/synthetic")
    indexed = StageSummary("index", seen=48, written=40, already_done=8, output="/out/index")
    indexed.skip("bad_image")
    pipeline = StageSummary("pipeline", parts=[made, indexed], output="/out/index").finish()
    summary = pipeline.as_dict()
    assert "seen" not in summary and "written" not in summary  # 48 images + 48 records are not 96 of anything
    assert summary["stages"]["synthetic_data"]["written"] == 48
    assert summary["stages"]["index"] == {**summary["stages"]["index"], "seen": 48, "written": 40,
                                          "already_done": 8, "skipped": {"bad_image": 1}, "output": "/out/index"}
    with caplog.at_level(logging.INFO, logger="part_distillation"):
        pipeline.log()
        indexed.log()
    lines = caplog.messages
    assert "outputs: synthetic_data: /data/synthetic, index: /out/index" in lines[0]
    assert "48 inputs seen, 40 records written, 8 already done" in lines[1] and "output: /out/index" in lines[1]
