"""Benchmark B9 (held-out quality) at test size: every row, the curves, the JSON and the B9 line."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT

#: The random tiny model, 2 classes x 4 training / 2 held-out images, K=2, 4 iterations; stages 1-3 at the images' own
#: 128 pixels (not fitted to 640) and part ranking keeping every proposal of the barely trained model
TINY = ["--model", "mask2former_tiny", "--variants", "shared", "--classes", "2", "--images", "4", "--heldout-images", "2", "--parts", "2",
        "--iters", "4", "--curve-every", "2",
        "--set", "detic_labeling:stage.fit_size=128", "--set", "pixel_grouping:stage.input_size=128",
        "--set", "dense_crf:stage.input_size=128", "--set", "part_ranking:stage.min_proposal_score=0.0",
        "--set", "part_ranking:stage.min_label_score=0.0", "--set", "part_ranking:stage.min_area_ratio=0.0"]
ROWS = ("pixel grouping records", "dense-CRF records", "part-ranking labels", "stage-4 proposal model",
        "stage-6 PartDistillation model", "box strips", "k-means of colour + position")


@pytest.mark.integration
def test_b9_prints_every_row_and_the_margins_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "b9_quality.py"), *TINY,
                             "--out", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=3600,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert table[:2] == ["| predictor (heldout) | bestIoU | AR@1 (overlapping) | AR@10 (overlapping) "
                         "| C-mIoU | A-mIoU |", "|---" * 6 + "|"]
    assert len(table) == 2 + len(ROWS) and all(label in row for label, row in zip(ROWS, table[2:]))
    assert "–" not in "".join(table)   # every row has figures: both models trained at this size
    pair = r"s[46]-vs-(grouping|crf|rank|strips|kmeans) bestIoU [+-]\d+\.\d AR10 [+-]\d+\.\d C-mIoU ([+-]\d+\.\d|n/a)"
    assert re.fullmatch(rf"B9 shared: {pair}( \| {pair}){{9}}", lines[-1]), lines[-1]

    report = json.loads((tmp_path / "b9_quality.json").read_text())
    shared = report["variants"]["shared"]
    assert list(shared["table"]) == ["pixel_grouping", "dense_crf", "part_ranking", "proposal", "part_distillation",
                                     "strips", "colour_kmeans"]
    for row in shared["table"].values():
        assert row["images"] == 4 and 0 <= row["bestIoU"] <= 100 and row["AR@10"] is not None
    assert shared["table"]["colour_kmeans"]["C-mIoU"] is not None   # strict: matched on train_match
    for kind in ("proposal", "part_distillation"):
        assert [p["iteration"] for p in shared["curves"][kind]] == [2, 4]
        assert all(0 <= p["bestIoU"] <= 100 for p in shared["curves"][kind])
    # the margins are the table's differences
    margin = shared["margins"]["s6-vs-strips"]["bestIoU"]
    assert margin == pytest.approx(shared["table"]["part_distillation"]["bestIoU"] - shared["table"]["strips"]["bestIoU"])
    assert (tmp_path / "b9_quality.md").read_text().strip().endswith(lines[-1])
    assert (tmp_path / "b9_curves_shared.png").read_bytes()[:4] == b"\x89PNG"


def test_k_sets_the_method_apart_from_the_images_parts(tmp_path):
    """``--k`` is K of every stage and baseline; the generator keeps ``--parts`` parts per object."""
    code = ("import json, sys; sys.path.insert(0, 'benchmarks'); import b9_quality as b; from pathlib import Path; "
            "a = b.parse_args(sys.argv[1:]); print(json.dumps([a.k, b.stage_overrides(a, Path('r'), 'shared', 'train')]))")

    def run(*argv):
        return subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})

    result = run("--parts", "4", "--k", "6")
    assert result.returncode == 0, result.stderr[-2000:]
    k, overrides = json.loads(result.stdout.strip().splitlines()[-1])
    assert k == 6
    assert "stage.parts_per_class=4" in overrides["synthetic_data"]
    assert "stage.num_parts=6" in overrides["pixel_grouping"]
    assert "stage.num_clusters=6" in overrides["part_ranking"]
    assert "stage.parts_per_class=6" in overrides["part_distillation"]
    k, overrides = json.loads(run("--parts", "3").stdout.strip().splitlines()[-1])
    assert k == 3 and "stage.num_parts=3" in overrides["pixel_grouping"]
    refused = run("--k", "1")
    assert refused.returncode == 2 and "--k" in refused.stderr
