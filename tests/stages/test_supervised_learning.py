"""The supervised baseline on the synthetic dataset's PartImageNet-format json: both variants
train (the loss falls), write checkpoints the project's loader reads, resume, and the seed
script runs the demo in process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from part_distillation.config import ConfigError, DataConfig, ModelConfig, RunConfig, SupervisedLearningStageConfig
from part_distillation.data.synthetic import make_synthetic_dataset
from part_distillation.engine import checkpoint as ckpt
from part_distillation.engine.train_loop import Trainer
from part_distillation.models.checkpoint import build_model
from part_distillation.launch import JobContext
from part_distillation.models.checkpoint import load_project_checkpoint
from part_distillation.stages import supervised_learning
from part_distillation.store import ConfigMismatchError

REPO = Path(__file__).resolve().parents[2]
NUM_CLASSES, K = 3, 4  # synthetic: 3 object classes x 4 parts, part category ids 1..12


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("supervised") / "synthetic"
    make_synthetic_dataset(root, num_classes=NUM_CLASSES, images_per_class=4, size=64, parts_per_class=K)
    return root


def _cfg(tmp_path, dataset, **stage):
    settings = dict(output=str(tmp_path / "run"), dataset_root=str(dataset), split="train", batch_size=2,
                    per_device_batch=2, max_iter=30, steps=[100], lr=3e-3, image_size=64, num_workers=0,
                    num_points=256, checkpoint_period=15, keep_last=2, log_period=1, preview_period=0)
    settings.update(stage)
    return RunConfig(stage=SupervisedLearningStageConfig(**settings),
                     data=DataConfig(name="synthetic", root=str(dataset)),
                     model=ModelConfig(name="mask2former", size="tiny", device="cpu"), seed=0)


def _losses(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return [e.value for e in events.Scalars("loss/total_loss")]


@pytest.mark.parametrize("variant, head", [("proposal", 1 + 1), ("semantic", 13 + 1)])
def test_both_variants_train_and_write_loadable_checkpoints(tmp_path, dataset, variant, head):
    torch.set_num_threads(1)
    summary = supervised_learning.run(_cfg(tmp_path, dataset, variant=variant), JobContext())
    run_dir = tmp_path / "run"
    assert summary.extra["iterations"] == 30 and summary.extra["images"] == NUM_CLASSES * 4
    losses = _losses(run_dir)
    assert len(losses) == 30
    first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    print(f"{variant}: loss {first:.2f} -> {last:.2f}")
    assert last < 0.9 * first, (first, last)
    assert [i for i, _ in ckpt.list_checkpoints(run_dir)] == [15, 30]
    final = ckpt.checkpoint_path(run_dir, 30)
    # proposal: one class + no-object; semantic: the dataset's part ids 0..12 (0 unused) + no-object
    assert ckpt.load_checkpoint(final)["model"]["class_predictor.weight"].shape[0] == head
    model = build_model("tiny", None, num_classes=head - 1)
    report = load_project_checkpoint(model, final)  # strict: every weight fits
    assert not report.missing and not report.unexpected
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stage"] == "supervised_learning" and manifest["config"]["stage"]["variant"] == variant
    names = run_dir / supervised_learning.PART_CLASSES_FILE
    if variant == "semantic":
        categories = json.loads((dataset / "annotations" / "train.json").read_text())["categories"]
        expected = [""] + [c["name"] for c in sorted(categories, key=lambda c: c["id"])]  # ids 1..12
        assert json.loads(names.read_text())["part_names"] == expected
    else:
        assert not names.exists()
    # a finished run resumes at its end; another training setting is refused, naming the key
    again = supervised_learning.run(_cfg(tmp_path, dataset, variant=variant), JobContext())
    assert again.extra["resumed_at"] == 30 and again.seen == 0
    with pytest.raises(ConfigMismatchError, match="stage.importance_sample_ratio"):
        supervised_learning.run(_cfg(tmp_path, dataset, variant=variant, importance_sample_ratio=0.0), JobContext())


def test_the_backbone_trains_at_a_tenth_of_the_learning_rate(tmp_path, dataset, monkeypatch):
    """The reference's BACKBONE_MULTIPLIER 0.1: nothing is frozen in the baselines, so the Swin
    backbone's parameter groups get lr x 0.1 (at construction and at every step)."""
    cfg = _cfg(tmp_path, dataset, variant="proposal", max_iter=1, lr=2e-3)
    assert (cfg.stage.backbone_multiplier, cfg.stage.freeze_backbone) == (0.1, False)
    real_train = Trainer.train

    def check_then_train(trainer, *args, **kwargs):  # the trainer as the wiring built it
        groups = trainer.optimizer.param_groups
        backbone = [g for g in groups
                    if all(n.startswith("model.pixel_level_module.encoder.") for n in g["param_names"])]
        assert backbone and sum(len(g["params"]) for g in backbone) == sum(
            1 for n, _ in trainer.module.named_parameters() if n.startswith("model.pixel_level_module.encoder."))
        assert all(g["lr"] == pytest.approx(2e-4) for g in backbone)
        assert all(g["lr"] == pytest.approx(2e-3) for g in groups if g not in backbone)
        real_train(trainer, *args, **kwargs)  # one step: the schedule sets each group's lr with its scale
        assert all(g["lr"] == pytest.approx(2e-4) for g in backbone)
        assert all(g["lr"] == pytest.approx(2e-3) for g in groups if g not in backbone)
        checked.append(trainer.iter)

    checked = []
    monkeypatch.setattr(Trainer, "train", check_then_train)
    supervised_learning.run(cfg, JobContext())
    assert checked == [1]


def test_a_missing_dataset_is_one_line_naming_the_path(tmp_path):
    with pytest.raises(ConfigError, match="stage.dataset_root"):
        supervised_learning.check(_cfg(tmp_path, tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        supervised_learning.run(_cfg(tmp_path, tmp_path / "nowhere"), JobContext())


def test_seed_script_runs_the_demo_in_process(tmp_path, dataset):
    env = dict(os.environ, PD_LAUNCHER="basic", PD_EXPERIMENT="demo", NODES="1", PD_PYTHON=sys.executable,
               PD_DEMO_ROOT=str(tmp_path), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run(["bash", str(REPO / "sh_files" / "supervised_learning" / "train.sh"), "proposal",
                             f"data.root={dataset}", "stage.max_iter=2", "stage.image_size=64",
                             "stage.num_points=128", f"hydra.sweep.dir={tmp_path}/sweep"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "supervised_learning" / "partimagenet_proposal"
    assert [i for i, _ in ckpt.list_checkpoints(run_dir)] == [2]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["config"]["model"]["size"] == "tiny" and manifest["config"]["stage"]["lr"] == 1e-3
    assert manifest["config"]["stage"]["variant"] == "proposal"


def _composed(tmp_path, script, *args):
    """The job ``script`` composes by default (PD_PYTHON replaced by a script that prints its arguments)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    import part_distillation.__main__ as entry
    from part_distillation.config import register_configs, validate

    echo = tmp_path / "echo_python"
    echo.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    echo.chmod(0o755)
    result = subprocess.run(["bash", str(REPO / "sh_files" / script / "train.sh"), *args, "paths.root=/scratch/pd"],
                            env={**os.environ, "PD_PYTHON": str(echo)}, capture_output=True, text=True, check=True)
    overrides = result.stdout.splitlines()[3:]
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=entry.config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=overrides + ["hydra.sweep.dir=/scratch/pd/sweep"], return_hydra_config=True)
        run = validate(compose("config", overrides=overrides))
    return run, instantiate(cfg.hydra.launcher)


@pytest.mark.filterwarnings("ignore:(?s).*is validated against ConfigStore schema")
@pytest.mark.parametrize("args, variant", [((), "semantic"), (("proposal",), "proposal")])
def test_seed_script_composes_the_reference_job(tmp_path, args, variant):
    from part_distillation.engine.sampler import accumulation_steps

    run, plugin = _composed(tmp_path, "supervised_learning", *args)
    assert type(plugin).__name__ == "SlurmLauncher"
    assert {k: plugin.params[k] for k in ("nodes", "tasks_per_node", "gpus_per_node")} == {
        "nodes": 4, "tasks_per_node": 8, "gpus_per_node": 8}
    st = run.stage
    assert (st.name, st.variant, run.model.size, run.model.weights.endswith("swinL_i21k_q200_e100.pkl")) == (
        "supervised_learning", variant, "swinl", True)
    assert (st.batch_size, st.lr, st.max_iter, st.importance_sample_ratio) == (128, 1e-4, 20_000, 0.75)
    assert (st.freeze_backbone, st.freeze_encoder) == (False, False)  # the reference froze nothing
    assert accumulation_steps(st.batch_size, 4 * 8, st.per_device_batch) == 1
    assert st.output == f"/scratch/pd/outputs/supervised_learning/partimagenet_{variant}"
