"""The one training wiring (``stages/training.py``): every training stage's ``run()`` is a call
of :func:`train_stage` with what differs; the engine's settings come from ``stage.*`` in one place."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from part_distillation.config import (DataConfig, FewshotLearningStageConfig, ModelConfig, PartDistillationStageConfig,
                                      ProposalLearningStageConfig, RunConfig, SupervisedLearningStageConfig)
from part_distillation.data.labelled_records import part_class_labels
from part_distillation.engine.recipe import TrainingRecipe
from part_distillation.launch import JobContext
from part_distillation.stages import (fewshot_learning, part_distillation, proposal_learning, supervised_learning,
                                      training)


def _run_cfg(stage, tmp_path):
    return RunConfig(stage=stage, data=DataConfig(name="synthetic", root=str(tmp_path / "images")),
                     model=ModelConfig(name="mask2former", size="tiny", device="cpu", weights="coco.pkl"), seed=3)


@pytest.fixture
def wiring(monkeypatch):
    """Replaces the wiring in the stage modules: records each call, runs its ``after_setup``."""
    calls = []

    def fake(cfg, context, **kwargs):
        calls.append(kwargs)
        Path(cfg.stage.output).mkdir(parents=True, exist_ok=True)  # as the run folder's manifest check does
        if kwargs.get("after_setup"):
            kwargs["after_setup"]()
        return "summary"

    for module in (proposal_learning, part_distillation, supervised_learning):
        monkeypatch.setattr(module, "train_stage", fake)
    return calls


def test_proposal_learning_trains_one_class_through_the_wiring(tmp_path, wiring, monkeypatch):
    monkeypatch.setattr(proposal_learning, "training_dataset", lambda cfg: "records")
    cfg = _run_cfg(ProposalLearningStageConfig(input="in", output=str(tmp_path / "run")), tmp_path)
    assert proposal_learning.run(cfg, JobContext()) == "summary"
    (call,) = wiring
    assert (call["dataset"], call["num_classes"], call.get("parts_per_class")) == ("records", 1, None)
    assert (call["weights"], call["evaluation"]) == ("coco.pkl", "proposal")


def test_part_distillation_trains_c_times_k_conditioned_classes_through_the_wiring(tmp_path, wiring, monkeypatch):
    monkeypatch.setattr(part_distillation, "object_classes", lambda cfg: ("n01", "n02", "n03"))
    monkeypatch.setattr(part_distillation, "training_dataset", lambda cfg, classes: ("records", classes))
    cfg = _run_cfg(PartDistillationStageConfig(input="in", output=str(tmp_path / "run"), parts_per_class=4), tmp_path)
    part_distillation.run(cfg, JobContext())
    (call,) = wiring
    assert (call["dataset"], call["num_classes"], call["parts_per_class"]) == (("records", 3), 12, 4)
    assert (call["evaluation"], tuple(call["class_wnids"])) == ("part_distillation", ("n01", "n02", "n03"))
    assert call["extra"] == {"object_classes": 3, "parts_per_class": 4}
    # after_setup kept the head's classes in the run folder
    assert json.loads((tmp_path / "run" / "classes.json").read_text())["wnids"] == ["n01", "n02", "n03"]


def _fake_split(monkeypatch, records):
    split = SimpleNamespace(num_parts=13, part_names=[f"p{i}" for i in range(13)])
    monkeypatch.setattr(supervised_learning, "open_split", lambda stage: split)
    monkeypatch.setattr(supervised_learning, "training_records", lambda stage, split: records)
    monkeypatch.setattr(supervised_learning, "PartRecordDataset",
                        lambda sources, **kw: ("dataset", [len(s) for s in sources], kw["labels"]))


@pytest.mark.parametrize("variant, classes", [("semantic", 13), ("proposal", 1)])
def test_the_supervised_baseline_trains_its_variants_classes_through_the_wiring(tmp_path, wiring, monkeypatch,
                                                                               variant, classes):
    _fake_split(monkeypatch, [{"key": "a"}, {"key": "b"}])
    cfg = _run_cfg(SupervisedLearningStageConfig(output=str(tmp_path / "run"), variant=variant), tmp_path)
    supervised_learning.run(cfg, JobContext())
    (call,) = wiring
    assert (call["num_classes"], call.get("parts_per_class"), call["weights"]) == (classes, None, "coco.pkl")
    assert call["dataset"][1] == [2] and (call["dataset"][2] is part_class_labels) == (variant == "semantic")
    assert call["importance_sample_ratio"] == 0.75 and call.get("evaluation") is None
    assert call["extra"] == {"variant": variant, "classes": classes}
    assert (tmp_path / "run" / supervised_learning.PART_CLASSES_FILE).exists() == (variant == "semantic")


def test_the_fewshot_baseline_trains_its_subset_from_the_checkpoint_through_the_wiring(tmp_path, wiring,
                                                                                       monkeypatch):
    records = [{"key": f"k{i}", "object_classes": [f"c{i % 2}"]} for i in range(10)]
    _fake_split(monkeypatch, records)
    monkeypatch.setattr(fewshot_learning, "resolve_checkpoint", lambda path, **kw: Path("pd/model_0000007.pth"))
    cfg = _run_cfg(FewshotLearningStageConfig(output=str(tmp_path / "run"), percent=20), tmp_path)
    fewshot_learning.run(cfg, JobContext())
    (call,) = wiring
    assert (call["num_classes"], call["weights"]) == (13, str(Path("pd/model_0000007.pth")))
    assert call["dataset"][1] == [2]  # 20 % of 10 images
    assert call["summary"].extra["labelled_images"] == 10
    assert len(json.loads((tmp_path / "run" / fewshot_learning.SUBSET_FILE).read_text())) == 2


def test_the_recipe_is_the_stage_settings_as_plain_values(tmp_path):
    stage = ProposalLearningStageConfig(input="in", output=str(tmp_path / "run"), batch_size=16, per_device_batch=4,
                                        lr=2e-4, steps=[7, 9], max_iter=10, eval_period=5, checkpoint_minutes=2.5,
                                        amp=False, clip_grad_norm=0.0)
    recipe = training.recipe_from_config(_run_cfg(stage, tmp_path))
    assert isinstance(recipe, TrainingRecipe) and recipe.seed == 3 and recipe.steps == (7, 9)
    assert (recipe.name, recipe.run_dir, recipe.batch_size, recipe.per_device_batch, recipe.lr) == (
        "proposal_learning", str(tmp_path / "run"), 16, 4, 2e-4)
    assert (recipe.eval_period, recipe.checkpoint_minutes, recipe.amp, recipe.clip_grad_norm) == (5, 2.5, False, 0.0)
    # every TrainingRecipe field but the seed is a stage setting of the same name, read as given
    for field in TrainingRecipe.__dataclass_fields__:
        if field not in ("seed", "name", "run_dir", "steps"):
            assert getattr(recipe, field) == getattr(stage, field), field
