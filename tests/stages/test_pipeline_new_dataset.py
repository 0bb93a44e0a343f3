"""The demo pipeline pointed at a dataset nobody here wrote: an ImageNet-style tree of 5 classes
with a PartImageNet-style json (``tests/data/partimagenet_tree.py``: bare file names, classes
sharing super-categories, polygons, no object file), object masks from that json
(``annotations_are_parts``), evaluation on a disjoint split; then ``predict`` on the same json."""
from __future__ import annotations

import csv
import json

import pytest

from part_distillation.store import RecordStore
from tests.data.partimagenet_tree import CLASSES, make_partimagenet_tree
from tests.helpers import run_entry

#: The demo's settings at test size (as tests/reliability/demo_runs.py shrinks them).
SMALL = ["'proposal_learning:stage.max_iter=30'", "'proposal_learning:stage.steps=[25]'",
         "'proposal_learning:stage.checkpoint_period=10'", "'part_ranking:stage.num_clusters=2'",
         "'part_distillation:stage.parts_per_class=2'", "'part_distillation:stage.max_iter=6'",
         "'part_distillation:stage.steps=[5]'", "'part_distillation:stage.checkpoint_period=3'"]
STAGES = "stage.stages=[index,detic_labeling,pixel_grouping,dense_crf,proposal_learning,part_ranking," \
         "part_distillation,evaluate]"


@pytest.mark.integration
def test_demo_pipeline_runs_on_a_new_partimagenet_style_dataset_and_predict_finds_parts(tmp_path):
    # 4 train images per class, not 2: part_ranking gives a class with <= K=2 proposal embeddings
    # no part classes (the 30-iteration proposal model keeps about one proposal per image), and
    # stage 6 keeps only objects and parts >= 5 % of the 640x640 canvas (the reference's filters),
    # so with 2 images a class could be left with nothing to train on.
    data = make_partimagenet_tree(tmp_path / "data", splits={"train": 4, "val": 1})
    parts_json = data.jsons["train"]
    overrides = [f"'detic_labeling:stage.annotations={parts_json}'", "'detic_labeling:stage.annotations_are_parts=true'",
                 *SMALL, "'evaluate:stage.image_root=null'", "'evaluate:stage.split=val'",
                 "'evaluate:stage.match_split=train'", "'evaluate:stage.predictors=[proposal,part_distillation,strips]'"]
    root = tmp_path / "root"
    run = run_entry("experiment=demo", f"paths.root={root}", f"hydra.run.dir={root}/run", f"data.root={data.root}",
                    "data.name=newparts", "data.split=train", STAGES, f"stage.overrides=[{','.join(overrides)}]",
                    timeout=1500)
    assert run.returncode == 0, (run.stderr + run.stdout)[-3000:]

    wnids = sorted(w for w, _, _ in CLASSES)
    objects = list(RecordStore(root / "pseudo_labels" / "object_labels" / "newparts" / "detic_predictions")
                   .iter_records())
    assert len(objects) == data.images["train"]  # every image has its object, from the part json
    for record in objects:
        assert record["source"] == "annotations" and len(record["masks"]) == 1
        assert record["pred_classes"].tolist() == [wnids.index(record["wnid"])]  # its wnid, not "Quadruped"

    evaluation = root / "outputs" / "evaluate" / "newparts"
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics["split"] == "val" and metrics["match_split"] == "train"
    assert list(metrics["predictors"]) == ["proposal", "part_distillation", "strips"]
    for result in metrics["predictors"].values():
        assert result["images"] == data.images["val"]

    out = tmp_path / "predict"
    predicted = run_entry("predict", str(data.root / "train"), str(root / "outputs" / "part_distillation" / "newparts"),
                          "stage.mask_source=annotations", f"stage.annotations={parts_json}",
                          "stage.annotations_are_parts=true", f"stage.output={out}", f"hydra.run.dir={out}/run",
                          timeout=600)
    assert predicted.returncode == 0, (predicted.stderr + predicted.stdout)[-3000:]
    store = RecordStore(out)
    assert not store.skipped()
    records = list(store.iter_records())
    assert len(records) == data.images["train"]
    for record in records:
        assert len(record["part_masks"]) >= 1, record["key"]  # parts in every image
        assert record["object_classes"].tolist() == [wnids.index(record["key"].split("/")[0])]
    assert "no part found in any" not in predicted.stderr + predicted.stdout

    # mIoU keyed by ImageNet class: one row per wnid, though 3 classes are Quadrupeds
    with open(evaluation / "part_distillation" / "per_class.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    assert len(rows) == len(CLASSES) and all(any(w in ",".join(r) for r in rows) for w in wnids)
