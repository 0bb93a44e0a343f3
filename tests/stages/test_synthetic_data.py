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


def test_a_run_killed_midway_is_redone_but_foreign_files_are_refused(tmp_path):
    import pytest

    synthetic_data.run(_cfg(tmp_path), JobContext())
    images = sorted((tmp_path / "train").rglob("*.JPEG"))
    first = images[0].read_bytes()
    # killed after some images, before the final marker: only the "started" marker is there
    marker = tmp_path / ".synthetic_train.json"
    settings = json.loads(marker.read_text())
    marker.unlink()
    (tmp_path / ".synthetic_train.started.json").write_text(json.dumps(settings))
    images[-1].unlink()
    redone = synthetic_data.run(_cfg(tmp_path), JobContext()).as_dict()
    assert redone["written"] == 4 and json.loads(marker.read_text()) == settings
    assert images[0].read_bytes() == first and images[-1].is_file()
    assert not (tmp_path / ".synthetic_train.started.json").exists()
    # files of unknown origin (no marker of this stage at all) are never overwritten
    marker.unlink()
    with pytest.raises(FileExistsError, match="already holds files"):
        synthetic_data.run(_cfg(tmp_path), JobContext())
    assert images[0].read_bytes() == first
