"""Object-mask sources of stage 1: the keep rule, given annotations, GrabCut, Detic and Mask2Former."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from part_distillation.data.frame import ImageFrame
from part_distillation.data.object_annotations import read_object_annotations
from part_distillation.data.synthetic import class_templates, render_sample
from part_distillation.masks import encode_rle, mask_iou
from part_distillation.models.object_masks import (AnnotationSource, DeticSource, GrabCutSource, SourceImage,
                                                   boxes_from_masks, select_own_class_top)

torch.set_num_threads(min(2, torch.get_num_threads()))


# --------------------------------------------------------------------------- the keep rule


def test_own_class_detections_are_kept_best_first():
    classes = [3, 1, 3, 2, 3]
    scores = [0.2, 0.9, 0.5, 0.8, 0.1]
    assert select_own_class_top(classes, scores, own_class=3, keep_top=10).tolist() == [2, 0, 4]
    assert select_own_class_top(classes, scores, own_class=3, keep_top=2).tolist() == [2, 0]


def test_without_own_class_every_detection_competes():
    classes = [3, 1, 3, 2, 3]
    scores = [0.2, 0.9, 0.5, 0.8, 0.1]
    assert select_own_class_top(classes, scores, own_class=7, keep_top=10).tolist() == [1, 3, 2, 0, 4]
    # the filter switched off: the own class is ignored
    assert select_own_class_top(classes, scores, own_class=3, keep_top=3, own_class_filter=False).tolist() == [1, 3, 2]


def test_top_ten_of_many_own_class_detections():
    # 14 detections of class 5 with scores 0.01..0.14 shuffled, 3 better ones of class 0
    rng = np.random.default_rng(0)
    own_scores = rng.permutation(np.arange(1, 15) / 100)
    classes = np.array([0, 0, 0] + [5] * 14)
    scores = np.concatenate([[0.99, 0.98, 0.97], own_scores])
    kept = select_own_class_top(classes, scores, own_class=5, keep_top=10)
    assert len(kept) == 10 and set(classes[kept]) == {5}
    assert np.allclose(scores[kept], np.arange(14, 4, -1) / 100)  # 0.14, 0.13, ..., 0.05
    assert select_own_class_top([], [], own_class=5, keep_top=10).tolist() == []


def test_boxes_from_masks_are_pixel_edges():
    masks = np.zeros((2, 6, 8), bool)
    masks[0, 1:4, 2:7] = True  # rows 1..3, cols 2..6
    assert boxes_from_masks(masks).tolist() == [[2, 1, 7, 4], [0, 0, 0, 0]]


# --------------------------------------------------------------------------- given annotations


def _coco(path: Path, images, anns, categories) -> Path:
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return path


def test_annotation_source_maps_objects_to_the_fitted_frame_and_classes(tmp_path):
    h, w = 20, 40  # fitted to 320x640 (x16)
    big, small = np.zeros((h, w), bool), np.zeros((h, w), bool)
    big[2:12, 4:24] = True
    small[15:18, 30:33] = True
    images = [{"id": 1, "file_name": "n00000002/a.JPEG", "height": h, "width": w}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": encode_rle(small)},
            {"id": 2, "image_id": 1, "category_id": 2, "segmentation": encode_rle(big)}]
    cats = [{"id": 1, "name": "cat", "wnid": "n00000001"}, {"id": 2, "name": "dog"}]
    given = read_object_annotations(_coco(tmp_path / "objects.json", images, anns, cats))
    source = AnnotationSource(given, {"n00000001": 0, "dog": 1})
    frame = ImageFrame.fit((h, w))
    assert frame.fitted == (320, 640)
    image = np.zeros((320, 640, 3), np.uint8)
    own_dog = source([SourceImage("n00000002/a.JPEG", image, frame, class_index=1)])[0]
    assert own_dog.classes.tolist() == [1] and own_dog.class_names == ["dog"]  # own class only
    assert own_dog.masks.shape == (1, 320, 640) and own_dog.masks[0].sum() == big.sum() * 256
    assert own_dog.boxes.tolist() == [[64, 32, 384, 192]]
    neither = source([SourceImage("elsewhere/a.JPEG", image, frame, class_index=5)])[0]  # by file name
    assert sorted(neither.classes.tolist()) == [0, 1]
    missing = source([SourceImage("n00000002/b.JPEG", image, frame, class_index=1)])[0]
    assert len(missing) == 0 and missing.masks.shape == (0, 320, 640)
    with pytest.raises(ValueError, match="annotation is 20x40"):
        source([SourceImage("n00000002/a.JPEG", image, ImageFrame.fit((21, 40)), class_index=1)])


def test_part_file_gives_the_union_of_parts_as_one_object(tmp_path):
    h, w = 10, 10
    head, leg = np.zeros((h, w), bool), np.zeros((h, w), bool)
    head[0:3, 0:3] = True
    leg[5:9, 6:8] = True
    images = [{"id": 7, "file_name": "n01/x.JPEG", "height": h, "width": w}]
    polygon = [[5.0, 5.0, 5.0, 9.0, 9.0, 9.0, 9.0, 5.0]]  # PartImageNet ships polygons
    anns = [{"id": 1, "image_id": 7, "category_id": 1, "segmentation": encode_rle(head)},
            {"id": 2, "image_id": 7, "category_id": 2, "segmentation": polygon}]
    cats = [{"id": 1, "name": "Quadruped Head", "supercategory": "Quadruped"},
            {"id": 2, "name": "Quadruped Foot", "supercategory": "Quadruped"}]
    given = read_object_annotations(_coco(tmp_path / "parts.json", images, anns, cats), parts=True)
    objects = given.get("n01/x.JPEG")
    assert objects.names == ("Quadruped",) and len(objects.rles) == 1
    found = AnnotationSource(given, {})([SourceImage("n01/x.JPEG", np.zeros((640, 640, 3), np.uint8),
                                                    ImageFrame.fit((h, w)), 0)])[0]
    assert found.classes.tolist() == [-1]  # a supercategory is not a dataset class, nor "n01" a wnid
    union = found.masks[0]
    assert union[:192, :192].all() and union[320:576, 320:576].any() and not union[400:, :300].any()


def test_part_file_object_is_of_the_images_imagenet_class_not_its_supercategory(tmp_path):
    """PartImageNet: two dog breeds share the super-category Quadruped; each image's object is of
    its own wnid, from the file name's prefix, or from its folder in the tree when the name has none."""
    from part_distillation.data.object_annotations import wnid_of_key

    h, w = 8, 8
    mask = np.zeros((h, w), bool)
    mask[2:6, 2:6] = True
    images = [{"id": 1, "file_name": "n02085620_17.JPEG", "height": h, "width": w},
              {"id": 2, "file_name": "n02085782_4.JPEG", "height": h, "width": w},
              {"id": 3, "file_name": "photo.JPEG", "height": h, "width": w}]
    anns = [{"id": i, "image_id": i, "category_id": 1 + i % 2, "segmentation": encode_rle(mask)} for i in (1, 2, 3)]
    cats = [{"id": 1, "name": "Quadruped Head", "supercategory": "Quadruped"},
            {"id": 2, "name": "Quadruped Body", "supercategory": "Quadruped"}]
    given = read_object_annotations(_coco(tmp_path / "parts.json", images, anns, cats), parts=True)
    assert given.get("n02085620_17.JPEG").wnids == ("n02085620",)
    assert given.get("photo.JPEG").wnids == (None,)
    # the model's classes, in head order; "Quadruped" is not one of them
    source = AnnotationSource(given, {"n02085782": 0, "n02085620": 1, "n02086240": 2})
    frame, image = ImageFrame.fit((h, w)), np.zeros((640, 640, 3), np.uint8)
    found = source([SourceImage("n02085620/n02085620_17.JPEG", image, frame, -1),
                    SourceImage("n02085782_4.JPEG", image, frame, -1),
                    SourceImage("n02086240/photo.JPEG", image, frame, -1)])
    assert [f.classes.tolist() for f in found] == [[1], [0], [2]]
    assert found[0].class_names == ["Quadruped"]
    assert wnid_of_key("a/n02086240/b/photo.png") == "n02086240" and wnid_of_key("x/photo.png") is None
    assert wnid_of_key("n02086240_3.JPEG") == "n02086240"


# --------------------------------------------------------------------------- GrabCut


def test_grabcut_finds_the_synthetic_object_better_than_its_initial_box():
    templates = class_templates(4, 4, seed=0)
    source = GrabCutSource(margin=0.1)
    ious, box_ious = [], []
    for ci in range(4):
        for j in range(2):
            sample = render_sample(templates[ci], 128, np.random.default_rng([1, ci, j]))
            frame = ImageFrame.fit(sample.image.shape[:2])
            found = source([SourceImage("k", frame.fit_image(sample.image), frame, ci)])[0]
            true = frame.masks_to_fitted(sample.labels > 0)
            assert found.masks.shape == (1, 640, 640) and found.classes.tolist() == [-1]
            ious.append(float(mask_iou(found.masks, true[None])[0, 0]))
            box = np.zeros_like(true)
            box[64:576, 64:576] = True  # the central box GrabCut starts from
            box_ious.append(float(mask_iou(box[None], true[None])[0, 0]))
    # measured: mean IoU 0.69 (0.44-0.94; GrabCut at work size 320) against 0.20 for the initial box
    assert np.mean(ious) > 0.5 and np.mean(ious) > np.mean(box_ious) + 0.2, (ious, box_ious)
    again = source([SourceImage("k", frame.fit_image(sample.image), frame, 3)])[0]
    assert np.array_equal(again.masks, found.masks)  # deterministic


# --------------------------------------------------------------------------- Detic (tiny fixture)


@pytest.mark.reference
def test_detic_source_equals_the_rule_applied_after_full_prediction(reference_models: Path):
    from PIL import Image

    from part_distillation.models.detic import DeticConfig, build_detic

    cfg = DeticConfig.for_labeling("tiny", score_thresh=0.3)
    model = build_detic(reference_models / "detic_tiny.pth", cfg, vocabulary=np.load(reference_models / "detic_tiny_vocab.npy"))
    image = np.asarray(Image.open(reference_models / "test_image.png").convert("RGB"))
    frame = ImageFrame.fit(image.shape[:2])
    fitted = frame.fit_image(image)
    full = model.predict(fitted)[0]  # every detection, at the fitted size
    classes, scores = full.classes.numpy(), full.scores.numpy()
    names = [f"c{i}" for i in range(5)]
    source = DeticSource(model, names, keep_top=10)
    for own in range(5):
        found = source([SourceImage("k", fitted, frame, own)])[0]
        mine = np.flatnonzero(classes == own)
        pool = mine if len(mine) else np.arange(len(classes))
        expected = pool[np.argsort(-scores[pool], kind="stable")][:10]
        assert found.classes.tolist() == classes[expected].tolist(), own
        assert np.allclose(found.scores, scores[expected])
        assert np.array_equal(found.masks, full.masks.numpy()[expected])
        assert found.masks.shape[1:] == frame.fitted and found.class_names == [names[c] for c in found.classes]
    assert len(full) > 10 and len(set(classes.tolist())) > 1  # a real choice was made
    with pytest.raises(ValueError, match="vocabulary has 5 classes"):
        DeticSource(model, names[:4])


@pytest.mark.reference
def test_mask2former_source_gives_fitted_masks_best_first(reference_models: Path):
    from part_distillation.models.checkpoint import load_detectron2_pickle
    from part_distillation.models.mask2former import build_mask2former
    from part_distillation.models.object_masks import Mask2FormerSource

    model = build_mask2former("tiny_fixture")
    load_detectron2_pickle(model, reference_models / "m2f_tiny.pkl")
    rng = np.random.default_rng(0)
    frames = [ImageFrame.fit((96, 128)), ImageFrame.fit((128, 64))]
    inputs = [SourceImage(str(i), rng.integers(0, 255, (*f.fitted, 3), dtype=np.uint8), f, 0)
              for i, f in enumerate(frames)]
    found = Mask2FormerSource(model.eval(), keep_top=5)(inputs)
    for f, objects in zip(frames, found):
        assert 0 < len(objects) <= 5 and objects.masks.shape[1:] == f.fitted
        assert np.all(np.diff(objects.scores) <= 0) and objects.classes.tolist() == [-1] * len(objects)
        assert all(name.startswith("coco:") for name in objects.class_names)
        assert objects.masks.reshape(len(objects), -1).any(1).all()


# --------------------------------------------------------------------------- building from plain values


def test_build_source_makes_each_kind_from_plain_values(tmp_path):
    from part_distillation.models.object_masks import build_source

    grabcut = build_source("grabcut", grabcut_margin=0.2, grabcut_iterations=3, grabcut_work_size=None)
    assert isinstance(grabcut, GrabCutSource) and (grabcut.margin, grabcut.iterations) == (0.2, 3)
    assert grabcut.work_size is None
    given = build_source("annotations", annotations={}, class_index_of={"n01": 0}, keep_top=2,
                         own_class_filter=False)
    assert isinstance(given, AnnotationSource) and given.keep_top == 2 and not given.own_class_filter
    with pytest.raises(ValueError, match="annotations source needs"):
        build_source("annotations")
    with pytest.raises(FileNotFoundError, match=f"detic weights not found at {tmp_path / 'no.pth'}"):
        build_source("detic", weights=str(tmp_path / "no.pth"), class_names=["a"])
    with pytest.raises(FileNotFoundError, match="mask2former source needs a weights file"):
        build_source("mask2former")
    with pytest.raises(ValueError, match="unknown object-mask source 'sam'"):
        build_source("sam")


@pytest.mark.reference
def test_build_source_detic_is_the_labelling_preset_with_the_vocabulary(reference_models: Path):
    from part_distillation.models.object_masks import build_source

    vocabulary = np.load(reference_models / "detic_tiny_vocab.npy")
    names = [f"c{i}" for i in range(len(vocabulary))]
    source = build_source("detic", weights=str(reference_models / "detic_tiny.pth"), model_size="tiny",
                          class_names=names, vocabulary=vocabulary, keep_top=3, score_threshold=0.3)
    assert isinstance(source, DeticSource) and source.keep_top == 3 and source.class_names == names
    assert source.model.num_classes == len(names)
    with pytest.raises(ValueError, match="one vocabulary embedding per class"):
        build_source("detic", weights=str(reference_models / "detic_tiny.pth"), model_size="tiny",
                     class_names=names[:-1], vocabulary=vocabulary)
