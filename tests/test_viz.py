"""Drawing records (part_distillation/viz.py) and the collage tool."""
from __future__ import annotations

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
from part_distillation.viz import PALETTE, class_collage, draw_parts, draw_record, part_colour, write_png
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
