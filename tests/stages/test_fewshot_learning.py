"""The few-shot baseline: starts from the PartDistillation checkpoint's weights, trains on the
reproducible subset it saves, refuses a run folder of other settings or another subset, and
the seed script runs the demo in process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from part_distillation.config import ConfigError, DataConfig, FewshotLearningStageConfig, ModelConfig, RunConfig
from part_distillation.data.labelled_records import fewshot_subset
from part_distillation.data.synthetic import make_synthetic_dataset
from part_distillation.engine import checkpoint as ckpt
from part_distillation.engine.train_loop import Trainer
from part_distillation.models.checkpoint import build_model
from part_distillation.launch import JobContext
from part_distillation.stages import fewshot_learning
from part_distillation.store import ConfigMismatchError

REPO = Path(__file__).resolve().parents[2]
NUM_CLASSES, K = 3, 4  # synthetic: 3 object classes x 4 parts; a PartDistillation head of 3 x 4 + 1


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("fewshot") / "synthetic"
    make_synthetic_dataset(root, num_classes=NUM_CLASSES, images_per_class=4, size=64, parts_per_class=K)
    return root


@pytest.fixture(scope="module")
def pd_run(tmp_path_factory):
    """A stage-6 run folder holding a checkpoint of an object-conditioned tiny model (random
    weights: what matters is that the fine-tuned model starts from exactly these)."""
    run = tmp_path_factory.mktemp("pd_run")
    torch.manual_seed(123)
    model = build_model("tiny", None, num_classes=NUM_CLASSES * K, parts_per_class=K)
    ckpt.save_atomic({"model": model.state_dict(), "iteration": 7}, ckpt.checkpoint_path(run, 7))
    return run


def _cfg(tmp_path, dataset, checkpoint, **stage):
    settings = dict(output=str(tmp_path / "run"), checkpoint=str(checkpoint), dataset_root=str(dataset),
                    split="train", percent=50, subset_seed=0, batch_size=2, per_device_batch=2, max_iter=3,
                    steps=[100], lr=1e-3, image_size=64, num_workers=0, num_points=128, checkpoint_period=3,
                    log_period=1, preview_period=0)
    settings.update(stage)
    return RunConfig(stage=FewshotLearningStageConfig(**settings), data=DataConfig(name="synthetic", root=str(dataset)),
                     model=ModelConfig(name="mask2former", size="tiny", device="cpu"), seed=0)


def test_fine_tuning_trains_the_backbone_at_a_tenth_of_the_learning_rate(tmp_path, dataset, pd_run, monkeypatch):
    cfg = _cfg(tmp_path, dataset, pd_run)
    assert (cfg.stage.backbone_multiplier, cfg.stage.freeze_backbone, cfg.stage.freeze_encoder) == (0.1, False, False)
    built = []
    monkeypatch.setattr(Trainer, "train", lambda trainer, *a, **k: built.append(trainer))  # built, not trained
    fewshot_learning.run(cfg, JobContext())
    by_name = {n: g["lr"] for g in built[0].optimizer.param_groups for n in g["param_names"]}
    backbone = {n: lr for n, lr in by_name.items() if n.startswith("model.pixel_level_module.encoder.")}
    assert backbone and all(lr == pytest.approx(1e-4) for lr in backbone.values())
    assert all(lr == pytest.approx(1e-3) for n, lr in by_name.items() if n not in backbone)


def _images_by_key(dataset):
    """Image key (json id) -> object classes, read from the json independently of the stage:
    the image's ImageNet class (its wnid), as PartImageNet's evaluation keys them, of every
    image with an annotated part."""
    parts = json.loads((dataset / "annotations" / "train.json").read_text())
    wnid = {str(image["id"]): image["wnid"] for image in parts["images"]}
    return {k: [wnid[k]] for k in sorted({str(ann["image_id"]) for ann in parts["annotations"]})}


def test_fine_tuning_starts_from_the_checkpoint_and_trains_on_the_saved_subset(tmp_path, dataset, pd_run,
                                                                               monkeypatch):
    torch.set_num_threads(1)
    start = {}
    real_train = Trainer.train

    def spy(trainer, *args, **kwargs):  # the model as training is about to begin (before step 1)
        start.update({k: v.clone() for k, v in trainer.module.state_dict().items()})
        return real_train(trainer, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train", spy)
    summary = fewshot_learning.run(_cfg(tmp_path, dataset, pd_run), JobContext())
    pd = ckpt.load_checkpoint(ckpt.checkpoint_path(pd_run, 7))["model"]
    body = [k for k in pd if not k.startswith("class_predictor.")]
    assert body and all(torch.equal(start[k], pd[k]) for k in body)
    assert pd["class_predictor.weight"].shape[0] == NUM_CLASSES * K + 1
    assert start["class_predictor.weight"].shape[0] == 13 + 1  # the dataset's part ids 0..12 + no-object
    # it trained: the final checkpoint differs from the start
    final = ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path / "run", 3))["model"]
    assert any(not torch.equal(final[k], pd[k]) for k in body)
    # the subset: 50% of 12 images covering the 3 classes, saved, and what was trained on
    images = _images_by_key(dataset)
    saved = json.loads((tmp_path / "run" / fewshot_learning.SUBSET_FILE).read_text())
    assert saved == fewshot_subset(images, 50, 0) and len(saved) == 6
    assert {c for k in saved for c in images[k]} == {c for v in images.values() for c in v}
    assert summary.extra["images"] == 6 and summary.extra["labelled_images"] == 12
    assert summary.extra["checkpoint"] == str(ckpt.checkpoint_path(pd_run, 7))


def test_reruns_reuse_the_subset_and_other_settings_are_refused(tmp_path, dataset, pd_run):
    torch.set_num_threads(1)
    ckpt_file = ckpt.checkpoint_path(pd_run, 7)
    fewshot_learning.run(_cfg(tmp_path, dataset, ckpt_file, variant="proposal", max_iter=1), JobContext())
    subset_file = tmp_path / "run" / fewshot_learning.SUBSET_FILE
    saved = subset_file.read_text()
    again = fewshot_learning.run(_cfg(tmp_path, dataset, ckpt_file, variant="proposal", max_iter=1), JobContext())
    assert again.extra["resumed_at"] == 1 and subset_file.read_text() == saved
    for key, value in (("percent", 25), ("subset_seed", 1)):
        with pytest.raises(ConfigMismatchError, match=f"stage.{key}"):
            fewshot_learning.run(_cfg(tmp_path, dataset, ckpt_file, variant="proposal", max_iter=1, **{key: value}),
                                 JobContext())
    # the same settings but another subset saved (the labelled split changed): refused, naming the file
    subset_file.write_text(json.dumps(json.loads(saved)[1:]))
    with pytest.raises(ConfigError, match=f"{subset_file}.*another few-shot subset"):
        fewshot_learning.run(_cfg(tmp_path, dataset, ckpt_file, variant="proposal", max_iter=1), JobContext())


def test_a_missing_checkpoint_is_one_line_naming_the_key(tmp_path, dataset):
    with pytest.raises(ConfigError, match="stage.checkpoint"):
        fewshot_learning.check(_cfg(tmp_path, dataset, tmp_path / "no_run"))
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(ConfigError, match="no checkpoint under"):
        fewshot_learning.check(_cfg(tmp_path, dataset, tmp_path / "empty_run"))
    with pytest.raises(ConfigError, match="stage.dataset_root"):
        fewshot_learning.check(_cfg(tmp_path, tmp_path / "no_dataset", tmp_path / "empty_run"))


def test_seed_script_runs_the_demo_in_process(tmp_path, dataset, pd_run):
    env = dict(os.environ, PD_LAUNCHER="basic", PD_EXPERIMENT="demo", NODES="1", PD_PYTHON=sys.executable,
               PD_DEMO_ROOT=str(tmp_path), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run(["bash", str(REPO / "sh_files" / "fewshot_learning" / "train.sh"),
                             f"data.root={dataset}", f"stage.checkpoint={pd_run}", "stage.max_iter=2",
                             "stage.image_size=64", "stage.num_points=128", f"hydra.sweep.dir={tmp_path}/sweep"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "fewshot_learning" / "partimagenet_semantic_25.0pct_seed0"
    assert [i for i, _ in ckpt.list_checkpoints(run_dir)] == [2]
    assert len(json.loads((run_dir / fewshot_learning.SUBSET_FILE).read_text())) == 3  # 25% of 12


@pytest.mark.filterwarnings("ignore:(?s).*is validated against ConfigStore schema")
def test_seed_script_composes_the_reference_job(tmp_path):
    from part_distillation.engine.sampler import accumulation_steps

    from .test_supervised_learning import _composed

    run, plugin = _composed(tmp_path, "fewshot_learning", "stage.percent=10")
    assert {k: plugin.params[k] for k in ("nodes", "tasks_per_node", "gpus_per_node")} == {
        "nodes": 1, "tasks_per_node": 8, "gpus_per_node": 8}
    st = run.stage
    assert (st.name, st.variant, st.percent, st.subset_seed, st.batch_size) == ("fewshot_learning", "semantic", 10, 0, 32)
    assert accumulation_steps(st.batch_size, 8, st.per_device_batch) == 1
    assert st.checkpoint == "/scratch/pd/outputs/part_distillation/imagenet_22k_train"
    assert st.output == "/scratch/pd/outputs/fewshot_learning/partimagenet_semantic_10.0pct_seed0"


@pytest.mark.parametrize("settings, key", [({"percent": 0}, "stage.percent"), ({"percent": 150}, "stage.percent"),
                                           ({"variant": "instance"}, "stage.variant"),
                                           ({"importance_sample_ratio": 2.0}, "stage.importance_sample_ratio")])
def test_settings_out_of_range_are_refused_naming_the_key(tmp_path, settings, key):
    from omegaconf import OmegaConf

    from part_distillation.config import validate

    with pytest.raises(ConfigError, match=key):
        validate(OmegaConf.structured(_cfg(tmp_path, tmp_path, tmp_path, **settings)))
