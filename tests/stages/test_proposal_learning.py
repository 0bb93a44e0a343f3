"""Stage 4 on the synthetic dataset: the loss falls; outputs, resume and config checks."""
import numpy as np
import pytest
import torch

from part_distillation.data.part_records import PartRecordDataset, collate
from part_distillation.data.transforms import AugmentConfig
from part_distillation.config import DataConfig, ModelConfig, ProposalLearningStageConfig, RunConfig
from part_distillation.engine import checkpoint as ckpt
from part_distillation.models.checkpoint import build_model
from part_distillation.launch import JobContext
from part_distillation.stages import proposal_learning
from part_distillation.store import ConfigMismatchError

from ..data.part_fixtures import write_part_segments


def _cfg(tmp_path, records, **stage):
    settings = dict(input=str(records), output=str(tmp_path / "run"), batch_size=2, per_device_batch=2,
                    max_iter=200, steps=[150], lr=1e-3, image_size=64, num_workers=0, num_points=256,
                    checkpoint_period=100, keep_last=2, log_period=1, preview_period=100, deterministic=False)
    settings.update(stage)
    return RunConfig(stage=ProposalLearningStageConfig(**settings),
                     data=DataConfig(name="synthetic", root=str(tmp_path / "synthetic")),
                     model=ModelConfig(name="mask2former", size="tiny", device="cpu"), seed=0)


def _part_recall(model, dataset, size=64):
    """Mean over target parts of the best IoU of any predicted mask (logit > 0), epoch-0 views."""
    model.eval()
    best = []
    with torch.no_grad():
        for index in range(len(dataset)):
            sample = dataset[(0, index)]
            batch = collate([sample])
            logits = model(batch["pixel_values"])["pred_masks"]
            pred = torch.nn.functional.interpolate(logits, size=(size, size), mode="bilinear")[0] > 0
            target = sample["masks"]
            inter = (pred[:, None] & target[None]).flatten(2).sum(-1).float()
            union = (pred[:, None] | target[None]).flatten(2).sum(-1).float()
            best += (inter / union.clamp(min=1)).max(0).values.tolist()
    return float(np.mean(best))


def _scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events, [e.value for e in events.Scalars(tag)]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage4")
    return write_part_segments(root / "synthetic", root / "records", num_classes=2, images_per_class=4)


def test_extra_inputs_are_read_together_with_the_input(tmp_path, records):
    """The reference's two label sets (ImageNet-21k + ImageNet-1k stage-3 records): every record of
    stage.input and of each stage.extra_inputs folder is a training sample."""
    from part_distillation.store import RecordStore

    second = write_part_segments(tmp_path / "other", tmp_path / "other_records", num_classes=1, images_per_class=3,
                                 seed=5)
    alone = proposal_learning.training_dataset(_cfg(tmp_path, records))
    both = proposal_learning.training_dataset(_cfg(tmp_path, records, extra_inputs=[str(second)]))
    extra = RecordStore(second)
    assert len(both.stores) == 2 and len(both) == len(alone) + sum(1 for _ in extra.iter_records()) == len(alone) + 3
    assert sorted(i for i, _ in both.entries).count(1) == 3
    index = next(i for i, (store, _) in enumerate(both.entries) if store == 1)
    assert both.record(index)["path"].startswith(str(tmp_path / "other"))
    sample = both[(0, index)]
    assert tuple(sample["image"].shape) == (3, 64, 64) and len(sample["labels"]) >= 1


def test_in22k_documents_the_imagenet_1k_records_as_a_second_input(tmp_path):
    """configs/stage_tuning/in22k_proposal_learning.yaml: the override it gives resolves under paths.*,
    and a missing extra input is refused before anything runs, naming the key."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import part_distillation.__main__ as entry
    from part_distillation.config import register_configs, validate
    from part_distillation.launch import PreflightError, check_job

    tuning = Path(entry.config_dir()) / "stage_tuning" / "in22k_proposal_learning.yaml"
    documented = next(line.strip().strip("#").strip().strip("'") for line in tuning.read_text().splitlines()
                      if "stage.extra_inputs=" in line)
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=entry.config_dir(), version_base="1.3"):
        plain = validate(compose("config", overrides=["stage=proposal_learning", "experiment=in22k",
                                                      f"paths.root={tmp_path}"]))
        run = validate(compose("config", overrides=["stage=proposal_learning", "experiment=in22k",
                                                    f"paths.root={tmp_path}", documented]))
    GlobalHydra.instance().clear()
    assert plain.stage.extra_inputs == []
    in1k = f"{tmp_path}/pseudo_labels/part_labels/proposal_generation_dcrf/imagenet_1k_train"
    assert run.stage.extra_inputs == [in1k]
    assert run.stage.input == f"{tmp_path}/pseudo_labels/part_labels/proposal_generation_dcrf/imagenet_22k_train"
    Path(run.stage.input).mkdir(parents=True)
    with pytest.raises(PreflightError, match=rf"^input {in1k} \(stage.extra_inputs\) does not exist"):
        check_job(run)


def test_loss_falls_over_a_few_hundred_iterations(tmp_path, records):
    torch.set_num_threads(1)
    summary = proposal_learning.run(_cfg(tmp_path, records), JobContext())
    assert summary.extra["iterations"] == 200
    run_dir = tmp_path / "run"
    events, losses = _scalars(run_dir, "loss/total_loss")
    assert len(losses) == 200
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    assert last < 0.6 * first, (first, last)
    for tag in ("loss/loss_ce", "loss/loss_mask", "loss/loss_dice", "train/lr", "train/images_per_s",
                "train/data_time"):
        assert tag in events.Tags()["scalars"]
    assert _scalars(run_dir, "train/lr")[1][-1] == pytest.approx(1e-4)  # x0.1 after step 150
    assert {"preview/parts", "preview/targets"} <= set(events.Tags()["images"])
    assert [i for i, _ in ckpt.list_checkpoints(run_dir)] == [100, 200]
    final = ckpt.load_checkpoint(ckpt.checkpoint_path(run_dir, 200))
    assert final["model"]["class_predictor.weight"].shape[0] == 2  # one part class + no-object
    # the trained model's masks overlap the true parts better than the untrained one's
    dataset = PartRecordDataset([records], augment=AugmentConfig(size=64), seed=1)
    torch.manual_seed(0)
    untrained = build_model("tiny", None)
    trained = build_model("tiny", None)
    trained.load_state_dict(final["model"])
    before, after = _part_recall(untrained, dataset), _part_recall(trained, dataset)
    print(f"part recall (mean best IoU): untrained {before:.3f}, trained {after:.3f}; "
          f"loss {first:.2f} -> {last:.2f}")
    assert after > before + 0.1, (before, after)
    # rerunning the finished run resumes at the end and trains nothing more
    again = proposal_learning.run(_cfg(tmp_path, records), JobContext())
    assert again.extra["resumed_at"] == 200 and again.seen == 0
    # a run folder made with another training config is refused, naming the key
    with pytest.raises(ConfigMismatchError, match="stage.lr"):
        proposal_learning.run(_cfg(tmp_path, records, lr=5e-4), JobContext())
