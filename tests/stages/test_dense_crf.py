"""Stage ``dense_crf``: refinement quality, part ids, resume, workers, follow mode, arrays."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import kill_entry_after_first_record
from part_distillation.data.synthetic import make_synthetic_dataset
from part_distillation.masks import decode_rles
from part_distillation.stages.dense_crf import RefineSettings, refine_record
from part_distillation.store.sharding import in_shard
from part_distillation.store import RecordStore
from tests.slurm_cluster import slurm_cluster, wait_for
from tests.stages.fixtures import degrade, part_segments_record, true_part_labels, write_stage2

REPO = Path(__file__).resolve().parents[2]
FIT = 128
SETTINGS = RefineSettings(input_size=FIT)
__all__ = ["slurm_cluster"]  # the fixture, imported so pytest finds it


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(root, num_classes=3, images_per_class=4, size=FIT, seed=1)
    return root


@pytest.fixture(scope="module")
def stage2(dataset, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("stage2") / "proposals"
    write_stage2(dataset, store, fit_size=FIT, num_shards=2)
    return store


def _overrides(dataset: Path, stage2: Path, out_root: Path, *extra: str) -> list[str]:
    return ["stage=dense_crf", f"data.root={dataset}", f"paths.root={out_root}", f"stage.input={stage2}",
            f"stage.input_size={FIT}", f"hydra.run.dir={out_root}/run", *extra]


def _entry(*overrides: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "part_distillation", *overrides], cwd=REPO, env=env,
                            capture_output=True, text=True, **kw)
    if check and result.returncode != 0:
        pytest.fail(f"entry point failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def _output(out_root: Path) -> Path:
    return out_root / "pseudo_labels" / "part_labels" / "proposal_generation_dcrf" / "synthetic_train"


def _records(path: Path) -> dict[str, dict]:
    return {r["key"]: r for r in RecordStore(path).iter_records()}


def _same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(np.array_equal(a[k], b[k]) if isinstance(a[k], np.ndarray) else a[k] == b[k] for k in a)


def _iou_to_truth(record: dict, truth: np.ndarray) -> float:
    """Mean over true parts of the IoU with the segment of the same id (0 if it has none)."""
    masks, ids = decode_rles(record["part_masks"], size=truth.shape), np.asarray(record["part_ids"])
    ious = []
    for part in np.unique(truth[truth > 0]):
        true = truth == part
        found = masks[ids == part]
        pred = found[0] if len(found) else np.zeros_like(true)
        ious.append((true & pred).sum() / (true | pred).sum())
    return float(np.mean(ious))


# --------------------------------------------------------------------------- one record

def _item(dataset: Path, n: int = 0) -> dict:
    return next(x for i, x in enumerate(true_part_labels(dataset)) if i == n)


def test_parts_covering_the_whole_image_keep_every_id(dataset):
    """No background pixel: the reference's np.unique renumbering would drop a part here."""
    item = _item(dataset)
    h, w = item["labels"].shape
    quadrants = np.zeros((h, w), np.int64)
    quadrants[: h // 2, : w // 2], quadrants[: h // 2, w // 2:] = 2, 3
    quadrants[h // 2:, : w // 2], quadrants[h // 2:, w // 2:] = 5, 7
    record = part_segments_record(item, quadrants, FIT)
    out, reason = refine_record(record, SETTINGS)
    assert reason is None
    assert out["part_ids"].tolist() == [2, 3, 5, 7]
    masks = decode_rles(out["part_masks"])
    # the quadrant centres stay with their part
    for mask, (y, x) in zip(masks, [(h // 4, w // 4), (h // 4, 3 * w // 4), (3 * h // 4, w // 4),
                                    (3 * h // 4, 3 * w // 4)]):
        assert mask[y, x]


def test_vanishing_part_is_dropped_with_its_id_and_others_keep_theirs(dataset):
    item = _item(dataset, 1)
    labels = item["labels"].copy()  # the true parts: each survives the CRF
    ys, xs = np.nonzero(labels == 1)
    y, x = int(np.median(ys)), int(np.median(xs))
    labels[y, x] = 9  # one pixel inside part 1: the pairwise terms outvote its unary
    record = part_segments_record(item, labels, FIT)
    assert 9 in record["part_ids"].tolist()
    out, reason = refine_record(record, SETTINGS)
    assert reason is None
    kept = out["part_ids"].tolist()
    assert 9 not in kept and set(kept) == set(record["part_ids"].tolist()) - {9}
    assert len(out["part_masks"]) == len(kept)
    assert out["object_mask"] == record["object_mask"]


def test_object_whose_parts_all_vanish_is_skipped(dataset):
    item = _item(dataset)
    labels = np.zeros_like(item["labels"])
    labels[40, 40] = 1
    labels[90, 20] = 2
    out, reason = refine_record(part_segments_record(item, labels, FIT), SETTINGS)
    assert out is None and reason == "all_parts_vanished"


def test_record_in_another_frame_is_refused_naming_the_setting(dataset):
    item = _item(dataset)
    record = part_segments_record(item, degrade(item["labels"]), 96)
    with pytest.raises(ValueError, match="stage.input_size=128"):
        refine_record(record, SETTINGS)


def test_unreadable_image_is_skipped(dataset, tmp_path):
    item = dict(_item(dataset))
    bad = tmp_path / "bad.JPEG"
    bad.write_bytes(b"not an image")
    item["path"] = str(bad)
    out, reason = refine_record(part_segments_record(item, degrade(item["labels"]), FIT), SETTINGS)
    assert out is None and reason == "bad_image"


def test_jobs_split_keys_disjointly_and_completely():
    keys = [f"n{i:08d}/img_{i}.JPEG" for i in range(200)]
    owners = [[j for j in range(3) if in_shard(k, j, 3)] for k in keys]
    assert all(len(o) == 1 for o in owners)
    assert {o[0] for o in owners} == {0, 1, 2}


# --------------------------------------------------------------------------- through the entry point

@pytest.mark.integration
def test_crf_improves_iou_to_true_parts(dataset, stage2, tmp_path):
    result = _entry(*_overrides(dataset, stage2, tmp_path))
    truth = {t["key"]: t["labels"] for t in true_part_labels(dataset)}  # 128x128: the fitted frame
    before = _records(stage2)
    after = _records(_output(tmp_path))
    assert after.keys() == before.keys() and len(after) == 12
    iou_before = np.mean([_iou_to_truth(before[k], truth[k]) for k in before])
    iou_after = np.mean([_iou_to_truth(after[k], truth[k]) for k in after])
    print(f"mean IoU to the true parts: stage-2-like input {iou_before:.3f}, after the CRF {iou_after:.3f}")
    assert iou_after > iou_before + 0.08, (iou_before, iou_after)
    for record in after.values():
        assert record["fitted_size"] == [FIT, FIT] and all(m["size"] == [FIT, FIT] for m in record["part_masks"])
    assert "12 records written" in result.stdout + result.stderr


@pytest.mark.integration
def test_workers_2_equal_workers_1(dataset, stage2, tmp_path):
    _entry(*_overrides(dataset, stage2, tmp_path / "one"))
    _entry(*_overrides(dataset, stage2, tmp_path / "two", "stage.workers=2"))
    one, two = _records(_output(tmp_path / "one")), _records(_output(tmp_path / "two"))
    assert one.keys() == two.keys() and len(one) == 12
    assert all(_same(one[k], two[k]) for k in one)


@pytest.mark.integration
def test_array_shards_cover_the_input_once_and_equal_one_job(dataset, stage2, tmp_path):
    _entry(*_overrides(dataset, stage2, tmp_path / "one"))
    for index in range(3):
        _entry(*_overrides(dataset, stage2, tmp_path / "three", "shard.count=3", f"shard.index={index}"))
    store = RecordStore(_output(tmp_path / "three"))
    assert store.num_shards == 3 and len(store.keys()) == len(set(store.keys())) == 12
    one, three = _records(_output(tmp_path / "one")), _records(_output(tmp_path / "three"))
    assert all(_same(one[k], three[k]) for k in one)


@pytest.mark.integration
def test_kill_9_midway_then_rerun_equals_uninterrupted_run(dataset, tmp_path):
    stage2 = tmp_path / "stage2"
    write_stage2(dataset, stage2, fit_size=FIT)
    _entry(*_overrides(dataset, stage2, tmp_path / "reference"))
    expected = _records(_output(tmp_path / "reference"))

    killed = tmp_path / "killed"
    shard = _output(killed) / "shards" / "00000-of-00001.rec"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    kill_entry_after_first_record(*_overrides(dataset, stage2, killed), shards=shard.parent, env=env)
    partial = len(RecordStore(_output(killed)).keys())
    assert 0 < partial < len(expected), "the kill did not land midway"
    result = _entry(*_overrides(dataset, stage2, killed))
    assert f"{partial} already done" in result.stdout + result.stderr
    got = _records(_output(killed))
    assert got.keys() == expected.keys()
    assert all(_same(got[k], expected[k]) for k in expected)


@pytest.mark.integration
def test_follow_mode_processes_stage2_while_it_writes_and_exits_when_closed(dataset, stage2, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    growing, resume, close = tmp_path / "growing", tmp_path / "resume", tmp_path / "close"
    writer = subprocess.Popen([sys.executable, "-m", "tests.stages.fixtures", str(dataset), "train", str(growing),
                               "--fit-size", str(FIT), "--shards", "2", "--pause-after", "6",
                               "--resume-when", str(resume), "--close-when", str(close)],
                              cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    follower = subprocess.Popen([sys.executable, "-m", "part_distillation",
                                 *_overrides(dataset, growing, tmp_path / "follow", "stage.follow=true",
                                             "stage.poll_s=0.2")],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    output = _output(tmp_path / "follow")

    def refined(n: int) -> bool:
        assert follower.poll() is None, follower.stderr.read()
        assert writer.poll() is None, writer.stderr.read()
        return (output / "manifest.json").exists() and len(RecordStore(output).keys()) >= n

    try:
        wait_for(lambda: refined(6), 180, what="stage 3 to refine the first 6 records")
        resume.touch()  # stage 2 writes the other 6
        wait_for(lambda: refined(12), 180, what="stage 3 to refine all 12 records")
        time.sleep(1.0)  # several polls: every record is done, but stage 2's shards are still open
        assert follower.poll() is None, "stage 3 exited before stage 2 closed its shards"
        close.touch()
        assert writer.wait(timeout=60) == 0, writer.stderr.read()
        assert follower.wait(timeout=60) == 0, follower.stderr.read()
    finally:
        for proc in (writer, follower):
            if proc.poll() is None:
                proc.kill()
    _entry(*_overrides(dataset, stage2, tmp_path / "plain"))
    followed, plain = _records(_output(tmp_path / "follow")), _records(_output(tmp_path / "plain"))
    assert followed.keys() == plain.keys() and len(plain) == 12
    assert all(_same(followed[k], plain[k]) for k in plain)


@pytest.mark.integration
def test_missing_input_is_one_clear_error(dataset, tmp_path):
    result = _entry(*_overrides(dataset, tmp_path / "nothing", tmp_path), check=False)
    assert result.returncode != 0
    said = result.stderr + result.stdout
    assert "stage.input" in said and "does not exist" in said


@pytest.mark.slurm
@pytest.mark.integration
def test_seed_script_runs_a_slurm_array_over_stage2_records(dataset, stage2, tmp_path, slurm_cluster):
    """`sh_files/dcrf/run.sh` with JOBS=2 on the local cluster: one array, records checked by schema."""
    import submitit

    from part_distillation.store.schemas import PART_SEGMENTS
    from tests.slurm_cluster import final_state, job_logs, submitit_job_ids

    sweep = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PD_PYTHON": sys.executable,
           "PD_LAUNCHER": "submitit_slurm", "PD_EXPERIMENT": "demo", "JOBS": "2"}
    result = subprocess.run(["sh_files/dcrf/run.sh", f"data.root={dataset}", f"paths.root={tmp_path}",
                             f"stage.input={stage2}", f"stage.input_size={FIT}", f"hydra.sweep.dir={sweep}",
                             "launcher.timeout_min=5"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:] + job_logs(sweep)
    tasks = [j for j in submitit_job_ids(sweep / ".submitit") if "_" in j]
    assert sorted(j.split("_")[1] for j in tasks) == ["0", "1"] and len({j.split("_")[0] for j in tasks}) == 1
    for job_id in tasks:
        assert final_state(submitit.SlurmJob(folder=sweep / ".submitit" / "%j", job_id=job_id)) == "COMPLETED"
    store = RecordStore(_output(tmp_path))
    assert store.num_shards == 2 and store.summary()["shards_closed"] == 2
    records = _records(_output(tmp_path))
    assert records.keys() == _records(stage2).keys() and len(records) == 12
    for record in records.values():
        PART_SEGMENTS.check(record)
        assert record["fitted_size"] == [FIT, FIT] and record["original_size"] == [FIT, FIT]
        assert all(m["size"] == [FIT, FIT] for m in record["part_masks"])
        assert len(record["part_masks"]) == len(record["part_ids"]) > 0
