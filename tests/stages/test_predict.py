"""Stage ``predict`` on a small folder (a square, a non-square and a corrupt image): object
masks from the whole image or GrabCut, overlays at the images' sizes, a COCO json that
pycocotools reads back, a rerun that skips everything, and the short command form."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image
from pycocotools.coco import COCO

from part_distillation.__main__ import config_dir, expand_predict
from part_distillation.config import ConfigError, DataConfig, ModelConfig, PredictStageConfig, RunConfig, validate
from part_distillation.evaluation.evaluator import Prediction
from part_distillation.launch import JobContext
from part_distillation.masks import decode_rles
from part_distillation.stages import predict
from part_distillation.store import RecordStore
from tests.model_runs import write_run

REPO = Path(__file__).resolve().parents[2]

# The fixture's images: (key, (h, w), object box y0, y1, x0, x1), and one that does not decode.
IMAGES = {"wide.png": ((48, 96), (10, 40, 20, 80)), "sub/square.jpg": ((64, 64), (12, 52, 16, 48))}
BROKEN = "broken.jpg"
K = 3  # the fake model's parts per object class


def _picture(size, box) -> np.ndarray:
    """A bright textured object on a dark, slightly noisy background (GrabCut finds it)."""
    rng = np.random.default_rng(sum(size))
    image = rng.integers(10, 40, (*size, 3)).astype(np.uint8)
    y0, y1, x0, x1 = box
    image[y0:y1, x0:x1] = rng.integers(200, 250, (y1 - y0, x1 - x0, 3)).astype(np.uint8)
    return image


def _box_mask(size, box) -> np.ndarray:
    mask = np.zeros(size, bool)
    y0, y1, x0, x1 = box
    mask[y0:y1, x0:x1] = True
    return mask


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("predict") / "my photos"
    for key, (size, box) in IMAGES.items():
        (folder / key).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_picture(size, box)).save(folder / key, quality=95)
    (folder / BROKEN).write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    (folder / "notes.txt").write_text("not an image: not listed")
    (folder / ".hidden.png").write_bytes(b"")
    return folder


def _vertical_strips(mask: np.ndarray, k: int) -> np.ndarray:
    """``mask`` cut into k vertical strips of the image's width (what the fake model predicts)."""
    w = mask.shape[1]
    out = np.zeros((k, *mask.shape), bool)
    for i in range(k):
        out[i, :, i * w // k:(i + 1) * w // k] = mask[:, i * w // k:(i + 1) * w // k]
    return out


class FakeModel:
    """Stands for ``inference.TrainedModel``: K strips of the object (or the image), scores
    0.9, 0.8, 0.7, ...; remembers every call."""

    def __init__(self, kind="part_distillation"):
        self.kind, self.parts_per_class, self.calls = kind, K, []

    def predict(self, image, object_mask, object_class):
        self.calls.append((image.shape, None if object_mask is None else object_mask.copy(), object_class))
        region = np.ones(image.shape[:2], bool) if object_mask is None else object_mask
        scores = 0.9 - 0.1 * np.arange(K)
        return Prediction(_vertical_strips(region, K), scores, np.arange(K))  # proposals: their rank


def _config(images: Path, output: Path, **stage) -> RunConfig:
    return RunConfig(stage=PredictStageConfig(images=str(images), checkpoint=str(output / "model.pth"),
                                              output=str(output), **stage),
                     data=DataConfig(name="none", root=str(output / "no_tree")), model=ModelConfig(device="cpu"))


def _use(monkeypatch, model):
    monkeypatch.setattr(predict, "load_trained_model", lambda cfg: model)


def _no_model(cfg):
    raise AssertionError("the model was loaded although every image was done")


# ---------------------------------------------------------------------------------------------
# Pieces


def test_images_are_listed_recursively_by_relative_key(images):
    listed = predict.list_images(images)
    assert [key for key, _ in listed] == sorted([BROKEN, *IMAGES])  # no .txt, no hidden file
    assert all(Path(path) == images / key for key, path in listed)
    assert predict.list_images(images / "wide.png") == [("wide.png", str(images / "wide.png"))]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        predict.list_images(images / "nowhere")
    with pytest.raises(FileNotFoundError, match="no image files"):
        predict.list_images(_empty(images))


def _empty(images: Path) -> Path:
    empty = images.parent / "empty"
    empty.mkdir(exist_ok=True)
    (empty / "readme.md").write_text("x")
    return empty


def test_object_class_is_an_index_a_wnid_or_a_name_of_the_class_list():
    classes = predict.ObjectClasses(["goldfish, Carassius auratus", "dog", "Car"], ["n01", "n02", "n03"])
    assert predict.resolve_object_class(None, classes) is None
    assert predict.resolve_object_class("2", classes) == 2
    assert predict.resolve_object_class("n02", classes) == 1
    assert predict.resolve_object_class("dog", classes) == 1
    assert predict.resolve_object_class("car", classes) == 2  # case does not matter
    assert predict.resolve_object_class("goldfish", classes) == 0  # one of a words-file entry's synonyms
    assert predict.resolve_object_class("7", predict.ObjectClasses()) == 7  # no list: any index
    with pytest.raises(ConfigError, match="stage.object_class"):
        predict.resolve_object_class("3", classes)
    with pytest.raises(ConfigError, match="not one of the model's 3 object classes"):
        predict.resolve_object_class("cat", classes)
    with pytest.raises(ConfigError, match="no class list"):
        predict.resolve_object_class("cat", predict.ObjectClasses())


def test_part_categories_number_the_part_classes_of_every_object_class():
    ids, names = predict.part_categories("proposal", np.array([-1, -1]), None, None, predict.ObjectClasses())
    assert ids.tolist() == [1, 1] and names == ["part", "part"]  # proposals: one class-agnostic category
    ids, names = predict.part_categories("part_distillation", np.array([2, 0]), 1, 3,
                                         predict.ObjectClasses(["cat", "dog"]))
    assert ids.tolist() == [1 * 3 + 2 + 1, 1 * 3 + 0 + 1] and names == ["dog part 2", "dog part 0"]


# ---------------------------------------------------------------------------------------------
# The stage


def test_whole_image_predictions_overlays_coco_and_rerun(images, tmp_path, monkeypatch):
    model = FakeModel()
    _use(monkeypatch, model)
    out = tmp_path / "out"
    cfg = _config(images, out, object_class="2", min_score=0.75)  # keeps parts 0 and 1 (0.9, 0.8)
    summary = predict.run(cfg, JobContext())
    assert (summary.seen, summary.written, dict(summary.skipped)) == (3, 2, {"bad_image": 1})
    assert sorted(shape[:2] for shape, mask, cls in model.calls) == sorted(s for s, _ in IMAGES.values())
    assert all(mask is None and cls == 2 for _, mask, cls in model.calls)  # whole image: no object mask

    for key, (size, _) in IMAGES.items():
        overlay = np.asarray(Image.open(predict.overlay_path(out, key)))
        assert overlay.shape == (*size, 3)
        original = np.asarray(Image.open(images / key).convert("RGB"))
        left = _vertical_strips(np.ones(size, bool), K)[0]
        assert (overlay[left] != original[left]).any(axis=-1).mean() > 0.9  # part 0 coloured
        right = _vertical_strips(np.ones(size, bool), K)[2]
        assert np.array_equal(overlay[right], original[right])  # part 2 dropped (score 0.7 < 0.75)

    coco = COCO(str(out / predict.COCO_FILE))
    assert {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())} == {7: "class 2 part 0", 8: "class 2 part 1"}
    by_file = {Path(im["file_name"]).relative_to(images).as_posix(): im for im in coco.dataset["images"]}
    assert set(by_file) == set(IMAGES)  # the corrupt file is not an image of the json
    for key, (size, _) in IMAGES.items():
        image = by_file[key]
        assert (image["height"], image["width"]) == size  # the original pixels
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        assert [a["category_id"] for a in anns] == [7, 8] and [round(a["score"], 3) for a in anns] == [0.9, 0.8]
        expected = _vertical_strips(np.ones(size, bool), K)
        for ann, cluster in zip(anns, (0, 1)):
            decoded = coco.annToMask(ann).astype(bool)
            assert decoded.shape == size and np.array_equal(decoded, expected[cluster])
            assert ann["area"] == expected[cluster].sum()

    monkeypatch.setattr(predict, "load_trained_model", _no_model)
    again = predict.run(cfg, JobContext())
    assert (again.seen, again.written, again.already_done, dict(again.skipped)) == (3, 0, 3, {"bad_image": 1})

    lost = predict.overlay_path(out, "wide.png")
    before = np.asarray(Image.open(lost))
    lost.unlink()
    redrawn = predict.run(cfg, JobContext())  # from the record, without the model
    assert redrawn.extra["overlays_redrawn"] == 1 and redrawn.written == 0
    assert np.array_equal(np.asarray(Image.open(lost)), before)


def test_grabcut_objects_reach_the_model_at_the_image_size(images, tmp_path, monkeypatch):
    model = FakeModel(kind="proposal")
    _use(monkeypatch, model)
    out = tmp_path / "out"
    summary = predict.run(_config(images, out, mask_source="grabcut", min_score=0.0), JobContext())
    assert summary.written == 2 and dict(summary.skipped) == {"bad_image": 1}
    for (shape, mask, cls), (size, box) in zip(sorted(model.calls, key=lambda c: c[0]),
                                               sorted(IMAGES.values())):
        assert shape[:2] == size and mask.shape == size and cls is None
        truth = _box_mask(size, box)
        assert (mask & truth).sum() / (mask | truth).sum() > 0.8  # GrabCut found the bright object

    coco = json.loads((out / predict.COCO_FILE).read_text())
    assert coco["categories"] == [{"id": 1, "name": "part"}]  # proposals: class-agnostic
    assert len(coco["annotations"]) == 2 * K
    for key, (size, _) in IMAGES.items():
        assert np.asarray(Image.open(predict.overlay_path(out, key))).shape == (*size, 3)


def test_annotated_objects_give_the_mask_and_the_object_class(images, tmp_path, monkeypatch):
    model = FakeModel()
    model.class_wnids = ("n01000001", "n01000002")  # what a stage-6 run's classes.json gives
    _use(monkeypatch, model)
    coco = {"images": [], "annotations": [], "categories": [{"id": 5, "name": "n01000002"}]}
    for i, (key, (size, (y0, y1, x0, x1))) in enumerate(IMAGES.items(), start=1):
        coco["images"].append({"id": i, "file_name": key, "height": size[0], "width": size[1]})
        coco["annotations"].append({"id": i, "image_id": i, "category_id": 5, "iscrowd": 0,
                                    "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
                                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)})
    annotations = tmp_path / "objects.json"
    annotations.write_text(json.dumps(coco))
    out = tmp_path / "out"
    summary = predict.run(_config(images, out, mask_source="annotations", annotations=str(annotations)),
                          JobContext())
    assert summary.written == 2
    for shape, mask, cls in model.calls:
        size, box = next(v for v in IMAGES.values() if v[0] == shape[:2])
        truth = _box_mask(size, box)
        assert cls == 1 and (mask & truth).sum() / (mask | truth).sum() > 0.9
    for record in RecordStore(out).iter_records():
        assert record["object_classes"].tolist() == [1]
        assert record["part_classes"].tolist() == [1 * K + k + 1 for k in range(K)]
        assert record["part_class_names"] == [f"n01000002 part {k}" for k in range(K)]


def _partimagenet_tree(root: Path, wnids) -> Path:
    """An ImageNet-style folder (``<wnid>/<wnid>_<n>.JPEG``) and its PartImageNet-style json: bare
    file names, no ``wnid`` key, every part of the super-category Quadruped."""
    size, (y0, y1, x0, x1) = IMAGES["sub/square.jpg"]
    coco = {"images": [], "annotations": [],
            "categories": [{"id": 1, "name": "Quadruped Head", "supercategory": "Quadruped"},
                           {"id": 2, "name": "Quadruped Body", "supercategory": "Quadruped"}]}
    for i, wnid in enumerate(wnids, start=1):
        name = f"{wnid}_{i}.JPEG"
        (root / wnid).mkdir(parents=True, exist_ok=True)
        Image.fromarray(_picture(size, (y0, y1, x0, x1))).save(root / wnid / name, quality=95)
        coco["images"].append({"id": i, "file_name": name, "height": size[0], "width": size[1]})
        for part, (top, bottom) in enumerate(((y0, (y0 + y1) // 2), ((y0 + y1) // 2, y1)), start=1):
            coco["annotations"].append({"id": 2 * i + part, "image_id": i, "category_id": part, "iscrowd": 0,
                                        "segmentation": [[x0, top, x1, top, x1, bottom, x0, bottom]]})
    (root / "parts.json").write_text(json.dumps(coco))
    return root / "parts.json"


def test_partimagenet_json_objects_are_of_the_images_wnid(tmp_path, monkeypatch, caplog):
    """The class of a PartImageNet json's object is the image's wnid (its file name), never the
    shared super-category: every image of a known class gets parts; one of a class the model does
    not know is a warning line and a counted skip."""
    model = FakeModel()
    model.class_wnids = ("n02085620", "n02085782")
    _use(monkeypatch, model)
    tree = tmp_path / "tree"
    parts = _partimagenet_tree(tree, ["n02085620", "n02085782", "n02085620", "n09999999"])
    out = tmp_path / "out"
    cfg = _config(tree, out, mask_source="annotations", annotations=str(parts), annotations_are_parts=True)
    with caplog.at_level("WARNING", logger="part_distillation"):
        summary = predict.run(cfg, JobContext())
    assert (summary.written, dict(summary.skipped)) == (3, {"unknown_object_class": 1})
    assert summary.extra["objects_of_unknown_class"] == 1
    unknown = [r.getMessage() for r in caplog.records if "of no class the model knows" in r.getMessage()]
    assert len(unknown) == 1 and "n09999999_4.JPEG" in unknown[0]
    assert sorted(cls for _, _, cls in model.calls) == [0, 0, 1]
    records = {r["key"]: r for r in RecordStore(out).iter_records()}
    assert sorted(records) == ["n02085620/n02085620_1.JPEG", "n02085620/n02085620_3.JPEG",
                               "n02085782/n02085782_2.JPEG"]
    for key, record in records.items():
        cls = model.class_wnids.index(key.split("/")[0])
        assert record["object_classes"].tolist() == [cls] and len(record["part_masks"]) == K
        assert record["part_classes"].tolist() == [cls * K + k + 1 for k in range(K)]
    assert not any("no part found in any" in r.getMessage() for r in caplog.records)


def test_a_run_where_no_image_yields_a_part_ends_with_a_warning_saying_why(tmp_path, monkeypatch, caplog):
    model = FakeModel()
    model.class_wnids = ("n01000001",)  # knows none of the tree's classes
    _use(monkeypatch, model)
    tree = tmp_path / "tree"
    parts = _partimagenet_tree(tree, ["n02085620", "n02085782"])
    cfg = _config(tree, tmp_path / "out", mask_source="annotations", annotations=str(parts),
                  annotations_are_parts=True)
    with caplog.at_level("WARNING", logger="part_distillation"):
        summary = predict.run(cfg, JobContext())
    assert (summary.written, dict(summary.skipped)) == (0, {"unknown_object_class": 2}) and not model.calls
    final = [r.getMessage() for r in caplog.records if "no part found in any" in r.getMessage()]
    assert final == ["[predict] no part found in any of the 2 images: 2 unknown_object_class"]

    caplog.clear()
    _use(monkeypatch, FakeModel(kind="proposal"))
    with caplog.at_level("WARNING", logger="part_distillation"):  # every part below min_score
        predict.run(dataclasses.replace(cfg, stage=dataclasses.replace(cfg.stage, output=str(tmp_path / "o2"),
                                                                       min_score=0.95)), JobContext())
    final = [r.getMessage() for r in caplog.records if "no part found in any" in r.getMessage()]
    assert final == ["[predict] no part found in any of the 2 images: 2 no part scored >= stage.min_score=0.95"]


def test_a_part_distillation_model_needs_an_object_class_without_a_detector(images, tmp_path, monkeypatch):
    _use(monkeypatch, FakeModel())
    with pytest.raises(ConfigError, match="stage.object_class"):
        predict.run(_config(images, tmp_path / "out"), JobContext())


def test_missing_images_or_checkpoint_are_named_before_anything_runs(images, tmp_path):
    with pytest.raises(ConfigError, match="stage.images"):
        predict.check(_config(tmp_path / "nowhere", tmp_path / "out"))
    with pytest.raises(ConfigError, match="stage.checkpoint"):
        predict.check(_config(images, tmp_path / "out"))
    (tmp_path / "out").mkdir()
    with pytest.raises(ConfigError, match="no checkpoint under stage.checkpoint="):
        predict.check(dataclasses.replace(_config(images, tmp_path / "out"), stage=PredictStageConfig(
            images=str(images), checkpoint=str(tmp_path / "out"), output=str(tmp_path / "out"))))
    (tmp_path / "out" / "model.pth").write_bytes(b"")
    with pytest.raises(ConfigError, match="stage.annotations"):
        predict.check(_config(images, tmp_path / "out", mask_source="annotations"))
    predict.check(_config(images, tmp_path / "out", mask_source="grabcut"))


# ---------------------------------------------------------------------------------------------
# The command


def test_the_short_command_becomes_the_stage_overrides(tmp_path):
    photos = tmp_path / "holiday photos, 2026"
    args = expand_predict(["predict", str(photos), "runs/pd", "stage.mask_source=grabcut"])
    assert args[0] == "stage=predict" and args[-1] == "stage.mask_source=grabcut"
    assert expand_predict(["stage=index"]) == ["stage=index"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = validate(compose(config_name="config", overrides=[*args, f"paths.root={tmp_path}"]))
    assert cfg.stage.images == str(photos) and cfg.stage.checkpoint == "runs/pd"
    assert cfg.stage.mask_source == "grabcut"
    assert cfg.stage.output == f"{tmp_path}/outputs/predict/holiday photos, 2026"  # named after the folder


def test_the_short_command_without_its_two_paths_prints_the_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        expand_predict(["predict", "photos"])
    assert exit_info.value.code == 2 and "usage: python -m part_distillation predict" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# With a real (tiny, untrained) model in the training stages' checkpoint format


def _tiny_run(run: Path, kind: str) -> Path:
    """A stage-4/6 run folder as the stages leave it (``tests/model_runs.py``): random tiny
    weights, a 64-pixel canvas, K parts for each of two object classes."""
    return write_run(run, kind, data_root=run / "no_tree", wnids=("n01000001", "n01000002"), parts_per_class=K,
                     image_size=64)


def _check_coco(path: Path, images: Path, records: dict) -> COCO:
    """The COCO json read back by pycocotools: one image per decoded file at its original size,
    every mask decoding to that size and equal to its record's, category ids those of the records."""
    coco = COCO(str(path))
    assert len(coco.dataset["images"]) == len(IMAGES)
    names = {c["id"]: c["name"] for c in coco.dataset["categories"]}
    for image in coco.dataset["images"]:
        key = Path(image["file_name"]).relative_to(images).as_posix()
        record = records[key]
        assert (image["height"], image["width"]) == IMAGES[key][0]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        masks = decode_rles(record["part_masks"], size=IMAGES[key][0])
        assert len(anns) == len(masks)
        for ann, mask, category, name in zip(anns, masks, record["part_classes"], record["part_class_names"]):
            assert coco.annToMask(ann).shape == IMAGES[key][0]
            assert np.array_equal(coco.annToMask(ann).astype(bool), mask)
            assert ann["category_id"] == int(category) and names[int(category)] == name
    return coco


def test_a_part_distillation_checkpoint_segments_the_parts_of_the_class_asked_for(images, tmp_path):
    run = _tiny_run(tmp_path / "pd_run", "part_distillation")
    out = tmp_path / "out"
    cfg = dataclasses.replace(_config(images, out, object_class="n01000002"), stage=dataclasses.replace(
        _config(images, out).stage, checkpoint=str(run), object_class="n01000002"))
    summary = predict.run(cfg, JobContext())
    assert (summary.written, dict(summary.skipped)) == (2, {"bad_image": 1})
    records = {r["key"]: r for r in RecordStore(out).iter_records()}
    for key, (size, _) in IMAGES.items():
        assert np.asarray(Image.open(predict.overlay_path(out, key))).shape == (*size, 3)
        record = records[key]
        assert record["model_kind"] == "part_distillation" and len(record["part_masks"]) > 0
        clusters = np.asarray(record["clusters"])
        assert set(clusters.tolist()) <= set(range(K))
        assert np.array_equal(record["part_classes"], 1 * K + clusters + 1)  # object class 1 of 2
        masks = decode_rles(record["part_masks"], size=size)
        assert masks.sum(0).max() <= 1  # one label per pixel
    coco = _check_coco(out / predict.COCO_FILE, images, records)
    assert set(coco.getCatIds()) <= {1 * K + k + 1 for k in range(K)}
    assert all(c["name"].startswith("n01000002 part ") for c in coco.dataset["categories"])
    again = predict.run(cfg, JobContext())
    assert (again.written, again.already_done) == (0, 3)


def test_the_command_segments_a_folder_with_grabcut_and_a_proposal_checkpoint(images, tmp_path, monkeypatch):
    run = _tiny_run(tmp_path / "proposal_run", "proposal")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "part_distillation", "predict", str(images), str(run),
               "stage.mask_source=grabcut", f"paths.root={tmp_path}", "model.device=cpu"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "outputs" / "predict" / images.name
    records = {r["key"]: r for r in RecordStore(out).iter_records()}
    assert sorted(records) == sorted(IMAGES)
    for key, (size, box) in IMAGES.items():
        assert np.asarray(Image.open(predict.overlay_path(out, key))).shape == (*size, 3)
        obj = decode_rles(records[key]["object_masks"], size=size)
        parts = decode_rles(records[key]["part_masks"], size=size)
        assert len(obj) == 1 and not (parts & ~obj[0]).any()  # proposals restricted to the GrabCut object
    coco = _check_coco(out / predict.COCO_FILE, images, records)
    assert coco.dataset["categories"] == [{"id": 1, "name": "part"}]
    assert f"bad image skipped: {images / BROKEN}" in result.stdout + result.stderr
    GlobalHydra.instance().clear()  # the same command again (in this process): the output accepts it, all done
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = validate(compose(config_name="config", overrides=expand_predict(command[3:])))
    from part_distillation.stages.shard_io import output_conflict

    assert output_conflict(cfg) is None
    monkeypatch.setattr(predict, "load_trained_model", _no_model)
    again = predict.run(cfg, JobContext())
    assert (again.written, again.already_done, dict(again.skipped)) == (0, 3, {"bad_image": 1})
