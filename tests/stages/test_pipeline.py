"""The demo pipeline (`experiment=demo`), run the way `make demo` runs it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from part_distillation.store import RecordStore
from tests.helpers import TRAIN_HALVES_EVALUATION

REPO = Path(__file__).resolve().parents[2]


#: The demo at test size: 2 classes x 3 images, 4 training iterations.
SMALL_DEMO = ("stage.overrides=['synthetic_data:stage.classes=2','synthetic_data:stage.images_per_class=3',"
              "'proposal_learning:stage.max_iter=4','proposal_learning:stage.steps=[3]',"
              "'proposal_learning:stage.checkpoint_period=2','evaluate:stage.predictors=[proposal,records,strips]',"
              f"{TRAIN_HALVES_EVALUATION}]")
#: Stage 6 is left out at this size: a 4-iteration proposal model gives part ranking too
#: few embeddings per class for part classes (tests/stages/test_part_distillation.py
#: trains stage 6 on fixture records; `make demo` runs it on part ranking's records).
SMALL_DEMO_STAGES = ("stage.stages=[synthetic_data,index,detic_labeling,pixel_grouping,dense_crf,"
                     "proposal_learning,part_ranking,evaluate,collage]")


@pytest.mark.integration
def test_demo_pipeline_runs_every_stage_and_is_idempotent(tmp_path):
    cmd = [sys.executable, "-m", "part_distillation", "experiment=demo", f"paths.root={tmp_path}",
           f"hydra.run.dir={tmp_path}/run", SMALL_DEMO, SMALL_DEMO_STAGES]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    labels = tmp_path / "pseudo_labels"
    outputs = {
        "index": labels / "index" / "synthetic_train",
        "detic_labeling": labels / "object_labels" / "synthetic_train" / "detic_predictions",
        "pixel_grouping": labels / "part_labels" / "proposal_generation" / "synthetic_train",
        "dense_crf": labels / "part_labels" / "proposal_generation_dcrf" / "synthetic_train",
    }
    for stage, folder in outputs.items():
        records = list(RecordStore(folder).iter_records())
        assert len(records) == 6, stage
    assert all(r["ok"] for r in RecordStore(outputs["index"]).iter_records())
    checkpoints = sorted((tmp_path / "outputs" / "proposal_learning" / "synthetic_train" / "checkpoints").glob("*.pth"))
    assert [p.name for p in checkpoints][-1] == "model_0000004.pth"
    ranking = RecordStore(labels / "part_labels" / "part_ranking" / "synthetic_train")
    assert len(ranking.keys()) + len(ranking.skipped()) == 6  # labelled, or skipped (class with <= K embeddings)
    centroids = json.loads((ranking.path / "part_classes" / "0-of-1" / "centroids.json").read_text())
    assert centroids["num_clusters"] == 4 and centroids["checkpoint"].endswith("model_0000004.pth")
    metrics = json.loads((tmp_path / "outputs" / "evaluate" / "synthetic_train" / "metrics.json").read_text())
    assert list(metrics["predictors"]) == ["proposal", "records_dense_crf", "strips"]
    records = metrics["predictors"]["records_dense_crf"]   # evaluated on train_eval: 1 of each class's 3 images
    assert records["images"] == 2 and 0 < records["reference"]["C-mIoU"] <= 100
    log = first.stderr + first.stdout
    assert "| reference |" in log and "| strict |" in log   # the metrics table is printed

    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stderr + second.stdout
    # every stage is complete: none runs again (not even to skip its records one by one)
    assert "[pipeline] stage 2/9 index: complete, skipped" in log and "[index] done" not in log
    assert "[pipeline] stage 6/9 proposal_learning: complete, skipped" in log
    assert "[pipeline] stage 8/9 evaluate: complete, skipped" in log
    assert log.count("complete, skipped") == 9
    # the summary says where each stage's output is
    assert f"index: {outputs['index']}" in log and f"dense_crf: {outputs['dense_crf']}" in log
    for folder in outputs.values():
        assert len(list(RecordStore(folder).iter_records())) == 6


def test_pipeline_refuses_other_synthetic_settings_in_same_root(tmp_path):
    base = [sys.executable, "-m", "part_distillation", "stage=synthetic_data", f"paths.root={tmp_path}",
            f"hydra.run.dir={tmp_path}/run", "stage.images_per_class=2", "stage.classes=2"]
    assert subprocess.run(base, cwd=REPO, capture_output=True).returncode == 0
    other = subprocess.run(base + ["stage.seed=5"], cwd=REPO, capture_output=True, text=True)
    assert other.returncode != 0 and "overwrite_config" in other.stderr


# --------------------------------------------------------------------------- resume
# (the plan, the stage states and the SLURM submission: tests/launch/)

from tests.helpers import kill_entry_after_first_record, run_entry  # noqa: E402

SMALL_DATA = "stage.overrides=['synthetic_data:stage.classes=2','synthetic_data:stage.images_per_class=3']"
FIRST_STAGES = "stage.stages=[synthetic_data,index,detic_labeling]"


@pytest.mark.integration
def test_local_rerun_skips_complete_stages_and_redoes_a_killed_one(tmp_path):
    args = ["experiment=demo", f"paths.root={tmp_path}", f"hydra.run.dir={tmp_path}/run", SMALL_DATA, FIRST_STAGES]
    detic = tmp_path / "pseudo_labels" / "object_labels" / "synthetic_train" / "detic_predictions"
    index_shard = tmp_path / "pseudo_labels" / "index" / "synthetic_train" / "shards" / "00000-of-00001.rec"
    assert kill_entry_after_first_record(*args, shards=detic / "shards"), "the kill did not land inside stage 3"
    index_before = index_shard.stat()

    second = run_entry(*args, check=True)
    log = second.stderr + second.stdout
    assert "[pipeline] stage 1/3 synthetic_data: complete, skipped" in log
    assert "[pipeline] stage 2/3 index: complete, skipped" in log
    assert "[pipeline] stage 3/3 detic_labeling: started" in log and "[pipeline] stage 3/3 detic_labeling: done in" in log
    assert "[index] done" not in log  # not run at all
    index_after = index_shard.stat()
    assert (index_after.st_size, index_after.st_mtime_ns) == (index_before.st_size, index_before.st_mtime_ns)
    assert len(list(RecordStore(detic).iter_records())) == 6
    assert RecordStore(detic).summary()["shards_closed"] == 1

    third = run_entry(*args, check=True)
    assert (third.stderr + third.stdout).count("complete, skipped") == 3
