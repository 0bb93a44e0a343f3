"""Stage ``synthetic_data``: the dataset and its two halves for the strict protocol."""
from __future__ import annotations

import json

from part_distillation.config import DataConfig, RunConfig, SyntheticDataStageConfig
from part_distillation.launch import JobContext
from part_distillation.stages import synthetic_data


def _cfg(root, **stage) -> RunConfig:
    return RunConfig(stage=SyntheticDataStageConfig(output=str(root), classes=2, images_per_class=2, size=32, **stage),
                     data=DataConfig(name="synthetic", root=str(root)))


def test_writes_the_halves_and_adds_them_to_a_dataset_made_without(tmp_path):
    summary = synthetic_data.run(_cfg(tmp_path), JobContext()).as_dict()
    halves = [tmp_path / "annotations" / f"train_{h}.json" for h in ("match", "eval")]
    assert summary["written"] == 4 and summary["halves"] == [str(p) for p in halves]
    sizes = [len(json.loads(p.read_text())["images"]) for p in halves]
    assert sizes == [2, 2]
    for p in halves:   # a dataset made before the halves existed gets them on the next run
        p.unlink()
    again = synthetic_data.run(_cfg(tmp_path), JobContext()).as_dict()
    assert again["written"] == 0 and again["already_done"] == 4 and all(p.is_file() for p in halves)
    again = synthetic_data.run(_cfg(tmp_path), JobContext()).as_dict()
    assert "halves" not in again   # already there: left as they are
