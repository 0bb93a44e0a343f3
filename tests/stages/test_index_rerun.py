"""The `index` stage on a rerun: whole-output bad counts, changed and vanished files."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from part_distillation.data.synthetic import make_synthetic_dataset
from part_distillation.store import RecordStore
from tests.helpers import run_entry
from tests.stages.test_index import _index_overrides, _records


@pytest.mark.integration
def test_a_rerun_reports_the_bad_images_of_the_whole_output(tmp_path):
    made = make_synthetic_dataset(tmp_path / "data", num_classes=2, images_per_class=5, size=64, seed=1)
    first_class = made.image_dir / made.wnids[0]
    (first_class / "zero_bytes.JPEG").write_bytes(b"")
    (first_class / "not_an_image.JPEG").write_text("text")
    out = tmp_path / "out"
    first = run_entry(*_index_overrides(tmp_path / "data", out), check=True)
    assert "skipped: bad_image: 2" in first.stderr + first.stdout
    rerun = run_entry(*_index_overrides(tmp_path / "data", out), check=True)
    assert "12 already done" in rerun.stderr + rerun.stdout
    assert "skipped: bad_image: 2" in rerun.stderr + rerun.stdout  # not "skipped: none"
    summary = RecordStore(out / "pseudo_labels" / "index" / "synthetic_train").summary()
    assert sum(summary["bad"].values()) == 2 and summary["records"] == 12


@pytest.mark.integration
def test_a_rerun_notices_changed_and_vanished_files_and_can_redo_them(tmp_path):
    made = make_synthetic_dataset(tmp_path / "data", num_classes=2, images_per_class=4, size=64, seed=2)
    out = tmp_path / "out"
    run_entry(*_index_overrides(tmp_path / "data", out), check=True)
    records = _records(out)
    for record in records.values():  # what was indexed: the file's size and mtime
        st = os.stat(record["path"])
        assert (record["file_size"], record["mtime"]) == (st.st_size, st.st_mtime)
    changed_key, vanished_key = sorted(records)[1], sorted(records)[5]
    changed_path, vanished_path = records[changed_key]["path"], records[vanished_key]["path"]
    Image.fromarray(np.full((20, 30, 3), 7, np.uint8)).save(changed_path, format="JPEG")
    os.unlink(vanished_path)

    rerun = run_entry(*_index_overrides(tmp_path / "data", out), check=True)
    log = rerun.stderr + rerun.stdout
    assert f"image changed since it was indexed (stage.redo_changed=true indexes it again): {changed_path}" in log
    assert f"image indexed before is gone (stage.redo_changed=true removes it): {vanished_path}" in log
    assert _records(out)[changed_key]["width"] == 64 and vanished_key in _records(out)  # reported, kept

    redo = run_entry(*_index_overrides(tmp_path / "data", out, "stage.redo_changed=true"), check=True)
    assert "indexing it again" in redo.stderr + redo.stdout
    after = _records(out)
    st = os.stat(changed_path)
    assert (after[changed_key]["height"], after[changed_key]["width"]) == (20, 30)
    assert (after[changed_key]["file_size"], after[changed_key]["mtime"]) == (st.st_size, st.st_mtime)
    assert vanished_key not in after and len(after) == len(records) - 1
    store = RecordStore(out / "pseudo_labels" / "index" / "synthetic_train")
    assert store.skipped() == {vanished_key: "file_missing"}
    assert store.get(changed_key)["width"] == 30
    quiet = run_entry(*_index_overrides(tmp_path / "data", out), check=True)  # nothing left to report
    assert "changed since" not in quiet.stderr + quiet.stdout and "is gone" not in quiet.stderr + quiet.stdout
