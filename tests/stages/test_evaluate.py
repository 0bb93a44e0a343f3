"""Stage `evaluate` on the synthetic dataset: true parts score 100, the strip baseline less."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from part_distillation.__main__ import config_dir
from part_distillation.config import validate
from part_distillation.data.frame import ImageFrame
from part_distillation.data.partimagenet import PartImageNetDataset
from part_distillation.data.synthetic import make_synthetic_dataset
from part_distillation.launch import JobContext
from part_distillation.masks import encode_rles
from part_distillation.stages import evaluate
from part_distillation.store import ShardWriter
from part_distillation.store.schemas import PART_SEGMENTS


def _cfg(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return validate(compose(config_name="config", overrides=["stage=evaluate", *overrides]))


def _strips(mask: np.ndarray, k: int) -> list[np.ndarray]:
    """The object's box cut into k equal strips along its longer side (the trivial baseline)."""
    ys, xs = np.nonzero(mask)
    axis, lo, hi = (1, xs.min(), xs.max() + 1) if np.ptp(xs) >= np.ptp(ys) else (0, ys.min(), ys.max() + 1)
    edges = np.linspace(lo, hi, k + 1).round().astype(int)
    coords = np.arange(mask.shape[axis])
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        band = (coords >= a) & (coords < b)
        out.append(mask & (band[None, :] if axis == 1 else band[:, None]))
    return out


def _write_records(root: Path, out: Path, splits: list[str], how: str) -> None:
    with ShardWriter(out, 0, 1, stage="dense_crf", config={"how": how}, schema=PART_SEGMENTS) as writer:
        for split in splits:
            _write_split(writer, PartImageNetDataset(root / "annotations" / f"{split}.json", root / split,
                                                     objects_file=root / "annotations" / f"objects_{split}.json"), how)


def _write_split(writer, dataset, how):
    for image in dataset:
        parts = dataset.part_masks(image.id)
        obj = dataset.object_mask(image.id)
        frame = ImageFrame.fit((image.height, image.width))
        if how == "truth":  # part i of its class -> id i + 1, the same in every image of the class
            order = np.argsort(parts.category_ids)
            masks, ids = parts.masks[order], np.arange(1, len(order) + 1)
        else:
            masks = np.stack(_strips(obj, 4))
            ids = np.arange(1, 5)
        writer.write({"key": image.path, "path": image.path, "wnid": image.wnid, "class_index": 0,
                      "class_name": image.object_class, **frame.as_record(),
                      "object_mask": encode_rles(frame.masks_to_fitted(obj[None]))[0],
                      "object_score": 1.0, "object_ratio": float(obj.mean()),
                      "part_masks": encode_rles(frame.masks_to_fitted(masks)), "part_ids": ids})


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    for split in ("train", "val"):
        make_synthetic_dataset(root, num_classes=2, images_per_class=3, size=64, seed=1, parts_per_class=3,
                               split=split)
    return root


@pytest.mark.integration
@pytest.mark.parametrize("how", ["truth", "strips"])
def test_evaluate_records_both_protocols(synthetic, tmp_path, how):
    records = tmp_path / "records"
    _write_records(synthetic, records, ["train", "val"], how)
    cfg = _cfg(f"data.root={synthetic}", f"paths.root={tmp_path}", f"stage.input={records}",
               "stage.split=train", "stage.match_split=val", "stage.num_clusters=4", "stage.top_k=[1,10]")
    summary = evaluate.run(cfg, JobContext()).as_dict()
    metrics = json.loads((Path(cfg.stage.output) / "metrics.json").read_text())
    assert metrics["images"] == 6
    reference, strict = metrics["reference"], metrics["strict"]
    if how == "truth":
        assert reference["AR@10"] == pytest.approx(100.0)
        assert reference["C-mIoU"] == pytest.approx(100.0)
        assert strict["AR@10"] == pytest.approx(100.0)
        assert strict["C-mIoU"] == pytest.approx(100.0)   # matched on val, evaluated on train
        assert summary["skipped"] == {}
    else:
        assert 0 < reference["C-mIoU"] < 90 and 0 < reference["AR@10"] < 90
    table = (Path(cfg.stage.output) / "metrics.md").read_text()
    assert table.startswith("| protocol | AR@1 | AR@10 | C-mIoU | A-mIoU |") and "| strict |" in table
    assert (Path(cfg.stage.output) / "per_class.csv").read_text().startswith("object_class,mIoU_reference,mIoU_strict")


@pytest.mark.integration
def test_images_without_records_count_as_finding_nothing(synthetic, tmp_path):
    records = tmp_path / "records"
    _write_records(synthetic, records, ["train"], "truth")   # nothing for the matching split
    cfg = _cfg(f"data.root={synthetic}", f"paths.root={tmp_path}", f"stage.input={records}",
               "stage.split=train", "stage.match_split=val", "stage.num_clusters=4", "stage.top_k=[10]")
    summary = evaluate.run(cfg, JobContext()).as_dict()
    assert summary["skipped"] == {"no_prediction": 6}
    strict = json.loads((Path(cfg.stage.output) / "metrics.json").read_text())["strict"]
    assert strict["C-mIoU"] < 50   # every cluster maps to part 0 when the matching split saw nothing
