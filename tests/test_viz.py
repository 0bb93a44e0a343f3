"""Drawing records (part_distillation/viz.py) and the collage tool."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from part_distillation.data.synthetic import make_synthetic_dataset
from part_distillation.masks import encode_rle, encode_rles
from part_distillation.viz import (PALETTE, best_and_worst, class_collage, collage_sample, draw_parts, draw_record,
                                   evaluation_collage, part_colour, read_per_class_miou, score_overlay, write_png)
from tests.stages.fixtures import write_stage2

REPO = Path(__file__).resolve().parents[1]


def _square(h=64, w=80, y0=10, y1=30, x0=20, x1=50) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_part_pixels_are_blended_with_their_id_colour_and_others_untouched():
    image = np.full((64, 80, 3), 100, np.uint8)
    part = _square()
    out = draw_parts(image, part[None], [3], labels=False)
    colour = PALETTE[3].astype(int)
    expected = np.floor((100 + colour) / 2 + 0.5)  # alpha 0.5, by hand
    assert np.all(np.abs(out[15, 30].astype(int) - expected) <= 1)
    assert np.all(out[~part] == 100)
    assert np.array_equal(image, np.full((64, 80, 3), 100, np.uint8)), "the input was modified"


def test_distinct_ids_get_distinct_colours():
    colours = {tuple(part_colour(i)) for i in range(1, 17)}
    assert len(colours) == 16


def test_object_outline_is_drawn_on_its_border_only():
    image = np.full((64, 80, 3), 100, np.uint8)
    obj = _square(y0=20, y1=40, x0=20, x1=40)
    out = draw_parts(image, np.zeros((0, 64, 80), bool), [], object_mask=obj, labels=False)
    assert tuple(out[20, 30]) == (255, 255, 255) and tuple(out[39, 30]) == (255, 255, 255)
    assert tuple(out[30, 30]) == (100, 100, 100) and tuple(out[5, 5]) == (100, 100, 100)


def test_labels_are_written_inside_their_part():
    image = np.full((64, 80, 3), 100, np.uint8)
    part = _square(y0=10, y1=51, x0=10, x1=51)  # a square: its most interior pixel is (30, 30)
    with_labels = draw_parts(image, part[None], [1], labels=True)
    without = draw_parts(image, part[None], [1], labels=False)
    changed = np.any(with_labels != without, axis=2)
    assert changed.any() and not changed[~part].any()
    ys, xs = np.nonzero(changed)
    assert abs(ys.mean() - 30) < 4 and abs(xs.mean() - 30) < 4


def test_records_of_stage_1_and_stage_5_are_drawn_by_their_fields(tmp_path):
    image = np.full((64, 80, 3), 60, np.uint8)
    path = tmp_path / "img.png"
    Image.fromarray(image).save(path)
    a, b = _square(), _square(y0=40, y1=60, x0=5, x1=15)
    frame = {"original_size": [64, 80], "fitted_size": [64, 80]}
    stage1 = {"key": "k", "path": str(path), **frame, "masks": encode_rles(np.stack([a, b]))}
    stage5 = {"key": "k", "path": str(path), **frame, "part_masks": encode_rles(np.stack([a, b])),
              "cluster_ids": np.array([5, 0]), "object_mask": encode_rle(a | b)}
    out1 = draw_record(stage1, labels=False)
    out5 = draw_record(stage5, labels=False)
    blend = lambda i: np.floor((60 + PALETTE[i].astype(int)) / 2 + 0.5)  # noqa: E731
    assert np.all(np.abs(out1[15, 30].astype(int) - blend(1)) <= 1)  # stage 1: mask i has colour i + 1
    assert np.all(np.abs(out1[50, 10].astype(int) - blend(2)) <= 1)
    assert np.all(np.abs(out5[15, 30].astype(int) - blend(5)) <= 1)  # stage 5: by cluster id
    assert np.all(np.abs(out5[50, 10].astype(int) - blend(0)) <= 1)
    assert tuple(out1[0, 0]) == (60, 60, 60)


def test_record_without_masks_is_refused():
    with pytest.raises(ValueError, match="nothing to draw"):
        draw_record({"key": "x", "path": "nowhere"}, image=np.zeros((4, 4, 3), np.uint8))


@pytest.fixture(scope="module")
def stage2_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("viz")
    make_synthetic_dataset(root / "data", num_classes=3, images_per_class=3, size=64, seed=2)
    write_stage2(root / "data", root / "stage2", fit_size=128)
    return root / "stage2"


def test_collage_tool_writes_a_png_with_a_row_per_class(stage2_store, tmp_path):
    out = tmp_path / "collage.png"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "tools/collage.py", str(stage2_store), str(out), "--per-class", "2",
                             "--classes", "2", "--cell", "100"], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    png = cv2.imread(str(out))
    assert png.shape == (2 * 104, 140 + 2 * 104, 3)  # 2 classes x 2 images of 100 + 4 px gaps, titles 140
    assert png[:, 140:].std() > 10  # drawn images, not an empty canvas


def test_collage_of_every_class_has_coloured_parts(stage2_store, tmp_path):
    from part_distillation.store import RecordStore

    collage = class_collage(RecordStore(stage2_store).iter_records(), per_class=3, classes=8, cell=128)
    assert collage.shape == (3 * 132, 140 + 3 * 132, 3)
    path = write_png(tmp_path / "all.png", collage)
    back = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(back, collage)  # RGB on disk, not BGR


def test_collage_tool_refuses_a_folder_without_records(tmp_path):
    result = subprocess.run([sys.executable, "tools/collage.py", str(tmp_path), str(tmp_path / "x.png")],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert result.returncode == 2 and "no manifest.json" in result.stderr


# ---------------------------------------------------------------------------------------------
# Labels, score overlays and the evaluation collage


def test_label_texts_replace_the_ids():
    image = np.full((64, 80, 3), 100, np.uint8)
    part = _square(y0=5, y1=60, x0=5, x1=75)
    as_id = draw_parts(image, part[None], [1], labels=True)
    as_text = draw_parts(image, part[None], [1], labels=True, texts=["p0 wide"])
    assert not np.array_equal(as_id, as_text)  # a longer text covers other pixels than "1"
    blank = draw_parts(image, part[None], [1], labels=True, texts=[""])
    assert np.array_equal(blank, draw_parts(image, part[None], [1], labels=False))


def test_score_overlay_paints_the_best_masks_on_top_by_rank():
    image = np.full((8, 8, 3), 100, np.uint8)
    masks = np.zeros((3, 8, 8), bool)
    masks[0, :4], masks[1, 2:6], masks[2, 7] = True, True, True
    out = score_overlay(image, masks, [0.2, 0.9, 0.1], max_masks=2)  # ranks: mask 1 -> 1, mask 0 -> 2
    blend = lambda colour, base=100.0: np.rint((base + colour.astype(float)) / 2)  # noqa: E731
    assert np.array_equal(out[0, 0], blend(PALETTE[2]))  # mask 0 alone
    assert np.array_equal(out[5, 0], blend(PALETTE[1]))  # mask 1 alone
    overlap = ((100 + PALETTE[2].astype(float)) / 2 + PALETTE[1]) / 2  # rank 2 first, then rank 1 over it
    assert np.all(np.abs(out[3, 0] - overlap) <= 0.5)
    assert tuple(out[7, 0]) == (100, 100, 100)  # the third mask is beyond max_masks


def test_best_and_worst_orders_by_miou_and_leaves_out_missing_values():
    miou = {"a": 10.0, "b": 80.0, "c": 50.0, "d": float("nan"), "e": 30.0, "f": 90.0, "g": None}
    assert best_and_worst(miou, 2) == [("f", 90.0), ("b", 80.0), ("e", 30.0), ("a", 10.0)]
    assert [c for c, _ in best_and_worst(miou, 3)] == ["f", "b", "c", "e", "a"]  # 5 <= 6: all, once each
    assert best_and_worst({"x": 5.0, "y": 5.0}, 1) == [("x", 5.0), ("y", 5.0)]  # ties by name


def _grey_samples(value: int, count: int, log: list):
    """``count`` samples of a flat grey image; the prediction covers the left half (id 1), the GT nothing."""
    for _ in range(count):
        log.append(value)
        image = np.full((40, 60, 3), value, np.uint8)
        pred = np.zeros((1, 40, 60), bool)
        pred[0, :, :30] = True
        yield image, pred, [1], np.zeros((0, 40, 60), bool), []


def test_evaluation_collage_rows_go_from_best_to_worst_with_prediction_then_ground_truth(tmp_path):
    miou = {"a": 10.0, "b": 80.0, "c": 50.0, "d": float("nan"), "e": 30.0, "f": 90.0}
    grey = {"a": 40, "b": 80, "c": 120, "d": 160, "e": 200, "f": 240}
    asked, drawn = [], []

    def samples_of(name):
        asked.append(name)
        return _grey_samples(grey[name], 5 if name != "a" else 1, drawn)  # "a" has a single sample

    cell = 64
    collage = evaluation_collage(miou, samples_of, n=2, per_class=2, cell=cell)
    assert collage.shape == (4 * (cell + 4), 140 + 2 * 2 * (cell + 4), 3)
    assert asked == ["f", "b", "e", "a"]
    assert len(drawn) == 2 + 2 + 2 + 1  # only per_class samples pulled from each generator

    def cell_at(row, col):
        y, x = row * (cell + 4) + 2, 140 + col * (cell + 4) + 2
        return collage[y:y + cell, x:x + cell]

    for row, name in enumerate(["f", "b", "e", "a"]):
        gt_cell = cell_at(row, 1)  # the ground truth (no parts): the plain image in the letterbox
        assert tuple(gt_cell[cell // 2, cell // 2]) == (grey[name],) * 3
        pred_cell = cell_at(row, 0)  # the prediction: left half blended with colour 1
        expected = np.rint((grey[name] + PALETTE[1].astype(float)) / 2)
        assert np.all(np.abs(pred_cell[cell // 2, cell // 4].astype(int) - expected) <= 1)
        assert tuple(pred_cell[cell // 2, 3 * cell // 4]) == (grey[name],) * 3
    assert np.all(cell_at(3, 2) == 32) and np.all(cell_at(3, 3) == 32)  # "a": no second sample, left dark
    assert cell_at(0, 3)[cell // 2, cell // 2, 0] == grey["f"]
    back = np.asarray(Image.open(write_png(tmp_path / "eval.png", collage)).convert("RGB"))
    assert np.array_equal(back, collage)


def test_read_per_class_miou_takes_one_protocol_of_the_metrics(tmp_path):
    metrics = {"reference": {"per_class_mIoU": {"dog": 41.5, "car": 12.0}, "AR@1": 3.0},
               "strict": {"per_class_mIoU": {"dog": 30.0}}, "images": 4}
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(metrics))
    assert read_per_class_miou(path) == {"dog": 41.5, "car": 12.0}
    assert read_per_class_miou(metrics, "strict") == {"dog": 30.0}
    with pytest.raises(KeyError, match="no protocol 'lenient'"):
        read_per_class_miou(metrics, "lenient")


def test_collage_sample_colours_a_cluster_like_the_ground_truth_part_it_maps_to():
    from part_distillation.data.part_sample import PartSample
    from part_distillation.evaluation.evaluator import Prediction

    obj = _square(y0=10, y1=50, x0=10, x1=70)
    head, body = obj.copy(), obj.copy()
    head[:, 40:], body[:, :40] = False, False
    sample = PartSample("k", "x.png", "dog", None, obj, np.stack([head, body]), np.array([3, 7]))
    prediction = Prediction(np.stack([body, head]), np.array([0.9, 0.8]), np.array([1, 0]))
    image = np.zeros((64, 80, 3), np.uint8)
    mapped = collage_sample(image, sample, prediction, cluster_to_part=[3, 7])
    assert list(mapped.pred_ids) == [7, 3] and list(mapped.gt_ids) == [3, 7]
    assert np.array_equal(mapped.object_mask, obj)
    pred_cell = draw_parts(image, mapped.pred_masks, mapped.pred_ids, labels=False)
    gt_cell = draw_parts(image, mapped.gt_masks, mapped.gt_ids, labels=False)
    assert np.array_equal(pred_cell, gt_cell)  # the same parts, the same colours
    assert list(collage_sample(image, sample, prediction).pred_ids) == [2, 1]  # no mapping: cluster + 1
    proposals = Prediction(np.stack([body, head]), np.array([0.9, 0.8]))
    assert list(collage_sample(image, sample, proposals).pred_ids) == [1, 2]
