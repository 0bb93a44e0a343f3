"""Stage 6 on synthetic PART_LABELS records: the loss falls, the object-conditioned head is
what is trained, kill -9 + resume equals an uninterrupted run, the seed script runs the demo
in process and composes the reference SLURM job."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

import part_distillation.__main__ as entry
from part_distillation.config import register_configs, validate
from part_distillation.data.part_records import PartRecordDataset, RecordFilter, collate
from part_distillation.data.transforms import AugmentConfig
from part_distillation.engine import checkpoint as ckpt
from part_distillation.models.checkpoint import build_model
from part_distillation.stages.training import conditioned_forward, mask2former_loss, reference_criterion
from part_distillation.engine.sampler import accumulation_steps
from part_distillation.launch import JobContext
from part_distillation.stages import part_distillation
from part_distillation.store import RecordStore

from ..data.part_fixtures import write_part_labels
from .part_distillation_job import config

REPO = Path(__file__).resolve().parents[2]
# Our hydra/launcher/submitit_*.yaml extend the plugin's schema of the same name on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:(?s).*is validated against ConfigStore schema")

NUM_CLASSES, K = 3, 4  # the synthetic dataset: 3 object classes with 4 parts each


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage6")
    out = write_part_labels(root / "synthetic", root / "records", num_classes=NUM_CLASSES, images_per_class=3)
    return out, root / "synthetic"


def _scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events, [e.value for e in events.Scalars(tag)]


def test_fixture_records_carry_the_synthetic_part_classes(records):
    store = RecordStore(records[0])
    by_class = {}
    for record in store.iter_records():
        assert set(record["cluster_ids"].tolist()) <= set(range(K))
        by_class.setdefault(record["class_index"], set()).update(record["cluster_ids"].tolist())
        # parts tile the object (small overlap); both ratios over the square canvas
        assert np.isclose(record["part_ratios"].sum(), record["object_ratio"], rtol=0.05)
    assert sorted(by_class) == list(range(NUM_CLASSES)) and all(ids == set(range(K)) for ids in by_class.values())


def test_training_images_are_padded_to_the_square_canvas_before_augmentation(tmp_path, records):
    """SET_IMAGE_SQUARE: stage 6 augments the fitted image padded to the grey canvas (stage 4 does not)."""
    from part_distillation.stages import proposal_learning

    dataset = part_distillation.training_dataset(config(*records, tmp_path / "run"), NUM_CLASSES)
    assert dataset.augment.square_canvas and dataset.augment.size == 64
    assert not proposal_learning.training_dataset(config(*records, tmp_path / "run")).augment.square_canvas
    sample = dataset[(0, 0)]
    assert tuple(sample["image"].shape) == (3, 64, 64) and sample["masks"].shape[1:] == (64, 64)


def test_loss_falls_over_a_few_hundred_iterations(tmp_path, records):
    torch.set_num_threads(1)
    # part ratios are over the canvas and the fixture's small objects have parts of 0.4..7% of it:
    # the single-node script's 0.001 keeps every part, so the K part classes are all learnt
    cfg = config(*records, tmp_path / "run", max_iter=300, steps=[250], checkpoint_period=150, preview_period=150,
                 deterministic=False, min_part_area_ratio=0.001)
    summary = part_distillation.run(cfg, JobContext())
    assert summary.extra["iterations"] == 300
    assert (summary.extra["object_classes"], summary.extra["parts_per_class"]) == (NUM_CLASSES, K)
    events, losses = _scalars(tmp_path / "run", "loss/total_loss")
    assert len(losses) == 300
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    seconds_per_iter = 2 / np.median(_scalars(tmp_path / "run", "train/images_per_s")[1])
    print(f"stage 6 loss {first:.2f} -> {last:.2f} (first/last 20 iterations; first {losses[0]:.2f}, "
          f"last {losses[-1]:.2f}); {seconds_per_iter:.3f} s/iteration at batch 2, 64 px, tiny model")
    assert last < 0.6 * first, (first, last)
    assert {"preview/parts", "preview/targets"} <= set(events.Tags()["images"])
    final = ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path / "run", 300))
    assert final["model"]["class_predictor.weight"].shape[0] == NUM_CLASSES * K + 1  # C x K + 1 outputs
    # the trained model names the right part: per target part, the class of its best-matching query
    model = build_model("tiny", None, num_classes=NUM_CLASSES * K, parts_per_class=K)
    untrained_accuracy = _part_class_accuracy(model, records[0])
    model.load_state_dict(final["model"])
    accuracy = _part_class_accuracy(model, records[0])
    print(f"part-class accuracy of the best-matching query: untrained {untrained_accuracy:.2f}, "
          f"trained {accuracy:.2f} (chance {1 / K:.2f})")
    assert accuracy > max(0.5, untrained_accuracy + 0.2), (untrained_accuracy, accuracy)


def _part_class_accuracy(model, records) -> float:
    """Over target parts: the best-IoU query's argmax over the K part logits is the part's cluster id."""
    dataset = PartRecordDataset([records], augment=AugmentConfig(size=64), labels=part_distillation.cluster_labels,
                                filter=RecordFilter(inclusive=True, min_part_ratio=0.001), seed=1)
    model.eval()
    hits = []
    with torch.no_grad():
        for index in range(len(dataset)):
            sample = dataset[(0, index)]
            batch = collate([sample])
            out = model(batch["pixel_values"], object_class=batch["class_indices"])
            pred = torch.nn.functional.interpolate(out["pred_masks"], size=(64, 64), mode="bilinear")[0] > 0
            target = sample["masks"]
            inter = (pred[:, None] & target[None]).flatten(2).sum(-1).float()
            union = (pred[:, None] | target[None]).flatten(2).sum(-1).float()
            best_query = (inter / union.clamp(min=1)).argmax(0)
            hits += (out["pred_logits"][0, best_query, :K].argmax(-1) == sample["labels"]).tolist()
    return float(np.mean(hits))


def test_the_loss_uses_each_images_own_conditioned_rows(records):
    """Through the stage's forward: logits are (B, Q, K + 1) and equal the selected rows of the
    full head; a class absent from the batch gets no gradient, the present ones and no-object do."""
    torch.manual_seed(0)
    model = build_model("tiny", None, num_classes=NUM_CLASSES * K, parts_per_class=K)
    dataset = PartRecordDataset([records[0]], augment=AugmentConfig(size=64), labels=part_distillation.cluster_labels,
                                filter=RecordFilter(inclusive=True, min_part_ratio=0.05), seed=0)
    by_class = {}
    for index in range(len(dataset)):
        by_class.setdefault(int(dataset.record(index)["class_index"]), index)
    batch = collate([dataset[(0, by_class[0])], dataset[(0, by_class[2])]])
    assert batch["class_indices"].tolist() == [0, 2]
    device = torch.device("cpu")
    out = conditioned_forward(device)(model, batch)
    queries = out["query_embeddings"]
    assert out["pred_logits"].shape == (2, queries.shape[1], K + 1)
    assert all(aux["pred_logits"].shape == (2, queries.shape[1], K + 1) for aux in out["aux_outputs"])
    full = queries @ model.class_predictor.weight.T + model.class_predictor.bias  # all C*K+1 logits
    for b, c in enumerate((0, 2)):
        rows = list(range(c * K, (c + 1) * K)) + [NUM_CLASSES * K]
        torch.testing.assert_close(out["pred_logits"][b], full[b][:, rows])
    loss_fn = mask2former_loss(reference_criterion(num_classes=K, num_points=256), device,
                               forward=conditioned_forward(device))
    losses = loss_fn(model, batch)
    sum(v for k, v in losses.items() if k.startswith("loss")).backward()
    grad = model.class_predictor.weight.grad.abs().sum(1)
    assert torch.all(grad[K:2 * K] == 0)  # class 1: not in the batch
    assert torch.all(grad[:K] > 0) and torch.all(grad[2 * K:3 * K] > 0) and grad[-1] > 0


def test_class_index_outside_the_dataset_is_a_clear_error(tmp_path, records):
    record = {"key": "a.png", "class_index": 7, "cluster_ids": np.array([0, 1])}
    with pytest.raises(ValueError, match="class_index 7 is outside the 3 classes"):
        part_distillation.checked_cluster_labels(record, num_classes=3, parts_per_class=4)
    with pytest.raises(ValueError, match="stage.parts_per_class"):
        part_distillation.checked_cluster_labels({**record, "class_index": 1, "cluster_ids": np.array([0, 4])},
                                                 num_classes=3, parts_per_class=4)


def test_number_of_object_classes_comes_from_the_class_folders_not_the_images(tmp_path, records, monkeypatch):
    """C from the synthetic tree's class list without listing a single image (a 14 M-image
    tree must not be walked once per process); an empty tree is a clear error."""
    from part_distillation.config import DataConfig, RunConfig
    from part_distillation.data import imagenet

    def no_image_listing(*args, **kwargs):
        raise AssertionError("num_object_classes listed the images of a class folder")

    monkeypatch.setattr(imagenet, "_image_files", no_image_listing)
    cfg = RunConfig(stage=None, data=DataConfig(name="synthetic", root=str(records[1])))
    assert part_distillation.num_object_classes(cfg) == NUM_CLASSES
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(imagenet.ImageTreeError, match="no class folders"):
        part_distillation.num_object_classes(RunConfig(stage=None, data=DataConfig(name="x", root=str(tmp_path / "empty"))))


def _job(records, run_dir, *args, expect_kill=False):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "tests.stages.part_distillation_job", str(records[0]),
                           str(records[1]), str(run_dir), *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == (-9 if expect_kill else 0), proc.stderr[-3000:]


def _losses(run_dir):
    out = {}
    for line in (Path(run_dir) / "losses.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["iter"]] = row["loss"]  # a re-run iteration replaces the one lost in the crash
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, records):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    _job(records, run_dir)
    return run_dir


def _assert_same_run(run_dir, reference):
    assert _losses(run_dir) == _losses(reference)  # bitwise, every iteration
    assert sorted(_losses(run_dir)) == list(range(12))
    a, b = (ckpt.load_checkpoint(ckpt.checkpoint_path(d, 12)) for d in (run_dir, reference))
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


@pytest.mark.parametrize("kill", ["kill_after_iter 7", "kill_during_save 9"])
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, records, uninterrupted, kill):
    _job(records, tmp_path, *kill.split(), expect_kill=True)
    assert [i for i, _ in ckpt.list_checkpoints(tmp_path)] == [3, 6]
    _job(records, tmp_path)
    _assert_same_run(tmp_path, uninterrupted)
    assert [i for i, _ in ckpt.list_checkpoints(tmp_path)] == [9, 12]


def test_seed_script_runs_the_demo_in_process(tmp_path, records):
    env = dict(os.environ, PD_LAUNCHER="basic", PD_EXPERIMENT="demo", NODES="1", JOBS="2",
               PD_PYTHON=sys.executable, PD_DEMO_ROOT=str(tmp_path), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run(["bash", str(REPO / "sh_files" / "part_distillation_training" / "train.sh"),
                             f"data.root={records[1]}", f"stage.input={records[0]}", "stage.max_iter=20",
                             f"hydra.sweep.dir={tmp_path}/sweep"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "part_distillation" / "synthetic_train"
    assert [i for i, _ in ckpt.list_checkpoints(run_dir)] == [20]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    config = manifest["config"]
    assert config["model"]["size"] == "efficientnet_lite0" and config["stage"]["image_size"] == 192


def _script_overrides(tmp_path, **env) -> list[str]:
    """The command line train.sh runs (PD_PYTHON replaced by a script that prints its arguments)."""
    echo = tmp_path / "echo_python"
    echo.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    echo.chmod(0o755)
    result = subprocess.run(["bash", str(REPO / "sh_files" / "part_distillation_training" / "train.sh"),
                             "paths.root=/scratch/pd"],
                            env={**os.environ, "PD_PYTHON": str(echo), **env}, capture_output=True, text=True,
                            check=True)
    args = result.stdout.splitlines()
    assert args[:3] == ["-m", "part_distillation", "-m"]
    return args[3:]


@pytest.mark.parametrize("nodes", [None, "8"])
def test_seed_script_composes_the_reference_slurm_job(tmp_path, nodes):
    overrides = _script_overrides(tmp_path, **({"NODES": nodes} if nodes else {}))
    assert "hydra/launcher=submitit_slurm" in overrides and "experiment=in22k" in overrides
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=entry.config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=overrides + ["hydra.sweep.dir=/scratch/pd/sweep"], return_hydra_config=True)
        run = validate(compose("config", overrides=overrides))
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    expected_nodes = int(nodes or 4)
    expected = {"nodes": expected_nodes, "tasks_per_node": 8, "gpus_per_node": 8, "cpus_per_task": 10,
                "timeout_min": 4320}
    plugin = instantiate(cfg.hydra.launcher)
    assert type(plugin).__name__ == "SlurmLauncher" and launcher["name"] == "pd_part_distillation"
    assert {k: plugin.params[k] for k in expected} == expected
    assert run.stage.name == "part_distillation" and (run.model.size, run.model.weights is not None) == ("swinl", True)
    assert (run.stage.batch_size, run.stage.max_iter, run.stage.steps) == (256, 120_000, [100_000, 110_000])
    assert (run.stage.parts_per_class, run.stage.min_object_area_ratio, run.stage.min_part_area_ratio) == (8, 0.05, 0.05)
    assert run.stage.input.endswith("part_labels/part_ranking/imagenet_22k_train")
    # 4 nodes x 8 GPUs x 8 images = 256: no accumulation; on 8 nodes the batch must be split further
    if expected_nodes == 4:
        assert accumulation_steps(run.stage.batch_size, expected_nodes * 8, run.stage.per_device_batch) == 1
    else:
        with pytest.raises(ValueError, match="per_device_batch"):
            accumulation_steps(run.stage.batch_size, expected_nodes * 8, run.stage.per_device_batch)
        assert accumulation_steps(run.stage.batch_size, expected_nodes * 8, 4) == 1
