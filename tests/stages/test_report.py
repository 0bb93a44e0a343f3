"""Stage ``report``: report.md from a run's outputs (summaries, metrics, collages)."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from part_distillation.stages.report import ExperimentPlan, StageFolder, build_report, metrics_table, plan_experiment
from part_distillation.summaries import StageSummary, record_summary
from tests.helpers import run_entry

METRICS_MD = """| predictor | protocol | AR@1 | AR@10 | C-mIoU | A-mIoU |
|---|---|---|---|---|---|
| proposal model | reference | 12.0 | 30.5 | – | – |
| pixel grouping records | strict | 8.1 | 22.0 | 41.3 | 39.9 |
"""


def _save(output: Path, stage: str, summary: StageSummary, index: int = 0, count: int = 1) -> None:
    cfg = SimpleNamespace(stage=SimpleNamespace(name=stage, output=str(output)),
                          data=SimpleNamespace(root="/nowhere", name="synthetic_train"),
                          shard=SimpleNamespace(index=index, count=count), experiment="demo")
    assert record_summary(cfg, summary) is not None


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(path)


def _links(text: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)


def _plan(root: Path, experiment="demo", data="synthetic_train") -> ExperimentPlan:
    names = ["synthetic_data", "index", "pixel_grouping", "proposal_learning", "evaluate", "collage"]
    folders = {"synthetic_data": root / "datasets" / "synthetic", "index": root / "pseudo_labels" / "index" / data,
               "pixel_grouping": root / "pseudo_labels" / "part_labels" / "proposal generation" / data,
               "proposal_learning": root / "outputs" / "proposal_learning" / data,
               "evaluate": root / "outputs" / "evaluate" / data, "collage": root / "outputs" / "collages" / data}
    return ExperimentPlan(experiment, data, [StageFolder(n, str(folders[n])) for n in names])


def test_report_embeds_the_table_sums_each_stage_over_its_jobs_and_links_images_that_exist(tmp_path):
    plan = _plan(tmp_path)
    out = {s.name: Path(s.output) for s in plan.stages}
    _save(out["index"], "index", StageSummary("index", seen=6, written=6, wall_s=1.5, cpu_s=2.0))
    for index, (written, skipped, wall) in enumerate([(2, 1, 40.0), (3, 0, 75.0)]):  # two shards
        part = StageSummary("pixel_grouping", seen=written + skipped, written=written, wall_s=wall, cpu_s=wall)
        for _ in range(skipped):
            part.skip("no_object_mask")
        _save(out["pixel_grouping"], "pixel_grouping", part, index, 2)
    out["evaluate"].mkdir(parents=True)
    (out["evaluate"] / "metrics.md").write_text(METRICS_MD)
    _png(out["evaluate"] / "best_worst_classes.png")
    for stage in ("pixel_grouping", "index"):
        _png(out["collage"] / f"{stage}.png")

    text, tables = build_report([plan], tmp_path)

    assert METRICS_MD.strip() in text and tables == [("demo", METRICS_MD)]
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert rows["index"].startswith("| index | 1 | 6 | 0 | none | 1.5 s | 2.0 s |")
    # 2 + 3 written, 1 skipped with its reason, wall time of the longest shard, CPU time of both
    assert rows["pixel_grouping"].startswith("| pixel_grouping | 2 | 5 | 0 | no_object_mask: 1 | 75 s (1m15s) | "
                                             "115 s (1m55s) |")
    for stage in ("synthetic_data", "proposal_learning", "evaluate", "collage"):
        assert f"| {stage} | not run |" in rows[stage]
    assert "Total wall time of the stages: 76 s (1m16s)." in text
    links = _links(text)
    assert [Path(unquote(link)).name for link in links] == ["best_worst_classes.png", "index.png", "pixel_grouping.png"]
    assert all(not Path(unquote(link)).is_absolute() and (tmp_path / unquote(link)).is_file() for link in links)
    # collages in the pipeline's stage order, under their stage name
    assert text.index("**index**") < text.index("**pixel_grouping**")


def test_a_run_with_nothing_done_yet_says_not_run_everywhere(tmp_path):
    plans = [_plan(tmp_path), _plan(tmp_path, "photos", "photos_train")]
    text, tables = build_report(plans, tmp_path)
    assert tables == []
    assert "Evaluation not run (no metrics in" in text
    assert text.count("| not run |") == 2 * 6
    assert text.count("Not run (no collages in") == 2
    assert _links(text) == []


def test_an_experiment_whose_stages_cannot_be_listed_is_said_and_the_others_reported(tmp_path):
    unknown = plan_experiment("no_such_experiment", [f"paths.root={tmp_path}"])
    assert unknown.stages == [] and "could not be composed" in unknown.problem and "no_such_experiment" in \
        unknown.problem
    photos = plan_experiment("photos", ["experiment=demo", f"paths.root={tmp_path}"])  # this run's experiment=
    assert [s.name for s in photos.stages] == ["sample_photos", "detic_labeling", "pixel_grouping", "dense_crf",
                                               "collage"]
    assert photos.output_of("collage") == f"{tmp_path}/outputs/collages/photos_train" and photos.data == "photos_train"
    broken = ExperimentPlan("photos", "?", problem="its stages could not be composed: no such experiment")
    text, _ = build_report([_plan(tmp_path), broken], tmp_path)
    assert "Not reported: its stages could not be composed: no such experiment." in text
    assert "| index | not run |" in text


def test_a_summary_file_that_cannot_be_read_is_left_out_with_a_warning(tmp_path, caplog):
    plan = _plan(tmp_path)
    index = Path(plan.output_of("index"))
    _save(index, "index", StageSummary("index", seen=4, written=4))
    (index / "summaries" / "index-shard1-of-2.json").write_text('{"stage": "index", "writ')  # cut short
    with caplog.at_level(logging.WARNING, logger="part_distillation"):
        text, _ = build_report([plan], tmp_path)
    assert "| index | 1 | 4 |" in text and "index-shard1-of-2.json cannot be read" in caplog.text


def test_only_metrics_json_gives_a_table_of_every_predictor_and_protocol(tmp_path):
    plan = _plan(tmp_path)
    folder = Path(plan.output_of("evaluate"))
    folder.mkdir(parents=True)
    metrics = {"images": 6, "split": "valtest",
               "reference": {"AR@10": 20.0, "AR@1": 10.04, "C-mIoU": 30.26, "A-mIoU": 40.0, "images": 6,
                             "per_class_mIoU": {"n01": 12.0}},
               "strict": {"AR@1": 9.0, "AR@10": 19.0, "C-mIoU": float("nan"), "A-mIoU": None}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    text, tables = build_report([plan], tmp_path)
    expected = ("| predictions | AR@1 | AR@10 | C-mIoU | A-mIoU |\n|---|---|---|---|---|\n"
                "| reference | 10.0 | 20.0 | 30.3 | 40.0 |\n| strict | 9.0 | 19.0 | – | – |\n")
    assert tables == [("demo", expected)] and expected.strip() in text
    nested = {"predictors": {"strip baseline": {"reference": {"AR@1": 1.0}, "strict": {"AR@1": 2.0}}}}
    assert metrics_table(nested).splitlines()[2:] == ["| predictors / strip baseline / reference | 1.0 |",
                                                      "| predictors / strip baseline / strict | 2.0 |"]
    # a protocol's AR settings are rows of their own, below its mIoU row
    settings = {"reference": {"overlapping": {"AR@1": 5.0}, "one-label": {"AR@1": 50.0}, "C-mIoU": 30.0,
                              "bestIoU": 40.0}}
    assert metrics_table(settings).splitlines()[0] == "| predictions | AR@1 | C-mIoU | bestIoU |"
    assert metrics_table(settings).splitlines()[2:] == ["| reference | – | 30.0 | 40.0 |",
                                                        "| reference / overlapping | 5.0 | – | – |",
                                                        "| reference / one-label | 50.0 | – | – |"]


@pytest.mark.integration
def test_the_report_stage_at_the_end_of_a_pipeline_reports_its_stages_and_the_ones_still_to_run(tmp_path):
    result = run_entry("experiment=demo", f"paths.root={tmp_path}", f"hydra.run.dir={tmp_path}/run",
                       "stage.stages=[synthetic_data,index,report]",
                       "stage.overrides=['synthetic_data:stage.classes=2','synthetic_data:stage.images_per_class=3']",
                       check=True)
    report = (tmp_path / "report.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in report.split("## Stages")[1].split("### photos")[0]
            .splitlines() if line.startswith("| ")}
    assert rows["synthetic_data"].startswith("| synthetic_data | 1 | 6 |")
    assert rows["index"].startswith("| index | 1 | 6 | 0 | none |")
    for stage in ("detic_labeling", "pixel_grouping", "dense_crf", "proposal_learning", "part_ranking",
                  "part_distillation", "evaluate", "collage"):  # the rest of the demo, not run yet
        assert rows[stage].startswith(f"| {stage} | not run |"), rows
    assert "report" not in rows
    photos = report.split("### photos (photos_train)")[1].split("##")[0]
    assert "| sample_photos | not run |" in photos
    # saved next to each output by the pipeline; the synthetic tree's in a folder its listing skips
    assert (tmp_path / "pseudo_labels" / "index" / "synthetic_train" / "summaries" / "index-shard0-of-1.json").is_file()
    assert (tmp_path / "datasets" / "synthetic" / ".summaries" / "synthetic_data-shard0-of-1.json").is_file()
    assert f"report: {tmp_path / 'report.md'}" in result.stderr + result.stdout


def test_training_curves_come_from_the_metrics_log_as_a_table_and_a_plot(tmp_path):
    from part_distillation.stages.report import training_curves, write_curves_png

    plan = _plan(tmp_path)
    plan.stages.append(StageFolder("part_distillation@again", str(tmp_path / "outputs" / "pd_again")))
    run = Path(plan.output_of("proposal_learning"))
    run.mkdir(parents=True)
    lines = [{"iteration": 50, "total_loss": 3.0},   # a loss-only line: no point of the curves
             {"iteration": 100, "eval/reference/bestIoU": 41.0, "eval/reference/overlapping/AR@10": 30.0},
             {"iteration": 200, "total_loss": 1.0, "eval/reference/bestIoU": 55.5,
              "eval/reference/overlapping/AR@10": 44.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    curves = training_curves(plan)   # the second training step never evaluated: left out
    assert curves == {"proposal_learning": {"bestIoU": [(100, 41.0), (200, 55.5)], "AR@10": [(100, 30.0), (200, 44.0)]}}
    png = write_curves_png(curves, tmp_path / "outputs" / "report" / "training_curves_demo.png", "demo")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(png).size[0] > 100
    text, _ = build_report([plan], tmp_path, {"demo": (curves, png)})
    section = text.split("## Training curves")[1].split("## Stages")[0]
    assert "| proposal_learning | bestIoU | 100: 41.0, 200: 55.5 |" in section
    assert "| proposal_learning | AR@10 | 100: 30.0, 200: 44.0 |" in section
    assert _links(section) == ["outputs/report/training_curves_demo.png"]
    assert "No training stage" in build_report([plan], tmp_path)[0]
