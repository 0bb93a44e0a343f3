"""Mask2Former on transformers against the upstream reference fixture (m2f_tiny.*)."""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from part_distillation.models.checkpoint import (
    detectron2_model_state,
    load_detectron2_pickle,
    plan_conversion,
    read_detectron2_pickle,
)
from part_distillation.models.mask2former import (
    DEMO_CPU,
    LEVEL_NAMES,
    PIXEL_MEAN,
    PIXEL_STD,
    SWIN_L_COCO_INSTANCE,
    TINY_FIXTURE,
    Mask2Former,
    Mask2FormerSpec,
    build_mask2former,
    get_spec,
    preprocess_images,
)
from part_distillation.postprocess import instance_inference, resize_mask_logits

torch.set_num_threads(min(2, torch.get_num_threads()))

ATOL = 1e-4  # the README's suggested tolerance on features and logits


@pytest.fixture(scope="module")
def tiny(reference_models):
    model = build_mask2former(TINY_FIXTURE).eval()
    load_detectron2_pickle(model, reference_models / "m2f_tiny.pkl")
    return model


@pytest.fixture(scope="module")
def reference(reference_models):
    return dict(np.load(reference_models / "m2f_tiny_outputs.npz"))


@pytest.fixture(scope="module")
def image(reference_models):
    return np.array(Image.open(reference_models / "test_image.png").convert("RGB"))


def _cases(image):
    return [("", image), ("pad_", image[:117, :150])]


@pytest.fixture(scope="module")
def runs(tiny, image):
    """One forward pass per fixture case (main image, padded crop), shared by the tests."""
    results = {}
    for prefix, img in _cases(image):
        batch = preprocess_images([img])
        with torch.no_grad():
            results[prefix] = (batch, tiny(batch.pixel_values, return_features=True))
    return results


# ------------------------------------------------------------------------------ specs
def test_swin_l_spec_matches_the_reference_layout(reference_models):
    layout = json.loads((reference_models / "mask2former_swinL_coco_instance_keys.json").read_text())
    upstream, names = layout["upstream"], [e["name"] for e in layout["state_dict"]]
    swin = upstream["swin"]
    spec = SWIN_L_COCO_INSTANCE
    assert (spec.embed_dim, list(spec.depths), list(spec.num_heads), spec.window_size) == (
        swin["EMBED_DIM"], swin["DEPTHS"], swin["NUM_HEADS"], swin["WINDOW_SIZE"])
    assert (spec.num_queries, spec.num_classes, spec.hidden_dim) == (
        upstream["num_queries"], upstream["num_classes"], upstream["hidden_dim"])
    # 9 decoder layers exist; upstream DEC_LAYERS and transformers' decoder_layers count 10.
    layers = {n.split(".")[3] for n in names if n.startswith("sem_seg_head.predictor.transformer_ffn_layers.")}
    assert len(layers) == spec.decoder_layers == 9
    assert spec.to_config().decoder_layers == upstream["dec_layers_cfg"] == 10
    encoder_layers = {n.split(".")[5] for n in names if ".pixel_decoder.transformer.encoder.layers." in n}
    assert len(encoder_layers) == spec.encoder_layers == 6


def test_tiny_spec_is_the_fixture_config(reference_models):
    cfg = json.loads((reference_models / "m2f_tiny_config.json").read_text())
    assert Mask2FormerSpec.from_detectron2_cfg(cfg["detectron2_cfg"]) == TINY_FIXTURE
    arch = cfg["architecture"]
    assert tuple(arch["input"]["pixel_mean"]) == PIXEL_MEAN and tuple(arch["input"]["pixel_std"]) == PIXEL_STD
    assert arch["transformer_decoder"]["num_transformer_layers"] == TINY_FIXTURE.decoder_layers


def test_unsupported_detectron2_config_is_refused(reference_models):
    cfg = json.loads((reference_models / "m2f_tiny_config.json").read_text())["detectron2_cfg"]
    cfg["MODEL"]["SEM_SEG_HEAD"]["PIXEL_DECODER_NAME"] = "BasePixelDecoder"
    with pytest.raises(ValueError, match="PIXEL_DECODER_NAME"):
        Mask2FormerSpec.from_detectron2_cfg(cfg)


def test_swin_l_builds_on_meta_with_the_reference_size():
    with torch.device("meta"):
        model = Mask2Former.from_spec(SWIN_L_COCO_INSTANCE)
    n = sum(p.numel() for p in model.parameters())
    # upstream 215,521,989 + SwinModel's unused final LayerNorm (2 x 1536)
    assert n == 215_521_989 + 2 * 1536
    assert model.num_classes == 80 and model.class_predictor.out_features == 81


def test_get_spec_and_class_head_sizes():
    assert get_spec("demo_cpu") is DEMO_CPU
    assert get_spec("tiny_fixture", num_classes=1).num_classes == 1
    with pytest.raises(KeyError, match="known"):
        get_spec("nope")
    with pytest.raises(ValueError):
        TINY_FIXTURE.with_num_classes(0).to_config()


# ------------------------------------------------------------------------ preprocessing
def test_preprocess_normalises_and_pads_like_detectron2(image, reference):
    for prefix, img in _cases(image):
        batch = preprocess_images([img])
        assert batch.image_sizes == [img.shape[:2]]
        np.testing.assert_allclose(batch.pixel_values.numpy(), reference[prefix + "input_padded"], atol=1e-6, rtol=0)


def test_preprocess_batches_images_of_different_sizes(image):
    small = torch.from_numpy(image[:50, :70]).permute(2, 0, 1)
    batch = preprocess_images([image, small])
    assert batch.pixel_values.shape == (2, 3, 128, 160)
    assert batch.image_sizes == [(128, 160), (50, 70)]
    assert batch.padded_size == (128, 160)
    assert torch.all(batch.pixel_values[1, :, 50:, :] == 0) and torch.all(batch.pixel_values[1, :, :, 70:] == 0)
    alone = preprocess_images([small]).pixel_values
    assert alone.shape == (1, 3, 64, 96)
    assert torch.equal(alone[0, :, :50, :70], batch.pixel_values[1, :, :50, :70])
    with pytest.raises(ValueError):
        preprocess_images([image.transpose(2, 0, 1)])


# ------------------------------------------------------------------- fixture reproduction
@pytest.mark.parametrize("prefix", ["", "pad_"])
def test_tiny_reproduces_the_upstream_tensors(runs, reference, prefix):
    _, out = runs[prefix]
    ours = {f"backbone_{k}": v for k, v in out["backbone_features"].items()}
    ours.update({f"pixdec_multi_scale_{i}": v for i, v in enumerate(out["multi_scale_features"])})
    ours["pixdec_mask_features"] = out["mask_features"]
    ours["pred_logits"], ours["pred_masks"] = out["pred_logits"], out["pred_masks"]
    ours["aux_pred_logits"] = torch.stack([a["pred_logits"] for a in out["aux_outputs"]])
    ours["aux_pred_masks"] = torch.stack([a["pred_masks"] for a in out["aux_outputs"]])
    assert list(out["backbone_features"]) == list(LEVEL_NAMES)
    for key, value in ours.items():
        expected = reference[prefix + key]
        assert tuple(value.shape) == expected.shape, key
        diff = float(np.abs(value.numpy() - expected).max())
        assert diff <= ATOL, f"{prefix}{key}: max abs diff {diff}"


@pytest.mark.parametrize("prefix", ["", "pad_"])
def test_tiny_final_instances_match_upstream(runs, reference, prefix):
    batch, out = runs[prefix]
    inst = instance_inference(out["pred_logits"][0], out["pred_masks"][0], padded_size=batch.padded_size,
                              image_size=batch.image_sizes[0], topk=10).sorted_by_score()
    order = np.argsort(-reference[prefix + "inst_scores"], kind="stable")
    np.testing.assert_allclose(inst.scores.numpy(), reference[prefix + "inst_scores"][order], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(inst.classes.numpy(), reference[prefix + "inst_pred_classes"][order])
    flipped = inst.masks.numpy() != reference[prefix + "inst_pred_masks"][order]
    # Only pixels at the decision margin may flip (README: 5 / 13 pixels with |logit| < 1e-4).
    assert flipped.sum() <= (5 if prefix == "" else 13)
    if flipped.any():
        logits = resize_mask_logits(out["pred_masks"][0][inst.query_indices], batch.padded_size, batch.image_sizes[0])
        assert float(logits.abs().numpy()[flipped].max()) < 1e-3


# ----------------------------------------------------------------------- outputs, heads
def test_forward_dict_has_every_decoder_prediction_and_the_query_embeddings(tiny, image):
    batch = preprocess_images([image, image[:60, :90]])
    with torch.no_grad():
        out = tiny(batch.pixel_values)
        alone = tiny(preprocess_images([image]).pixel_values)
    q, d = TINY_FIXTURE.num_queries, TINY_FIXTURE.hidden_dim
    assert out["pred_logits"].shape == (2, q, TINY_FIXTURE.num_classes + 1)
    assert out["pred_masks"].shape == (2, q, 32, 40)
    # batching does not mix images
    torch.testing.assert_close(out["pred_masks"][:1], alone["pred_masks"], rtol=0, atol=1e-4)
    assert len(out["aux_outputs"]) == TINY_FIXTURE.decoder_layers  # learnable queries + layers 1..L-1
    assert out["query_embeddings"].shape == (2, q, d)
    # the class head reads the layer-normed embeddings: they are the ones that made pred_logits
    torch.testing.assert_close(tiny.class_predictor(out["query_embeddings"]), out["pred_logits"], rtol=0, atol=0)
    assert "backbone_features" not in out
    feats = tiny.backbone_features(batch.pixel_values)
    assert [tuple(f.shape[1:]) for f in feats.values()] == [(32, 32, 40), (64, 16, 20), (128, 8, 10), (256, 4, 5)]


@pytest.mark.parametrize("num_classes", [1, 5 * 8])
def test_class_head_size_is_configurable(num_classes):
    model = build_mask2former(TINY_FIXTURE, num_classes=num_classes).eval()
    assert model.num_classes == num_classes
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 64))
    assert out["pred_logits"].shape[-1] == num_classes + 1
    assert all(a["pred_logits"].shape[-1] == num_classes + 1 for a in out["aux_outputs"])
    model.reset_class_head(3)
    assert model.num_classes == 3 and model.config.num_labels == 3


@pytest.mark.reference
def test_freeze_matches_the_reference_rule_on_detectron2_names(reference_models):
    """The reference freezes parameters whose detectron2 name contains "backbone" or
    "encoder": map the fixture checkpoint's names and compare the sets."""
    model = build_mask2former(TINY_FIXTURE)
    model.freeze()
    raw = detectron2_model_state(read_detectron2_pickle(reference_models / "m2f_tiny.pkl"))
    plan = plan_conversion(raw)
    parameters = dict(model.named_parameters())
    want_frozen = {t for r in plan.renames for t in r.targets
                   if t in parameters and ("backbone" in r.source or "encoder" in r.source)}
    want_trainable = {t for r in plan.renames for t in r.targets
                      if t in parameters and not ("backbone" in r.source or "encoder" in r.source)}
    frozen = {n for n, p in parameters.items() if not p.requires_grad}
    assert len(want_frozen) > 100 and len(want_trainable) > 50
    assert want_frozen <= frozen and not (want_trainable & frozen)
    # every parameter is covered by the checkpoint, apart from the Swin's unused final norm
    assert frozen - want_frozen <= {"model.pixel_level_module.encoder.swin.layernorm.weight",
                                    "model.pixel_level_module.encoder.swin.layernorm.bias"}


def _backbone_twice(model, x):
    with torch.no_grad():
        return model.backbone_features(x)["res5"], model.backbone_features(x)["res5"]


def test_freeze_by_name_and_gradients():
    torch.manual_seed(0)
    model = build_mask2former(DEMO_CPU)
    model.freeze()
    assert model.frozen_keys == ("backbone", "encoder") and model.frozen_mode == "train"
    assert set(model.frozen_modules()) == {"model.pixel_level_module.encoder",
                                           "model.pixel_level_module.decoder.encoder"}
    for name, param in model.named_parameters():
        assert param.requires_grad == ("encoder" not in name and "backbone" not in name), name
    model.train()
    out = model(torch.randn(1, 3, 64, 64))
    loss = out["pred_masks"].sigmoid().mean() + out["pred_logits"].logsumexp(-1).mean()
    loss = loss + sum(a["pred_masks"].mean() for a in out["aux_outputs"])
    loss.backward()
    for module in model.frozen_modules().values():
        assert all(p.grad is None for p in module.parameters())
    pixel_decoder = model.model.pixel_level_module.decoder
    assert pixel_decoder.input_projections[0][0].weight.grad is not None  # trainable, as in the reference
    assert model.class_predictor.weight.grad is not None
    assert model.model.transformer_module.queries_features.weight.grad is not None
    model.freeze(())
    assert model.frozen_keys == () and model.frozen_modules() == {}
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="frozen_mode"):
        model.freeze(frozen_mode="inference")


def test_frozen_mode_train_keeps_drop_path_and_eval_switches_it_off():
    torch.manual_seed(0)
    model = build_mask2former(DEMO_CPU)  # drop_path_rate 0.1
    x = torch.randn(8, 3, 64, 64)  # drop-path draws per sample: 8 samples, some get dropped
    model.eval()
    clean, _ = _backbone_twice(model, x)

    model.freeze()  # frozen_mode="train", the reference
    model.train()
    backbone = model.model.pixel_level_module.encoder
    assert backbone.training and all(m.training for m in backbone.modules())
    first, second = _backbone_twice(model, x)
    # stochastic depth acts: kept samples are rescaled, dropped ones lose a branch
    assert not torch.equal(first, second) and not torch.equal(first, clean)

    model.freeze(frozen_mode="eval")
    model.train()
    assert model.training and model.model.transformer_module.training
    for module in model.frozen_modules().values():
        assert not any(m.training for m in module.modules())
    first, second = _backbone_twice(model, x)
    assert torch.equal(first, second) and torch.equal(first, clean)
    model.freeze(frozen_mode="train")  # back: follows train() again
    assert backbone.training
