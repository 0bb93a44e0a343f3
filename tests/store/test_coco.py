"""COCO export: loads with pycocotools, streams, leaves out undecoded images."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from pycocotools.coco import COCO

from part_distillation.masks import encode_rles, rle_area, rle_to_bbox
from part_distillation.store import coco_results, export_coco
from part_distillation.store.errors import StoreError
from tests.store.helpers import REPO, blob_masks, writer


def test_export_coco_loads_with_pycocotools(tmp_path):
    rng = np.random.default_rng(0)
    with writer(tmp_path / "store") as w:
        for i in range(4):
            rles = encode_rles(blob_masks(rng, 3))
            w.write({"key": f"n0{i}/img{i}.jpg", "file_name": f"n0{i}/img{i}.jpg", "height": 48, "width": 64,
                     "masks": rles, "scores": np.array([0.9, 0.5, 0.1], dtype=np.float32),
                     "classes": f"n0{i % 2}", "boxes": rle_to_bbox(rles)})
        w.write({"key": "empty.jpg", "image_size": [48, 64], "masks": []})
    written = export_coco(tmp_path / "store", tmp_path / "out.json")
    assert (written["images"], written["annotations"], written["images_left_out"]) == (5, 12, 0)
    coco = COCO(str(tmp_path / "out.json"))
    coco_dict = json.loads((tmp_path / "out.json").read_text())
    assert coco_dict == export_coco(tmp_path / "store")  # the streamed file equals the in-memory export
    assert len(coco.getImgIds()) == 5 and len(coco.getAnnIds()) == 12
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == {"n00", "n01"}
    img = coco.loadImgs(1)[0]
    assert img["file_name"] == "n00/img0.jpg" and (img["height"], img["width"]) == (48, 64)
    ann = coco.loadAnns(coco.getAnnIds(imgIds=[1]))[0]
    decoded = coco.annToMask(ann)
    assert decoded.shape == (48, 64) and decoded.sum() == ann["area"] and ann["iscrowd"] == 0
    np.testing.assert_allclose(ann["bbox"], rle_to_bbox([ann["segmentation"]])[0])
    assert ann["score"] == pytest.approx(0.9) and ann["category_id"] == coco.getCatIds(catNms=["n00"])[0]
    assert len(coco.loadRes(coco_dict["annotations"]).getAnnIds()) == 12
    results = coco.loadRes(coco_results(coco_dict["annotations"]))  # areas from the masks, not boxes
    assert len(results.getAnnIds()) == 12
    assert results.loadAnns(1)[0]["area"] == pytest.approx(float(rle_area(ann["segmentation"])[0]))
    np.testing.assert_allclose(results.loadAnns(1)[0]["bbox"], ann["bbox"])


def test_export_coco_with_per_mask_ids_and_given_categories(tmp_path):
    rng = np.random.default_rng(1)
    with writer(tmp_path / "store") as w:
        w.write({"key": "a.jpg", "height": 48, "width": 64, "masks": encode_rles(blob_masks(rng, 2)),
                 "part_ids": np.array([3, 1])})
    coco = export_coco(tmp_path / "store", None, category_field="part_ids", categories={1: "head", 3: "leg"})
    assert [a["category_id"] for a in coco["annotations"]] == [3, 1]
    assert coco["categories"] == [{"id": 1, "name": "head"}, {"id": 3, "name": "leg"}]
    assert [a["score"] for a in coco["annotations"]] == [1.0, 1.0]


def test_export_coco_cli(tmp_path):
    with writer(tmp_path / "store") as w:
        w.write({"key": "a.jpg", "height": 48, "width": 64,
                 "masks": encode_rles(blob_masks(np.random.default_rng(2), 2))})
    out = subprocess.run([sys.executable, str(REPO / "tools" / "export_coco.py"), str(tmp_path / "store"),
                          str(tmp_path / "out.json")], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "1 images, 2 annotations, 1 categories" in out.stdout
    coco = COCO(str(tmp_path / "out.json"))
    assert coco.loadCats(coco.getCatIds())[0]["name"] == "object"


def test_export_coco_leaves_out_images_that_did_not_decode(tmp_path):
    rng = np.random.default_rng(3)
    with writer(tmp_path / "store") as w:
        w.write({"key": "good.jpg", "height": 48, "width": 64, "ok": True, "masks": encode_rles(blob_masks(rng, 2))})
        w.write({"key": "broken.jpg", "height": 0, "width": 0, "ok": False, "reason": "truncated"})
        w.write({"key": "zero.jpg", "height": 0, "width": 0})
        w.write({"key": "later.jpg", "height": 48, "width": 64, "masks": encode_rles(blob_masks(rng, 1))})
    written = export_coco(tmp_path / "store", tmp_path / "out.json")
    coco = COCO(str(tmp_path / "out.json"))
    assert [img["file_name"] for img in coco.loadImgs(coco.getImgIds())] == ["good.jpg", "later.jpg"]
    assert all(img["height"] > 0 and img["width"] > 0 for img in coco.dataset["images"])
    assert written["images_left_out"] == 2 and coco.dataset["info"]["images_left_out_not_decoded"] == 2
    assert [a["image_id"] for a in coco.dataset["annotations"]] == [1, 1, 2]


def test_export_coco_streams_to_its_file(tmp_path):
    """Memory while exporting to a file stays far below the size of the json (no annotation list)."""
    import tracemalloc

    yy, xx = np.mgrid[0:64, 0:64]
    pool = encode_rles(np.stack([((yy // (1 + k % 3) + xx) % 2 == 0) & (xx > k) for k in range(10)]))
    for shard in range(10):
        with writer(tmp_path / "store", shard, 10) as w:
            for i in range(30):
                w.write({"key": f"s{shard}/img{i}.jpg", "height": 64, "width": 64, "masks": pool})
    export_coco(tmp_path / "store", tmp_path / "warm-up.json")  # imports happen outside the measurement
    tracemalloc.start()
    written = export_coco(tmp_path / "store", tmp_path / "out.json")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    size = (tmp_path / "out.json").stat().st_size
    assert written["annotations"] == 3000 and size > 3_000_000
    assert peak < size / 4, (peak, size)
    assert len(COCO(str(tmp_path / "out.json")).getAnnIds()) == 3000


def test_export_reads_a_stage_output_by_its_schema(tmp_path):
    """Part segments (stages 2/3) keep their masks in ``part_masks`` and ids in ``part_ids``:
    the export finds them through the PART_SEGMENTS schema, no field names given."""
    from part_distillation.store import ShardWriter
    from part_distillation.store.schemas import PART_SEGMENTS

    rng = np.random.default_rng(2)
    parts = blob_masks(rng, 2)
    with ShardWriter(tmp_path / "store", 0, 1, stage="dense_crf", config={}, schema=PART_SEGMENTS) as w:
        w.write({"key": "n1/a.jpg", "path": "/d/n1/a.jpg", "wnid": "n1", "class_index": 0, "class_name": "x",
                 "original_size": [24, 32], "fitted_size": list(parts.shape[1:]),
                 "object_mask": encode_rles(parts.any(0)[None])[0], "object_score": 1.0, "object_ratio": 0.2,
                 "part_masks": encode_rles(parts), "part_ids": np.array([4, 2])})
    from part_distillation.data.frame import ImageFrame

    coco = export_coco(tmp_path / "store")  # the original frame, which file_name's image is in
    assert [a["category_id"] for a in coco["annotations"]] == [4, 2]
    original = ImageFrame((24, 32), parts.shape[1:]).masks_to_original(parts)
    assert [a["area"] for a in coco["annotations"]] == [float(m.sum()) for m in original]
    assert (coco["images"][0]["height"], coco["images"][0]["width"]) == (24, 32)
    fitted = export_coco(tmp_path / "store", frame="fitted")  # as stored
    assert [a["area"] for a in fitted["annotations"]] == [float(m.sum()) for m in parts]
    assert (fitted["images"][0]["height"], fitted["images"][0]["width"]) == parts.shape[1:]


def _fitted_frame_store(path):
    """A stage-1-like store: a 30x40 image fitted to 480x640, masks stored in the fitted frame."""
    from part_distillation.data.frame import ImageFrame

    frame = ImageFrame.fit((30, 40))
    original = np.zeros((2, 30, 40), bool)
    original[0, 3:12, 5:20] = True
    original[1, 20:28, 30:39] = True
    with writer(path) as w:
        w.write({"key": "n01/n01_1.JPEG", "path": "/images/n01/n01_1.JPEG", **frame.as_record(),
                 "masks": encode_rles(frame.masks_to_fitted(original)), "scores": np.array([0.9, 0.4], np.float32)})
    return frame, original


def test_export_coco_writes_fitted_frame_records_in_the_original_frame_by_default(tmp_path):
    frame, original = _fitted_frame_store(tmp_path / "store")
    assert frame.fitted == (480, 640)
    written = export_coco(tmp_path / "store", tmp_path / "out.json")
    assert written["annotations"] == 2
    coco = COCO(str(tmp_path / "out.json"))
    image = coco.loadImgs(1)[0]
    assert (image["height"], image["width"], image["frame"]) == (30, 40, "original")  # file_name's pixels
    assert image["file_name"] == "/images/n01/n01_1.JPEG" and coco.dataset["info"]["frame"] == "original"
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[1]))
    for ann, mask in zip(anns, original):
        decoded = coco.annToMask(ann).astype(bool)
        assert decoded.shape == (30, 40) and np.array_equal(decoded, mask)  # aligned with the image
        assert ann["area"] == mask.sum() and ann["bbox"] == [float(x) for x in rle_to_bbox(encode_rles(mask[None]))[0]]


def test_export_coco_fitted_frame_on_request_says_so(tmp_path):
    frame, original = _fitted_frame_store(tmp_path / "store")
    coco = export_coco(tmp_path / "store", None, frame="fitted")
    assert coco["images"][0] == {"id": 1, "file_name": "/images/n01/n01_1.JPEG", "height": 480, "width": 640,
                                 "frame": "fitted", "original_height": 30, "original_width": 40}
    assert coco["info"]["frame"] == "fitted"
    assert [a["segmentation"]["size"] for a in coco["annotations"]] == [[480, 640], [480, 640]]
    assert coco["annotations"][0]["area"] == frame.masks_to_fitted(original[0]).sum()
    out = subprocess.run([sys.executable, str(REPO / "tools" / "export_coco.py"), str(tmp_path / "store"),
                          str(tmp_path / "fitted.json"), "--frame", "fitted"], capture_output=True, text=True,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "fitted frame" in out.stdout
    assert json.loads((tmp_path / "fitted.json").read_text())["images"][0]["height"] == 480

    with writer(tmp_path / "predict") as w:  # masks at the image's size: no fitted frame to export
        w.write({"key": "a.jpg", "height": 48, "width": 64, "masks": encode_rles(blob_masks(np.random.default_rng(4), 1))})
    assert export_coco(tmp_path / "predict", None)["images"][0]["height"] == 48
    with pytest.raises(StoreError, match="no fitted frame"):
        export_coco(tmp_path / "predict", None, frame="fitted")
