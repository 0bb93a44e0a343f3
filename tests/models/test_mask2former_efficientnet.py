"""The pretrained CPU Mask2Former: EfficientNet-Lite0 (pip ImageNet weights) under the pixel decoder.

Strict weight loading, a frozen backbone that stays frozen (batch norm included), learning on a
toy target, the object-conditioned head, save/load, and a stage-4 run used through ``predict``.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from part_distillation.config import DataConfig, ModelConfig, ProposalLearningStageConfig, RunConfig
from part_distillation.models.checkpoint import build_model
from part_distillation.stages.training import reference_criterion
from part_distillation.inference import TrainedModel, load_model
from part_distillation.launch import JobContext
from part_distillation.models.checkpoint import load_project_checkpoint
from part_distillation.models.efficientnet import pretrained_weights_path
from part_distillation.models.mask2former import (
    EFFICIENTNET_LITE0_CPU,
    LEVEL_NAMES,
    EfficientNetBackbone,
    build_mask2former,
    get_spec,
    spec_name_for_size,
)

from ..data.part_fixtures import write_part_segments

BACKBONE = "model.pixel_level_module.encoder.backbone."
CLASSIFIER = ("_conv_head.", "_bn1.", "_fc.")


@pytest.fixture(scope="module", autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_mask2former(EFFICIENTNET_LITE0_CPU)


def test_backbone_is_the_pip_checkpoint_loaded_strictly(model):
    pip = torch.load(pretrained_weights_path(), map_location="cpu", weights_only=True)
    ours = {k[len(BACKBONE):]: v for k, v in model.state_dict().items() if k.startswith(BACKBONE)}
    # every tensor of the file is in the backbone, except the ImageNet classifier it does not use
    assert set(pip) - set(ours) == {k for k in pip if k.startswith(CLASSIFIER)} != set()
    assert set(ours) == {k for k in pip if not k.startswith(CLASSIFIER)}
    for key, tensor in ours.items():
        assert torch.equal(tensor, pip[key]), key
    # nothing else sits in the encoder slot, and no Swin is left
    assert all(k.startswith(BACKBONE) for k in model.state_dict() if k.startswith("model.pixel_level_module.encoder."))
    assert not any("swin" in k for k in model.state_dict())
    # the pixel decoder takes the four EfficientNet levels (24/40/112/320 channels)
    decoder = model.model.pixel_level_module.decoder
    assert [p[0].in_channels for p in decoder.input_projections] == [320, 112, 40]
    assert decoder.adapter_1[0].in_channels == 24
    # the rebuilt pixel decoder is initialised as transformers initialises its own (std 0.02,
    # not torch's default: ~0.12 for a 1x1 convolution from 24 channels; level embedding N(0, 1))
    assert 0.015 < float(decoder.adapter_1[0].weight.std()) < 0.025
    assert 0.8 < float(decoder.level_embed.std()) < 1.2
    assert model.backbone_name == "efficientnet_lite0"


def test_without_pretrained_backbone_the_weights_differ():
    torch.manual_seed(0)
    random = build_mask2former(EFFICIENTNET_LITE0_CPU, pretrained_backbone=False)
    pip = torch.load(pretrained_weights_path(), map_location="cpu", weights_only=True)
    assert not torch.equal(random.state_dict()[BACKBONE + "_conv_stem.weight"], pip["_conv_stem.weight"])
    with pytest.raises(TypeError, match="pip weights"):
        build_mask2former("demo_cpu").load_pretrained_backbone()


def test_features_are_the_efficientnet_levels(model):
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        feats = model.eval().backbone_features(x)
        reference = model.model.pixel_level_module.encoder.backbone.features(x)
    assert list(feats) == list(LEVEL_NAMES)
    assert [tuple(f.shape) for f in feats.values()] == [(1, 24, 24, 16), (1, 40, 12, 8), (1, 112, 6, 4),
                                                        (1, 320, 3, 2)]
    for got, want in zip(feats.values(), reference.values()):
        assert torch.equal(got, want)


def _toy_batch():
    """Two 64 x 64 images, each with two rectangular 'parts' (the class-agnostic target)."""
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 64)
    targets = []
    for shift in (0, 8):
        masks = torch.zeros(2, 64, 64, dtype=torch.bool)
        masks[0, 8 + shift:32, 8:56] = True
        masks[1, 32:56 - shift, 8:56] = True
        images[len(targets), :, masks[0]] += 1.5
        targets.append({"labels": torch.zeros(2, dtype=torch.int64), "masks": masks})
    return images, targets


def test_frozen_backbone_trains_the_rest_and_the_loss_falls():
    torch.manual_seed(0)
    model = build_mask2former(EFFICIENTNET_LITE0_CPU)
    model.freeze(("backbone",))  # the backbone alone: the deformable encoder stays trainable
    model.train()
    backbone = model.model.pixel_level_module.encoder
    assert isinstance(backbone, EfficientNetBackbone)
    assert all(not p.requires_grad for p in backbone.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith(BACKBONE))
    # batch norm runs on its ImageNet statistics even in training mode
    assert model.training and not any(m.training for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = {k: v.clone() for k, v in backbone.state_dict().items()}

    images, targets = _toy_batch()
    criterion = reference_criterion(num_classes=1, num_points=256)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(8):
        loss = sum(criterion(model(images), targets).values())
        opt.zero_grad()
        loss.backward()
        if step == 0:
            for name in ("model.pixel_level_module.decoder.adapter_1.0.weight",
                         "model.pixel_level_module.decoder.encoder.layers.0.self_attn.value_proj.weight",
                         "model.transformer_module.decoder.layers.0.cross_attn.in_proj_weight",
                         "class_predictor.weight"):
                grad = model.get_parameter(name).grad
                assert grad is not None and grad.abs().sum() > 0, name
            assert all(p.grad is None for p in backbone.parameters())
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2]), losses
    for key, value in backbone.state_dict().items():  # weights and running statistics untouched
        assert torch.equal(value, before[key]), key


def test_reference_freeze_rule_freezes_backbone_and_deformable_encoder(model):
    model.freeze()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert {n for n in frozen if not n.startswith(BACKBONE)} == \
        {n for n, _ in model.named_parameters() if n.startswith("model.pixel_level_module.decoder.encoder.")}
    assert all(n in frozen for n, _ in model.named_parameters() if n.startswith(BACKBONE))
    model.freeze(())


def test_object_conditioned_head():
    torch.manual_seed(0)
    objects, parts = 3, 2
    model = build_mask2former(EFFICIENTNET_LITE0_CPU, num_classes=objects * parts, parts_per_class=parts).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x, object_class=torch.tensor([0, 2]))
        full = model.class_predictor(out["query_embeddings"])
    q = EFFICIENTNET_LITE0_CPU.num_queries
    assert out["pred_logits"].shape == (2, q, parts + 1) and out["pred_masks"].shape == (2, q, 16, 16)
    # the selected rows of the full head: object 2's parts 4, 5 and no-object
    torch.testing.assert_close(out["pred_logits"][1], full[1][:, [4, 5, 6]])
    with pytest.raises(ValueError, match="object_class"):
        model(x)


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", None, num_classes=1)
    with torch.no_grad():  # move off the initial weights so a missed tensor would show
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "model.pth"
    torch.save({"model": model.state_dict(), "iteration": 3}, path)
    fresh = build_mask2former(EFFICIENTNET_LITE0_CPU, pretrained_backbone=False)
    load_project_checkpoint(fresh, path)  # strict
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a, b = model.eval()(x), fresh.eval()(x)
    assert torch.equal(a["pred_masks"], b["pred_masks"]) and torch.equal(a["pred_logits"], b["pred_logits"])
    # a bare checkpoint file: the spec is recognised from its tensor shapes
    loaded, kind, _ = load_model(path)
    assert kind == "proposal" and loaded.backbone_name == "efficientnet_lite0"
    with torch.no_grad():
        assert torch.equal(loaded(x)["pred_masks"], a["pred_masks"])


def test_selectable_by_config():
    from part_distillation import __main__ as entry
    from part_distillation.config import register_configs, validate

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=entry.config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=["stage=proposal_learning", "model=mask2former_effnet"])
    run = validate(cfg)
    assert (run.model.name, run.model.size, run.model.weights) == ("mask2former", "efficientnet_lite0", None)
    assert get_spec(spec_name_for_size(run.model.size)) is EFFICIENTNET_LITE0_CPU
    assert spec_name_for_size("tiny") == "demo_cpu" and spec_name_for_size("demo_cpu") == "demo_cpu"
    with pytest.raises(KeyError, match="unknown model.size 'nope'"):
        spec_name_for_size("nope")


@pytest.mark.integration
def test_stage4_run_then_predict_at_the_original_size(tmp_path):
    records = write_part_segments(tmp_path / "synthetic", tmp_path / "records", num_classes=1, images_per_class=2)
    stage = ProposalLearningStageConfig(
        input=str(records), output=str(tmp_path / "run"), batch_size=2, per_device_batch=2, max_iter=2,
        steps=[10], lr=1e-3, image_size=64, num_workers=0, num_points=64, checkpoint_period=2, log_period=1,
        preview_period=0)
    cfg = RunConfig(stage=stage, data=DataConfig(name="synthetic", root=str(tmp_path / "synthetic")),
                    model=ModelConfig(name="mask2former", size="efficientnet_lite0", device="cpu"), seed=0)
    from part_distillation.stages import proposal_learning

    assert proposal_learning.run(cfg, JobContext()).extra["iterations"] == 2
    predictor = TrainedModel.load(tmp_path / "run")
    assert predictor.kind == "proposal" and predictor.image_size == 64
    assert predictor.model.backbone_name == "efficientnet_lite0"
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (50, 90, 3), dtype=np.uint8)
    obj = np.zeros((50, 90), dtype=bool)
    obj[8:44, 15:80] = True
    got = predictor.predict(image, obj)
    n = len(got.scores)
    assert 1 <= n <= EFFICIENTNET_LITE0_CPU.num_queries
    assert got.masks.shape == (n, 50, 90) and got.masks.dtype == bool
    assert not (got.masks & ~obj).any()


@pytest.mark.integration
def test_stage6_run_then_predict_with_the_object_class(tmp_path):
    from part_distillation.stages import part_distillation

    from ..data.part_fixtures import write_part_labels
    from ..stages.part_distillation_job import config

    records = write_part_labels(tmp_path / "synthetic", tmp_path / "records", num_classes=2, images_per_class=1)
    cfg = config(records, tmp_path / "synthetic", tmp_path / "run", max_iter=2, steps=[10], checkpoint_period=2,
                 num_points=64, deterministic=False)
    cfg.model.size = "efficientnet_lite0"
    summary = part_distillation.run(cfg, JobContext())
    assert summary.extra["iterations"] == 2 and summary.extra["parts_per_class"] == 4
    predictor = TrainedModel.load(tmp_path / "run")
    assert predictor.kind == "part_distillation" and predictor.model.backbone_name == "efficientnet_lite0"
    assert predictor.num_object_classes == 2
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (50, 90, 3), dtype=np.uint8)
    obj = np.zeros((50, 90), dtype=bool)
    obj[8:44, 15:80] = True
    got = predictor.predict(image, obj, object_class=1)
    assert got.masks.shape[1:] == (50, 90) and not (got.masks & ~obj).any()
    assert set(got.clusters.tolist()) <= set(range(4))
