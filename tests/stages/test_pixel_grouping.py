"""Stage ``pixel_grouping`` end to end on the synthetic dataset, through the real entry point."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import submitit

from tests.helpers import kill_entry_after_first_record
from part_distillation.data.synthetic import make_synthetic_dataset
from part_distillation.masks import decode_rle, decode_rles
from part_distillation.store import RecordStore
from part_distillation.store.schemas import PART_SEGMENTS
from tests.slurm_cluster import final_state, job_logs, slurm_cluster, submitit_job_ids
from tests.stages.object_records import write_object_records

REPO = Path(__file__).resolve().parents[2]
OBJECTS = Path("pseudo_labels") / "object_labels" / "synthetic_train" / "detic_predictions"
PARTS = Path("pseudo_labels") / "part_labels" / "proposal_generation" / "synthetic_train"
__all__ = ["slurm_cluster"]
#: The demo's frame (configs/stage_tuning/demo_detic_labeling.yaml: fit_size, the stage's input_size).
DEMO_FRAME = 256
# Cheap settings for CPU tests: the stride-4 level only stops the backbone early.
FAST = ("experiment=demo", "stage=pixel_grouping", "stage.feature_levels=[stride4]", "stage.kmeans_restarts=3")


def _entry(root: Path, *extra: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "part_distillation", *FAST, f"paths.root={root}",
                           f"hydra.run.dir={root}/run", *extra], cwd=REPO, capture_output=True, text=True,
                          check=check, env=env, **kw)


def _make_root(root: Path, classes: int = 2, images: int = 3, size: int = 64) -> Path:
    make_synthetic_dataset(root / "datasets" / "synthetic", num_classes=classes, images_per_class=images,
                           size=size, seed=7)
    write_object_records(root / "datasets" / "synthetic", root / OBJECTS, fit_size=DEMO_FRAME)
    return root


def _records(root: Path) -> dict[str, dict]:
    return {r["key"]: r for r in RecordStore(root / PARTS).iter_records()}


@pytest.fixture(scope="module")
def done_root(tmp_path_factory) -> Path:
    root = _make_root(tmp_path_factory.mktemp("pg"))
    _entry(root)
    return root


def test_records_follow_the_schema_and_the_fitted_frame(done_root):
    records = _records(done_root)
    objects = {r["key"]: r for r in RecordStore(done_root / OBJECTS).iter_records()}
    assert set(records) == set(objects) and len(records) == 6
    for key, rec in records.items():
        PART_SEGMENTS.check(rec)
        h, w = rec["fitted_size"]
        assert rec["original_size"] == [64, 64] and (h, w) == (DEMO_FRAME, DEMO_FRAME)
        obj = decode_rle(rec["object_mask"])
        assert obj.shape == (h, w) and np.array_equal(obj, decode_rle(objects[key]["masks"][0]))
        parts = decode_rles(rec["part_masks"])
        assert parts.shape[1:] == (h, w) and 1 <= len(parts) <= 4
        assert list(rec["part_ids"]) == sorted(set(rec["part_ids"])) and set(rec["part_ids"]) <= {1, 2, 3, 4}
        # parts are disjoint and cover exactly the object
        assert parts.sum(0).max() == 1 and np.array_equal(parts.any(0), obj)
        assert rec["object_ratio"] == pytest.approx(obj.mean())
        assert rec["class_index"] == objects[key]["class_index"] and rec["object_score"] == 1.0


def test_rerun_skips_what_is_complete(done_root):
    result = _entry(done_root)
    assert "0 records written, 6 already done" in result.stdout + result.stderr


def test_bad_feature_level_is_refused_with_the_key_named(tmp_path):
    root = _make_root(tmp_path, classes=1, images=1)
    result = _entry(root, "stage.feature_levels=[res3]", check=False)
    assert result.returncode != 0 and "stage.feature_levels" in result.stdout + result.stderr


@pytest.mark.integration
def test_kill_minus_9_and_rerun_equals_an_uninterrupted_run(done_root, tmp_path):
    root = _make_root(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [*FAST, f"paths.root={root}", f"hydra.run.dir={root}/run", "stage.batch_size=1"]
    assert kill_entry_after_first_record(*args, shards=root / PARTS / "shards", env=env), \
        "no record before the job ended or the deadline"
    partial = len(RecordStore(root / PARTS))
    assert 1 <= partial < 6
    _entry(root, "stage.batch_size=1")  # same config (the batch size is fingerprinted)
    after, reference = _records(root), _records(done_root)
    assert set(after) == set(reference)
    for key, rec in reference.items():
        assert after[key]["part_masks"] == rec["part_masks"] and np.array_equal(after[key]["part_ids"], rec["part_ids"])


@pytest.mark.slurm
@pytest.mark.integration
def test_tiny_slurm_array_writes_every_shard(slurm_cluster, tmp_path):
    root = _make_root(tmp_path, images=2)
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "-m", "part_distillation", "-m", "hydra/launcher=submitit_slurm", *FAST,
         f"paths.root={root}", f"hydra.sweep.dir={sweep}", "launcher.cpus_per_task=1", "launcher.timeout_min=10",
         "shard.count=2", "shard.index=range(0,2)"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:] + job_logs(sweep)
    tasks = [j for j in submitit_job_ids(sweep / ".submitit") if "_" in j]
    assert len(tasks) == 2
    for job_id in tasks:
        assert final_state(submitit.SlurmJob(folder=sweep / ".submitit" / "%j", job_id=job_id)) == "COMPLETED"
    store = RecordStore(root / PARTS)
    assert store.num_shards == 2 and store.summary()["shards_closed"] == 2
    per_shard = [list(store.iter_records(shards=[i])) for i in range(2)]
    # sharded by class: each shard holds one whole class
    assert sorted(len(r) for r in per_shard) == [2, 2]
    assert all(len({r["wnid"] for r in records}) == 1 for records in per_shard)
    for records in per_shard:
        for rec in records:
            PART_SEGMENTS.check(rec)
            assert rec["fitted_size"] == [DEMO_FRAME, DEMO_FRAME] and len(rec["part_masks"]) >= 1


@pytest.mark.integration
def test_seed_script_runs_the_demo_array_in_process(tmp_path):
    root = _make_root(tmp_path, images=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PD_LAUNCHER": "basic", "PD_EXPERIMENT": "demo", "JOBS": "2",
           "PD_DEMO_ROOT": str(root), "PD_PYTHON": sys.executable}
    result = subprocess.run(["bash", "sh_files/proposal_generation/run.sh", "stage.feature_levels=[stride4]",
                             "stage.kmeans_restarts=3"], cwd=REPO, capture_output=True, text=True, env=env,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    store = RecordStore(root / PARTS)
    assert store.num_shards == 2 and len(store) == 4
    assert store.config["stage"]["features"] == "efficientnet_lite0"  # the demo's feature source


def test_object_choice_top_is_the_highest_score_all_is_every_mask():
    from part_distillation.stages.pixel_grouping import object_keys

    record = {"key": "n1/a.JPEG", "masks": [{}, {}, {}], "scores": np.array([0.2, 0.9, 0.5])}
    assert object_keys(record, "top") == [("n1/a.JPEG", 1)]
    assert object_keys(record, "all") == [("n1/a.JPEG/0", 0), ("n1/a.JPEG/1", 1), ("n1/a.JPEG/2", 2)]
    assert object_keys({**record, "masks": [], "scores": np.array([])}, "top") == []
