"""Stage ``synthetic_data``: the dataset and its two halves for the strict protocol."""
from __future__ import annotations

import json

from part_distillation.config import DataConfig, RunConfig, SyntheticDataStageConfig
from part_distillation.launch import JobContext
from part_distillation.stages import synthetic_data


def _cfg(root, **stage) -> RunConfig:
    stage = {"classes": 2, "images_per_class": 2, "size": 32, **stage}
    return RunConfig(stage=SyntheticDataStageConfig(output=str(root), **stage),
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


def test_a_held_out_split_shares_the_classes_but_no_image_with_train(tmp_path):
    synthetic_data.run(_cfg(tmp_path), JobContext())
    held = RunConfig(stage=SyntheticDataStageConfig(output=str(tmp_path), classes=2, images_per_class=2, size=32),
                     data=DataConfig(name="synthetic_heldout", root=str(tmp_path), split="heldout"))
    assert synthetic_data.run(held, JobContext()).as_dict()["written"] == 4
    train, heldout = (json.loads((tmp_path / "annotations" / f"{s}.json").read_text()) for s in ("train", "heldout"))
    assert train["categories"] == heldout["categories"]
    pixels = {p.read_bytes() for p in (tmp_path / "train").rglob("*.JPEG")}
    assert len(pixels) == 4 and not pixels & {p.read_bytes() for p in (tmp_path / "heldout").rglob("*.JPEG")}


def test_shared_appearance_is_a_setting_of_its_own_dataset(tmp_path):
    import numpy as np
    import pytest
    from PIL import Image

    from part_distillation.masks import decode_rle

    def spread(root) -> float:
        """The largest colour difference between two parts' mean colours of the first image."""
        parts = json.loads((root / "annotations" / "train.json").read_text())
        image = parts["images"][0]
        rgb = np.asarray(Image.open(root / "train" / image["file_name"]).convert("RGB"), np.float64)
        means = [rgb[decode_rle(a["segmentation"])].mean(0) for a in parts["annotations"]
                 if a["image_id"] == image["id"] and a["area"] > 20]
        assert len(means) >= 2
        return max(np.abs(a - b).max() for a in means for b in means)

    synthetic_data.run(_cfg(tmp_path / "shared", appearance="shared", size=96), JobContext())
    synthetic_data.run(_cfg(tmp_path / "distinct", size=96), JobContext())
    # colour does not tell the parts apart (the default gives each part its own hue)
    assert spread(tmp_path / "shared") < 40 < spread(tmp_path / "distinct")
    assert json.loads((tmp_path / "shared" / ".synthetic_train.json").read_text())["appearance"] == "shared"
    # the default keeps the marker of datasets made before the setting
    assert "appearance" not in json.loads((tmp_path / "distinct" / ".synthetic_train.json").read_text())
    with pytest.raises(FileExistsError, match="appearance"):
        synthetic_data.run(_cfg(tmp_path / "distinct", appearance="shared", size=96), JobContext())
