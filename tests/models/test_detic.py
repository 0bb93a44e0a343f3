"""Detic re-implementation against the upstream layout and the tiny upstream fixture."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from part_distillation.models.detic import (
    WEIGHTS_URL,
    CheckpointMismatchError,
    Detic,
    DeticConfig,
    build_detic,
    load_state_dict,
    paste_masks,
    read_checkpoint,
    resize_image,
    resized_shape,
)

torch.set_num_threads(min(2, torch.get_num_threads()))

TINY = DeticConfig(
    swin_embed_dim=32,
    swin_depths=(1, 1, 2, 1),
    swin_num_heads=(1, 2, 4, 8),
    fpn_channels=64,
    num_classes=5,
    box_fc_dim=128,
    mask_conv_dim=64,
    score_thresh=0.756,
    one_class_per_proposal=True,
    min_size_test=160,
    max_size_test=1333,
    detections_per_image=300,
)


def max_diff(a, b) -> float:
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    assert a.shape == np.asarray(b).shape, (a.shape, np.asarray(b).shape)
    return float(np.abs(a.astype(np.float64) - np.asarray(b, dtype=np.float64)).max()) if a.size else 0.0


# --------------------------------------------------------------------------- layout of the public model


@pytest.mark.reference
def test_swin_b_layout_matches_public_checkpoint(reference_models: Path):
    layout = json.loads((reference_models / "detic_swinB_lcocoi21k_keys.json").read_text())["state_dict"]
    with torch.device("meta"):
        model = Detic(DeticConfig())
    params = dict(model.named_parameters())
    own = {k: (tuple(v.shape), "parameter" if k in params else "buffer") for k, v in model.state_dict().items()}
    upstream = {e["name"]: (tuple(e["shape"]), e["kind"]) for e in layout}
    assert len(layout) == 441
    assert own == upstream
    assert list(own) == [e["name"] for e in layout]  # same order as upstream's state_dict


def test_config_for_labeling_uses_pipeline_settings():
    # The reference's object-mask settings, docs/method.md#stage-1 ("Input: the fitted image (fit
    # to 640). Score threshold 0.02, NMS 0.5, at most 1000 detections"), not the DefaultPredictor's
    # shortest edge 640 / max 1333.
    cfg = DeticConfig.for_labeling()
    assert (cfg.resize, cfg.min_size_test) == ("fit", 640)
    assert (cfg.score_thresh, cfg.nms_thresh, cfg.detections_per_image) == (0.02, 0.5, 1000)
    assert cfg.swin_embed_dim == 128 and cfg.swin_depths == (2, 2, 18, 2) and cfg.num_classes == 22047
    assert resized_shape(375, 500, cfg.resize, cfg.min_size_test, cfg.max_size_test) == (480, 640)
    assert resized_shape(100, 2000, cfg.resize, cfg.min_size_test, cfg.max_size_test) == (32, 640)
    assert resized_shape(64, 48, cfg.resize, cfg.min_size_test, cfg.max_size_test) == (640, 480)  # scaled up
    tiny = DeticConfig.for_labeling("tiny", score_thresh=0.3)
    assert (tiny.swin_embed_dim, tiny.fpn_channels, tiny.score_thresh, tiny.resize) == (32, 64, 0.3, "fit")
    with pytest.raises(KeyError, match="unknown Detic architecture"):
        DeticConfig.for_labeling("swinl")


@pytest.mark.reference
def test_labeling_preset_returns_masks_in_the_fitted_frame(reference_models: Path):
    """An original image in, detections out at the fitted size (128x160 -> 512x640)."""
    cfg = DeticConfig.for_labeling("tiny", score_thresh=0.756)
    model = build_detic(reference_models / "detic_tiny.pth", cfg, vocabulary=np.load(reference_models / "detic_tiny_vocab.npy"))
    image = np.asarray(Image.open(reference_models / "test_image.png").convert("RGB"))
    batch, sizes = model.preprocess([image])
    assert sizes == [(512, 640)] and tuple(batch.shape[-2:]) == (512, 640)
    det = model.predict(image)[0]
    assert det.image_size == (512, 640) and det.masks.shape[1:] == (512, 640)
    fitted = resize_image(image, (512, 640))  # the same detections from an image fitted beforehand
    again = model.predict(fitted)[0]
    assert len(det) > 0 and torch.equal(again.classes, det.classes) and torch.allclose(again.boxes, det.boxes)
    assert float(det.boxes[:, 2].max()) <= 640 and float(det.boxes[:, 3].max()) <= 512


def test_resized_shape_rules():
    # ResizeShortestEdge: short side -> size, long side scaled, rounded with int(x + 0.5).
    assert resized_shape(128, 160, "shortest_edge", 160, 1333) == (160, 200)
    assert resized_shape(375, 500, "shortest_edge", 640, 1333) == (640, 853)
    assert resized_shape(100, 2000, "shortest_edge", 640, 1333) == (67, 1333)  # capped by max size
    # Fit the longer side (the image frame of data/frame.py).
    assert resized_shape(375, 500, "fit", 640, 1333) == (480, 640)
    with pytest.raises(ValueError, match="unknown resize mode"):
        resized_shape(10, 10, "crop", 640, 1333)


def test_paste_masks_fills_box_region():
    probs = torch.ones(1, 28, 28)
    pasted = paste_masks(probs, torch.tensor([[2.0, 3.0, 10.0, 7.0]]), (12, 14))
    expected = torch.zeros(12, 14, dtype=torch.bool)
    expected[3:7, 2:10] = True  # pixel centres inside the box
    assert torch.equal(pasted[0], expected)


@pytest.mark.parametrize("num_classes,thresh", [(1, 0.0), (7, 0.5), (300, 0.0)])
def test_per_class_nms_equals_torchvision_batched_nms(num_classes, thresh):
    from torchvision.ops import batched_nms

    from part_distillation.models.detic.roi_heads import per_class_box_nms

    gen = torch.Generator().manual_seed(num_classes)
    xy = torch.rand(96, 2, generator=gen) * 100
    boxes = torch.cat([xy, xy + torch.rand(96, 2, generator=gen) * 60 + 1], 1)
    scores = torch.rand(96, num_classes, generator=gen)
    candidates = scores > thresh
    rows, classes = torch.nonzero(candidates, as_tuple=True)
    kept = batched_nms(boxes[rows], scores[rows, classes], classes, 0.5)
    expected = torch.zeros_like(candidates)
    expected[rows[kept], classes[kept]] = True
    got = per_class_box_nms(boxes, scores, candidates, 0.5)
    assert torch.equal(got, expected)
    assert 0 < got.sum() < candidates.sum()  # some suppression happened


# --------------------------------------------------------------------------- weights


@pytest.fixture(scope="module")
def tiny_state(reference_models: Path) -> dict:
    return read_checkpoint(reference_models / "detic_tiny.pth")


def test_missing_weights_file_names_path_and_url(tmp_path: Path):
    path = tmp_path / "weights" / "detic" / "model.pth"
    with pytest.raises(FileNotFoundError) as err:
        read_checkpoint(path)
    assert str(path) in str(err.value) and WEIGHTS_URL in str(err.value)


@pytest.mark.reference
def test_wrong_model_names_mismatched_keys(tiny_state):
    with torch.device("meta"):
        model = Detic(DeticConfig())
    with pytest.raises(CheckpointMismatchError) as err:
        load_state_dict(model, tiny_state)
    message = str(err.value)
    assert "backbone.fpn_lateral3.weight: (64, 64, 1, 1) vs (256, 256, 1, 1)" in message
    assert "missing keys" in message and "backbone.bottom_up.layers.0.blocks.1.norm1.weight" in message


@pytest.mark.reference
def test_missing_and_unexpected_keys_are_named(tiny_state):
    state = dict(tiny_state)
    del state["roi_heads.mask_head.predictor.bias"]
    state["roi_heads.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as err:
        load_state_dict(Detic(TINY), state)
    assert "1 missing keys, first: roi_heads.mask_head.predictor.bias" in str(err.value)
    assert "1 unexpected keys, first: roi_heads.extra.weight" in str(err.value)


@pytest.mark.reference
def test_weights_load_exactly_and_vocabulary_is_adopted(tiny_state):
    model = Detic(DeticConfig(**{**TINY.__dict__, "num_classes": 11}))
    load_state_dict(model, {**tiny_state, "pixel_mean": torch.zeros(3, 1, 1)})  # older detectron2 saved it
    assert model.num_classes == 5
    for name, value in model.state_dict().items():
        assert torch.equal(value, tiny_state[name]), name


@pytest.mark.reference
def test_vocabulary_swap_matches_upstream_rule(reference_models: Path, tiny_state):
    model = build_detic(reference_models / "detic_tiny.pth", TINY)
    vocab = np.load(reference_models / "detic_tiny_vocab.npy")
    model.set_vocabulary(vocab)
    for k in range(3):  # the fixture's stored zs_weight is exactly normalize(cat(vocab.T, 0))
        assert torch.equal(model.roi_heads.box_predictor[k].cls_score.zs_weight, tiny_state[f"roi_heads.box_predictor.{k}.cls_score.zs_weight"])
    emb = torch.randn(3, 512) * 7
    model.set_vocabulary(emb)
    weight = model.roi_heads.box_predictor[2].cls_score.zs_weight
    assert weight.shape == (512, 4) and model.num_classes == 3
    assert torch.allclose(weight[:, :3].norm(dim=0), torch.ones(3)) and torch.all(weight[:, 3] == 0)
    assert torch.allclose(weight[:, 0], emb[0] / emb[0].norm())
    with pytest.raises(ValueError, match="width 300"):
        model.set_vocabulary(torch.randn(3, 300))


# --------------------------------------------------------------------------- numbers against the fixture


@pytest.fixture(scope="module")
def run(reference_models: Path):
    """Runs the tiny model once on the test image and keeps every intermediate result."""
    model = build_detic(reference_models / "detic_tiny.pth", TINY, vocabulary=np.load(reference_models / "detic_tiny_vocab.npy"))
    image = np.asarray(Image.open(reference_models / "test_image.png").convert("RGB"))
    ref = dict(np.load(reference_models / "detic_tiny_outputs.npz"))
    out = {}
    with torch.no_grad():
        batch, sizes = model.preprocess([image])
        out["input_padded"], out["sizes"] = batch, sizes
        out["swin"] = model.backbone.bottom_up(batch)
        out["fpn"] = model.backbone.from_bottom_up(out["swin"])
        pg = model.proposal_generator
        out["reg"], out["hm"] = pg.centernet_head([out["fpn"][f] for f in pg.in_features])
        out["proposals"] = pg.proposals_from_outputs(out["reg"], out["hm"])
        boxes = [p.boxes for p in out["proposals"]]
        out["stages"] = model.roi_heads.run_cascade(out["fpn"], boxes, sizes)
        out["raw"] = model.roi_heads(out["fpn"], boxes, [p.scores for p in out["proposals"]], sizes)[0]
    out["final"] = model.predict(image)[0]
    return model, image, ref, out


@pytest.mark.reference
def test_preprocessing_matches(run):
    model, image, ref, out = run
    assert np.array_equal(resize_image(image, (160, 200)), ref["resized_image_u8"])
    assert out["sizes"] == [tuple(ref["resized_hw"])]
    assert max_diff(out["input_padded"], ref["input_padded"]) < 1e-5


@pytest.mark.reference
def test_backbone_and_fpn_match(run):
    _, _, ref, out = run
    for name in ("swin1", "swin2", "swin3"):
        assert max_diff(out["swin"][name], ref[f"swin_{name}"]) < 1e-4, name
    for name in ("p3", "p4", "p5", "p6", "p7"):
        assert max_diff(out["fpn"][name], ref[f"fpn_{name}"]) < 1e-4, name


@pytest.mark.reference
def test_centernet_outputs_and_proposals_match(run):
    _, _, ref, out = run
    for level, name in enumerate(("p3", "p4", "p5", "p6", "p7")):
        assert max_diff(out["reg"][level], ref[f"centernet_reg_{name}"]) < 1e-4, name
        assert max_diff(out["hm"][level], ref[f"centernet_agn_hm_logits_{name}"]) < 1e-4, name
    proposals = out["proposals"][0]
    assert len(proposals) == 256
    assert max_diff(proposals.boxes, ref["proposal_boxes"]) < 1e-3
    assert max_diff(proposals.scores, ref["proposal_objectness"]) < 1e-4


@pytest.mark.reference
def test_cascade_stages_match(run):
    _, _, ref, out = run
    for k, stage in enumerate(out["stages"]):
        assert max_diff(stage.boxes_in[0], ref[f"stage{k}_boxes_in"]) < 1e-3, k
        assert max_diff(stage.cls_logits, ref[f"stage{k}_cls_logits"]) < 1e-4, k
        assert max_diff(stage.box_deltas, ref[f"stage{k}_box_deltas"]) < 1e-4, k


@pytest.mark.reference
def test_raw_detections_match(run):
    _, _, ref, out = run
    raw = out["raw"]
    assert len(raw) == 28
    assert np.array_equal(raw.classes.numpy(), ref["raw_classes"])
    assert max_diff(raw.boxes, ref["raw_boxes"]) < 1e-3
    assert max_diff(raw.scores, ref["raw_scores"]) < 1e-4
    assert max_diff(raw.mask_probs, ref["raw_mask_probs"]) < 1e-4


@pytest.mark.reference
def test_final_detections_match(run):
    _, image, ref, out = run
    final = out["final"]
    assert final.image_size == tuple(image.shape[:2]) == tuple(ref["image_hw"])
    assert len(final) == 25  # 3 of the 28 boxes become empty after rescaling
    assert np.array_equal(final.classes.numpy(), ref["final_classes"])
    assert max_diff(final.boxes, ref["final_boxes"]) < 1e-3
    assert max_diff(final.scores, ref["final_scores"]) < 1e-4
    differ = final.masks.numpy() != ref["final_masks"]
    assert differ.sum() <= 2
    if differ.any():  # only pixels sitting on the 0.5 threshold may flip
        raw = out["raw"]
        scaled = raw.boxes * torch.tensor([160 / 200, 128 / 160] * 2)  # resized frame -> original
        scaled = torch.stack([scaled[:, 0].clamp(0, 160), scaled[:, 1].clamp(0, 128), scaled[:, 2].clamp(0, 160), scaled[:, 3].clamp(0, 128)], 1)
        keep = (scaled[:, 2] > scaled[:, 0]) & (scaled[:, 3] > scaled[:, 1])
        soft = paste_masks(raw.mask_probs[keep][:, 0], final.boxes, final.image_size, threshold=None)
        assert np.abs(soft.numpy()[differ] - 0.5).max() < 1e-4


@pytest.mark.reference
def test_batched_prediction_equals_single(run):
    model, image, _, out = run
    both = model.predict([image, image])
    for det in both:
        assert torch.equal(det.classes, out["final"].classes)
        assert torch.allclose(det.boxes, out["final"].boxes, atol=1e-3)
        assert (det.masks != out["final"].masks).sum() <= 2


@pytest.mark.reference
def test_select_before_masks_equals_filtering_after(run):
    model, image, _, out = run
    full = out["final"]
    picked = model.predict(image, select=lambda i, r: torch.nonzero(r.classes == 2).squeeze(1)[:3])[0]
    index = torch.nonzero(full.classes == 2).squeeze(1)[:3]
    assert len(picked) == 3 and torch.all(picked.classes == 2)
    assert torch.equal(picked.boxes, full.boxes[index]) and torch.equal(picked.scores, full.scores[index])
    assert torch.equal(picked.masks, full.masks[index])


@pytest.mark.reference
def test_gpu_style_full_image_paste_equals_cpu_paste(run):
    """The chunked whole-image paste (GPU path) gives the CPU path's masks: outside its box a mask is < 0.5."""
    from part_distillation.models.detic.model import _paste_region

    _, _, _, out = run
    raw = out["raw"]
    h, w = raw.image_size
    whole = _paste_region(raw.mask_probs, raw.boxes, 0, h, 0, w) >= 0.5
    assert torch.equal(whole, paste_masks(raw.mask_probs[:, 0], raw.boxes, (h, w)))
    assert whole.sum() > 1000  # a real comparison, not of empty masks


@pytest.mark.reference
def test_no_detections_gives_empty_outputs(run):
    model, image, _, _ = run
    empty = model.predict(image, select=lambda i, r: torch.zeros(0, dtype=torch.int64))[0]
    assert len(empty) == 0 and empty.masks.shape == (0, *image.shape[:2]) and empty.boxes.shape == (0, 4)
