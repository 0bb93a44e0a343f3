"""Stage 1 ``detic_labeling`` end to end, through the real entry point and the seed script."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import kill_entry_after_first_record
from part_distillation.data.frame import ImageFrame, fitted_size
from part_distillation.data.synthetic import make_synthetic_dataset
from part_distillation.masks import decode_rle, decode_rles, mask_iou
from part_distillation.store import RecordStore
from part_distillation.store.schemas import OBJECT_MASKS

REPO = Path(__file__).resolve().parents[2]
OUTPUT = Path("pseudo_labels") / "object_labels" / "synthetic_train" / "detic_predictions"

pytestmark = pytest.mark.integration


def _entry(*overrides: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "part_distillation", *overrides], cwd=REPO,
                            capture_output=True, text=True, **kw)
    if check and result.returncode != 0:
        raise AssertionError(result.stderr[-3000:])
    return result


def _overrides(data_root: Path, out_root: Path, *extra: str) -> list[str]:
    return ["stage=detic_labeling", f"data.root={data_root}", f"paths.root={out_root}",
            f"hydra.run.dir={out_root}/run", *extra]


def _records(out_root: Path) -> dict[str, dict]:
    return {r["key"]: r for r in RecordStore(out_root / OUTPUT).iter_records()}


def _check_record(record: dict, fit: int = 640) -> None:
    """Schema, frame and internal consistency of one OBJECT_MASKS record."""
    OBJECT_MASKS.check(record)
    frame = ImageFrame.from_record(record)
    assert frame.fitted == fitted_size(*frame.original, fit)
    n = len(record["masks"])
    assert 1 <= n <= 10
    assert record["boxes"].shape == (n, 4) and record["scores"].shape == (n,) and record["pred_classes"].shape == (n,)
    assert len(record["pred_class_names"]) == n
    assert all(list(rle["size"]) == list(frame.fitted) for rle in record["masks"])
    assert np.all(np.diff(record["scores"]) <= 0)
    boxes = record["boxes"]
    assert np.all(boxes[:, 2] <= frame.fitted[1] + 1e-3) and np.all(boxes[:, 3] <= frame.fitted[0] + 1e-3)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(root, num_classes=3, images_per_class=6, size=(96, 72), seed=2)
    return root


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import part_distillation.__main__ as entry
    from part_distillation.config import validate

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=entry.config_dir(), version_base="1.3"):
        return validate(compose("config", overrides=list(overrides)))


@pytest.mark.filterwarnings("ignore:(?s).*is validated against ConfigStore schema")
def test_reference_settings_and_the_demo_choice_of_source():
    from part_distillation.config import ConfigError

    ref = _compose("experiment=in22k", "stage=detic_labeling", "model=detic_swinb", "paths.root=/x")
    stage = ref.stage
    assert (stage.source, stage.fit_size, stage.score_threshold, stage.nms_threshold) == ("detic", 640, 0.02, 0.5)
    assert (stage.max_detections, stage.keep_top, stage.own_class_filter, stage.allow_tf32) == (1000, 10, True, False)
    assert stage.output == "/x/pseudo_labels/object_labels/imagenet_22k_train/detic_predictions"
    demo = _compose("experiment=demo", "stage=detic_labeling", "model=detic_swinb")
    assert demo.stage.source == "annotations" and demo.model.name == "detic"
    assert demo.stage.annotations.endswith("synthetic/annotations/objects_train.json")
    assert "detic_labeling" in _compose("experiment=demo").stage.stages  # the demo pipeline runs it
    with pytest.raises(ConfigError, match="'stage.source'"):
        _compose("stage=detic_labeling", "stage.source=yolo")
    with pytest.raises(ConfigError, match="'stage.score_threshold'"):
        _compose("stage=detic_labeling", "stage.score_threshold=1.5")


def test_annotations_source_records_the_true_objects(synthetic, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synthetic, data)
    first = data / "train" / "n90000001"
    (first / "broken.JPEG").write_text("not an image")
    extra = first / "n90000001_extra.JPEG"  # an image the annotation file does not know
    shutil.copy(first / "n90000001_00000.JPEG", extra)
    result = _entry(*_overrides(data, tmp_path, "stage.source=annotations"))
    records = _records(tmp_path)
    assert len(records) == 18
    truth = json.loads((data / "annotations" / "objects_train.json").read_text())
    by_file = {im["file_name"]: im for im in truth["images"]}
    true_masks = {a["image_id"]: decode_rle(a["segmentation"]) for a in truth["annotations"]}
    for key, record in records.items():
        _check_record(record)
        assert record["source"] == "annotations" and record["original_size"] == [72, 96]
        assert record["fitted_size"] == [480, 640]
        assert record["pred_classes"].tolist() == [record["class_index"]]
        assert record["pred_class_names"] == [record["class_name"]]
        true = ImageFrame.from_record(record).masks_to_fitted(true_masks[by_file[key]["id"]])
        assert mask_iou(decode_rles(record["masks"]), true[None])[0, 0] == 1.0
    skipped = RecordStore(tmp_path / OUTPUT).skipped()
    assert skipped == {"n90000001/broken.JPEG": "bad_image", "n90000001/n90000001_extra.JPEG": "no_detections"}
    log = result.stdout + result.stderr
    assert "bad_image: 1" in log and "no_detections: 1" in log
    # a rerun does nothing more and keeps everything
    again = _entry(*_overrides(data, tmp_path, "stage.source=annotations"))
    assert "0 records written, 20 already done" in again.stdout + again.stderr
    assert _records(tmp_path).keys() == records.keys()


def test_kill_9_midway_then_rerun_equals_uninterrupted_run(synthetic, tmp_path):
    args = ("stage.source=grabcut", "stage.batch_size=1", "stage.grabcut_iterations=2", "stage.fit_size=160")
    reference = tmp_path / "reference"
    _entry(*_overrides(synthetic, reference, *args))
    expected = _records(reference)
    assert len(expected) == 18

    killed = tmp_path / "killed"
    shard = killed / OUTPUT / "shards" / "00000-of-00001.rec"
    assert kill_entry_after_first_record(*_overrides(synthetic, killed, *args), shards=shard.parent)
    partial = shard.stat().st_size if shard.exists() else 0

    _entry(*_overrides(synthetic, killed, *args))
    got = _records(killed)
    assert got.keys() == expected.keys()
    for key, record in got.items():
        _check_record(record, fit=160)
        want = expected[key]
        assert set(record) == set(want)
        for field, value in want.items():
            if isinstance(value, np.ndarray):
                assert np.array_equal(record[field], value), (key, field)
            elif field != "path":
                assert record[field] == value, (key, field)
    assert 0 < partial < shard.stat().st_size, "the kill did not land midway"


@pytest.mark.reference
def test_tiny_detic_through_the_stage_keeps_own_class_else_all(synthetic, tmp_path, reference_models):
    from part_distillation.models.detic import DeticConfig, build_detic
    from part_distillation.data.images import load_rgb

    vocab = np.load(reference_models / "detic_tiny_vocab.npy")[:3]  # one embedding per dataset class
    np.save(tmp_path / "vocab.npy", vocab)
    args = ("model=detic_swinb", "model.size=tiny", f"model.weights={reference_models / 'detic_tiny.pth'}",
            f"stage.vocabulary={tmp_path / 'vocab.npy'}", "stage.score_threshold=0.3", "stage.batch_size=3")
    _entry(*_overrides(synthetic, tmp_path, *args))
    records = _records(tmp_path)
    skipped = RecordStore(tmp_path / OUTPUT).skipped()
    assert len(records) + len(skipped) == 18 and set(skipped.values()) <= {"no_detections"}
    assert len(records) >= 10
    names = ["rover", "lantern", "beetle"]
    model = build_detic(reference_models / "detic_tiny.pth", DeticConfig.for_labeling("tiny", score_thresh=0.3),
                        vocabulary=vocab)
    fell_back = 0
    for key, record in sorted(records.items())[:6]:  # independent check: every detection, rule applied here
        _check_record(record)
        assert record["source"] == "detic" and record["pred_class_names"] == [names[c] for c in record["pred_classes"]]
        full = model.predict(load_rgb(record["path"]))[0]
        classes, scores = full.classes.numpy(), full.scores.numpy()
        own = np.flatnonzero(classes == record["class_index"])
        pool = own if len(own) else np.arange(len(classes))
        fell_back += not len(own)
        expected = pool[np.argsort(-scores[pool], kind="stable")][:10]
        assert record["pred_classes"].tolist() == classes[expected].tolist(), key
        assert np.allclose(record["scores"], scores[expected], atol=1e-5)
        assert np.allclose(record["boxes"], full.boxes.numpy()[expected], atol=1e-3)
    for record in records.values():
        pred = record["pred_classes"]
        assert np.all(pred == record["class_index"]) or record["class_index"] not in pred


def test_missing_detic_weights_is_one_line_naming_the_path(synthetic, tmp_path):
    result = _entry(*_overrides(synthetic, tmp_path, "model=detic_swinb"), check=False)
    expected = tmp_path / "weights" / "detic" / "Detic_LCOCOI21k_CLIP_SwinB_896b32_4x_ft4x_max-size.pth"
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(expected) in lines[0] and "weights/README.md" in lines[0]
    assert not (tmp_path / OUTPUT).exists()


def test_seed_script_runs_the_demo_in_process(synthetic, tmp_path):
    env = dict(os.environ, PD_LAUNCHER="basic", PD_EXPERIMENT="demo", JOBS="2", PD_PYTHON=sys.executable,
               PD_DEMO_ROOT=str(tmp_path))
    result = subprocess.run(["bash", str(REPO / "sh_files" / "detic" / "run.sh"), f"data.root={synthetic}",
                             f"hydra.sweep.dir={tmp_path}/sweep"], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    store = RecordStore(tmp_path / OUTPUT)
    assert store.num_shards == 2 and len(store.keys()) == 18
    assert all(r["source"] == "annotations" for r in store.iter_records())
    assert store.config["model"]["name"] == "detic"  # the script's model, the demo's source


@pytest.mark.slurm
def test_seed_script_as_a_slurm_array_on_the_local_cluster(synthetic, tmp_path):
    """A tiny ``sh_files/detic/run.sh``: a 2-task SLURM array over the synthetic dataset."""
    from tests.slurm_cluster import job_logs, require_cluster

    require_cluster()
    sweep = tmp_path / "sweep"
    env = dict(os.environ, PD_LAUNCHER="submitit_slurm", PD_EXPERIMENT="demo", JOBS="2", PD_PYTHON=sys.executable)
    result = subprocess.run(["bash", str(REPO / "sh_files" / "detic" / "run.sh"), f"data.root={synthetic}",
                             f"paths.root={tmp_path}", f"hydra.sweep.dir={sweep}", "launcher.gpus_per_node=0",
                             "launcher.cpus_per_task=1", "launcher.timeout_min=5"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:] + job_logs(sweep)
    store = RecordStore(tmp_path / OUTPUT)
    assert store.num_shards == 2 and store.summary()["shards_closed"] == 2
    per_shard = [list(store.iter_records(shards=[i])) for i in range(2)]
    assert all(records for records in per_shard)
    # by class: each class wholly in one shard
    classes = [{r["wnid"] for r in records} for records in per_shard]
    assert not classes[0] & classes[1] and len(classes[0] | classes[1]) == 3
    records = [r for records in per_shard for r in records]
    assert len(records) == len({r["key"] for r in records}) == 18
    for record in records:
        _check_record(record, fit=256)   # the demo's frame (configs/stage_tuning/demo_detic_labeling.yaml)
        assert record["source"] == "annotations"
