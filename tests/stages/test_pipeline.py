"""The demo pipeline (`experiment=demo`), run the way `make demo` runs it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from part_distillation.store import RecordStore

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_demo_pipeline_runs_and_is_idempotent(tmp_path):
    env_root = f"paths.root={tmp_path}"
    cmd = [sys.executable, "-m", "part_distillation", "experiment=demo", env_root,
           f"hydra.run.dir={tmp_path}/run"]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    store = RecordStore(tmp_path / "pseudo_labels" / "index" / "synthetic_train")
    records = list(store.iter_records())
    assert len(records) == 4 * 12 and all(r["ok"] for r in records)
    assert (tmp_path / "datasets" / "synthetic" / "annotations").is_dir()

    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "48 already done" in second.stderr + second.stdout
    # the summary says where each stage's output is
    assert f"index: {tmp_path}/pseudo_labels/index/synthetic_train" in second.stderr + second.stdout
    assert len(list(RecordStore(store.path).iter_records())) == 48


def test_pipeline_refuses_other_synthetic_settings_in_same_root(tmp_path):
    base = [sys.executable, "-m", "part_distillation", "stage=synthetic_data", f"paths.root={tmp_path}",
            f"hydra.run.dir={tmp_path}/run", "stage.images_per_class=2", "stage.classes=2"]
    assert subprocess.run(base, cwd=REPO, capture_output=True).returncode == 0
    other = subprocess.run(base + ["stage.seed=5"], cwd=REPO, capture_output=True, text=True)
    assert other.returncode != 0 and "overwrite_config" in other.stderr
