"""The synthetic part dataset: deterministic, valid COCO, parts consistent within a class."""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from part_distillation.data.imagenet import list_image_tree
from part_distillation.data.images import load_rgb
from part_distillation.data.synthetic import class_templates, make_synthetic_dataset, render_sample
from part_distillation.masks import decode_rle

REPO_ROOT = Path(__file__).resolve().parents[2]
ARGS = dict(num_classes=3, images_per_class=4, size=64, seed=7, parts_per_class=4)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), **ARGS)


def _coco(path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):  # COCO prints progress
        return COCO(str(path))


def test_summary_and_tree(dataset):
    assert dataset.num_images == 12
    assert dataset.wnids == ("n90000001", "n90000002", "n90000003")
    assert dataset.num_part_categories == 12
    tree = list_image_tree(dataset.root, split="train")  # words.txt found next to the tree
    assert tree.wnids == dataset.wnids
    assert tree.names == dataset.class_names
    assert [ref.key for ref in tree.images][:2] == ["n90000001/n90000001_00000.JPEG",
                                                      "n90000001/n90000001_00001.JPEG"]
    assert len(tree) == 12
    assert load_rgb(tree.images[0].path).shape == (64, 64, 3)


def test_same_seed_same_bytes_and_pixels(dataset, tmp_path):
    again = make_synthetic_dataset(tmp_path / "again", **ARGS)
    for name in ("parts_json", "objects_json", "words_file"):
        assert getattr(again, name).read_bytes() == getattr(dataset, name).read_bytes()
    images = json.loads(dataset.parts_json.read_text())["images"]
    for entry in images:
        first = np.asarray(Image.open(dataset.image_dir / entry["file_name"]))
        second = np.asarray(Image.open(again.image_dir / entry["file_name"]))
        assert np.array_equal(first, second)


def test_other_seed_differs_and_more_images_keep_earlier_ones(dataset, tmp_path):
    other = make_synthetic_dataset(tmp_path / "other", **{**ARGS, "seed": 8})
    assert other.parts_json.read_bytes() != dataset.parts_json.read_bytes()
    more = make_synthetic_dataset(tmp_path / "more", **{**ARGS, "images_per_class": 5})
    name = "n90000002/n90000002_00003.JPEG"
    assert (more.image_dir / name).read_bytes() == (dataset.image_dir / name).read_bytes()


def test_part_json_is_valid_coco_with_parts_inside_objects(dataset):
    parts, objects = _coco(dataset.parts_json), _coco(dataset.objects_json)
    assert len(parts.getImgIds()) == len(objects.getImgIds()) == 12
    categories = parts.loadCats(parts.getCatIds())
    assert {c["supercategory"] for c in categories} == set(dataset.class_names)
    assert all(c["name"] == f"{c['supercategory']} {c['part']}" for c in categories)
    for image_id in parts.getImgIds():
        image = parts.loadImgs(image_id)[0]
        anns = parts.loadAnns(parts.getAnnIds(imgIds=image_id))
        (object_ann,) = objects.loadAnns(objects.getAnnIds(imgIds=image_id))
        object_mask = objects.annToMask(object_ann).astype(bool)
        assert 0.05 < object_mask.mean() < 0.9              # a real object, never the whole frame
        assert objects.loadCats(object_ann["category_id"])[0]["wnid"] == image["wnid"]
        union = np.zeros_like(object_mask)
        wnids = {parts.loadCats(a["category_id"])[0]["wnid"] for a in anns}
        assert wnids == {image["wnid"]}                     # parts all of the image's class
        for ann in anns:
            mask = parts.annToMask(ann).astype(bool)
            assert mask.shape == (image["height"], image["width"])
            assert ann["area"] == mask.sum() > 0
            assert not (mask & union).any()                 # parts do not overlap
            assert not (mask & ~object_mask).any()          # parts inside the object
            ys, xs = np.nonzero(mask)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            union |= mask
        assert np.array_equal(union, object_mask)           # the object is exactly its parts
        assert np.array_equal(decode_rle(object_ann["segmentation"]), object_mask)


def test_parts_keep_their_colour_across_images(dataset):
    """A part's mean colour varies little within a class, so a learner can find it."""
    data = json.loads(dataset.parts_json.read_text())
    by_category = {}
    for ann in data["annotations"]:
        if ann["area"] < 30:
            continue
        image = next(i for i in data["images"] if i["id"] == ann["image_id"])
        pixels = load_rgb(dataset.image_dir / image["file_name"])[decode_rle(ann["segmentation"])]
        by_category.setdefault(ann["category_id"], []).append(pixels.astype(float).mean(0))
    spreads = [np.std(np.stack(v), 0).max() for v in by_category.values() if len(v) > 1]
    assert spreads and np.median(spreads) < 25, spreads


def test_render_sample_is_pure_and_inside_frame():
    template = class_templates(2, 5, seed=1)[1]
    a = render_sample(template, (80, 48), np.random.default_rng(3))
    b = render_sample(template, (80, 48), np.random.default_rng(3))
    assert a.image.shape == (48, 80, 3) and a.labels.shape == (48, 80)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert set(np.unique(a.labels)) <= set(range(6)) and 1 in a.labels
    border = np.concatenate([a.labels[0], a.labels[-1], a.labels[:, 0], a.labels[:, -1]])
    assert not border.any()                                 # the object lies fully inside the image


def test_templates_have_distinct_part_names_and_colours():
    for template in class_templates(20, 6, seed=0):
        names = [p.name for p in template.parts]
        assert names[0] == "body" and len(set(names)) == 6
        assert len({p.color for p in template.parts}) == 6
    assert len({t.name for t in class_templates(20, 3)}) == 20


def test_png_split_and_words_union(tmp_path):
    make_synthetic_dataset(tmp_path, num_classes=2, images_per_class=1, size=32, split="train")
    summary = make_synthetic_dataset(tmp_path, num_classes=3, images_per_class=1, size=(40, 32), split="val",
                                     image_format="PNG")
    assert (summary.image_dir / "n90000003" / "n90000003_00000.png").is_file()
    assert Image.open(summary.image_dir / "n90000003" / "n90000003_00000.png").size == (40, 32)
    assert summary.words_file.read_text().count("\n") == 3
    assert (tmp_path / "annotations" / "train.json").is_file()  # the other split is kept
    train_image = load_rgb(tmp_path / "train" / "n90000001" / "n90000001_00000.JPEG")
    val_image = load_rgb(summary.image_dir / "n90000001" / "n90000001_00000.png")
    assert train_image.shape == (32, 32, 3) and val_image.shape == (32, 40, 3)  # splits draw their own images


def test_existing_split_needs_overwrite(tmp_path):
    make_synthetic_dataset(tmp_path, num_classes=2, images_per_class=2, size=32)
    with pytest.raises(FileExistsError):
        make_synthetic_dataset(tmp_path, num_classes=2, images_per_class=2, size=32)
    summary = make_synthetic_dataset(tmp_path, num_classes=1, images_per_class=1, size=32, overwrite=True)
    assert summary.num_images == 1
    assert len(list(summary.image_dir.rglob("*.JPEG"))) == 1


@pytest.mark.parametrize("kwargs", [dict(num_classes=0), dict(parts_per_class=1), dict(images_per_class=0),
                                    dict(size=8), dict(image_format="GIF"), dict(split="../x")])
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_synthetic_dataset(tmp_path / "out", **{"num_classes": 1, "images_per_class": 1, **kwargs})
    assert not (tmp_path / "out").exists()  # nothing written


def test_cli(tmp_path):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "make_synthetic.py"), "--out", str(tmp_path),
                             "--classes", "2", "--images-per-class", "2", "--size", "48", "--seed", "3",
                             "--parts-per-class", "3", "--split", "val"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "wrote 4 images of 2 classes" in result.stdout
    data = json.loads((tmp_path / "annotations" / "val.json").read_text())
    assert len(data["images"]) == 4 and len(data["categories"]) == 6


def test_shared_appearance_keeps_the_shapes_and_gives_every_part_the_body_colours():
    from part_distillation.data.synthetic import class_templates, render_sample

    plain = class_templates(3, 4, seed=2)
    shared = class_templates(3, 4, seed=2, shared_appearance=True)
    for a, b in zip(plain, shared):
        body = b.parts[0]
        assert [p.center for p in a.parts] == [p.center for p in b.parts]
        assert [p.shape for p in a.parts] == [p.shape for p in b.parts]
        assert all((p.color, p.color2, p.texture) == (body.color, body.color2, body.texture) for p in b.parts)
        assert len({p.color for p in a.parts}) == 4  # the default variant keeps one hue per part
    one = render_sample(plain[0], 96, np.random.default_rng(5))
    two = render_sample(shared[0], 96, np.random.default_rng(5))
    assert np.array_equal(one.labels, two.labels)
    # inside the object only the body's two colours appear (up to brightness and noise)
    inside = two.image[two.labels > 0].astype(float)
    colours = np.array([shared[0].parts[0].color, shared[0].parts[0].color2], float)
    hue_dirs = colours / np.linalg.norm(colours, axis=1, keepdims=True)
    cos = (inside / np.linalg.norm(inside, axis=1, keepdims=True)) @ hue_dirs.T
    assert np.mean(cos.max(1) > 0.97) > 0.97


def test_disjoint_halves_for_the_strict_protocol(dataset):
    from part_distillation.data.part_datasets import open_part_dataset
    from part_distillation.data.synthetic import write_split_halves

    match, evaluation = write_split_halves(dataset.root, "train")
    assert (match.name, evaluation.name) == ("train_match.json", "train_eval.json")
    first = match.read_bytes(), evaluation.read_bytes()
    write_split_halves(dataset.root, "train")
    assert (match.read_bytes(), evaluation.read_bytes()) == first   # deterministic
    full = json.loads(dataset.parts_json.read_text())
    halves = [json.loads(p.read_text()) for p in (match, evaluation)]
    ids = [{im["id"] for im in h["images"]} for h in halves]
    assert not ids[0] & ids[1] and ids[0] | ids[1] == {im["id"] for im in full["images"]}
    for h, chosen in zip(halves, ids):
        assert {a["image_id"] for a in h["annotations"]} <= chosen
        assert len(h["annotations"]) == sum(a["image_id"] in chosen for a in full["annotations"])
        assert h["categories"] == full["categories"]
    splits = {name: open_part_dataset("partimagenet", dataset.root, name, image_root=dataset.root / "train")
              for name in ("train_match", "train_eval")}
    for name, split in splits.items():
        samples = list(split.samples())
        assert len(samples) == 6   # 3 classes x 2 of their 4 images
        # round-robin over the classes: the first 3 samples are one of each
        assert len({s.object_class for s in samples[:3]}) == 3
        assert all(Path(s.path).is_file() and s.part_masks.shape[1:] == (64, 64) for s in samples)
    objects = json.loads((dataset.root / "annotations" / "objects_train_eval.json").read_text())
    assert {a["image_id"] for a in objects["annotations"]} == ids[1]


def test_halves_need_two_images_per_class(tmp_path):
    from part_distillation.data.synthetic import write_split_halves

    make_synthetic_dataset(tmp_path, num_classes=2, images_per_class=1, size=32)
    with pytest.raises(ValueError, match="fewer than 2 images"):
        write_split_halves(tmp_path, "train")
