"""Pascal-Part reader on a fixture written in the release's own .mat layout."""
import numpy as np
import pytest
import scipy.io

from part_distillation.data.pascal_part import (
    PART_CLASSES, PART_GROUPS, VOC_CLASSES, VOC_TO_WNID, PascalPartDataset, read_annotation)
from part_distillation.data.part_sample import DatasetLayoutError


def _struct(rows: list[dict], fields: list[str]) -> np.ndarray:
    """A 1 x N MATLAB struct array as scipy.io.savemat writes it."""
    out = np.zeros((1, len(rows)), dtype=[(f, object) for f in fields])
    for i, row in enumerate(rows):
        for f in fields:
            out[0, i][f] = row[f]
    return out


def write_mat(path, objects):
    """objects: [(class name, mask, [(part name, mask), ...])] -> <path> like Annotations_Part/*.mat."""
    rows = []
    for index, (name, mask, parts) in enumerate(objects):
        part_array = _struct([{"part_name": p, "mask": m.astype(np.uint8)} for p, m in parts],
                             ["part_name", "mask"]) if parts else np.zeros((0, 0))
        rows.append({"class": name, "class_ind": index + 1, "mask": mask.astype(np.uint8), "parts": part_array})
    scipy.io.savemat(str(path), {"anno": {"imname": path.stem, "objects": _struct(rows, ["class", "class_ind", "mask", "parts"])}})


@pytest.fixture
def pascal(tmp_path):
    voc, parts = tmp_path / "VOC2012", tmp_path / "Annotations_Part"
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    parts.mkdir()
    (voc / "ImageSets" / "Main" / "val.txt").write_text("2008_000001\n2008_000002\n2008_000003\n")
    h, w = 6, 8
    cat = np.zeros((h, w), bool); cat[1:5, 1:7] = True
    head = np.zeros((h, w), bool); head[1:3, 1:3] = True
    lfleg = np.zeros((h, w), bool); lfleg[3:5, 1:2] = True
    rbleg = np.zeros((h, w), bool); rbleg[3:5, 5:6] = True
    chair = np.zeros((h, w), bool); chair[0:2, 5:8] = True
    write_mat(parts / "2008_000001.mat", [("cat", cat, [("head", head), ("lfleg", lfleg), ("rbleg", rbleg)]),
                                          ("chair", chair, [])])
    door1 = np.zeros((h, w), bool); door1[2:4, 0:2] = True
    door2 = np.zeros((h, w), bool); door2[2:4, 4:6] = True
    write_mat(parts / "2008_000002.mat", [("car", door1 | door2, [("door_1", door1), ("door_2", door2)]),
                                          ("table", chair, [])])
    # 2008_000003 has no part file: images without part annotation are left out
    return voc, parts, dict(cat=cat, head=head, legs=lfleg | rbleg, door=door1 | door2)


def test_fifty_part_classes_as_the_reference_groups_them():
    assert len(PART_CLASSES) == 50
    assert set(VOC_TO_WNID) == set(VOC_CLASSES) == set(PART_GROUPS)
    assert PART_GROUPS["cat"]["lfpa"] == "paw" and PART_GROUPS["bus"]["fliplate"] == "license plate"
    assert PART_GROUPS["horse"]["lbho"] == "hoof" and PART_GROUPS["dog"]["muzzle"] == "muzzle"
    assert PART_GROUPS["train"]["cleftside"] == PART_GROUPS["train"]["crightside"] == "coach_side"


def test_samples_objects_with_parts_grouped_and_merged(pascal):
    voc, parts, truth = pascal
    samples = list(PascalPartDataset(voc, parts, "val"))
    assert [s.key for s in samples] == ["2008_000001/0", "2008_000002/0"]  # chair and table have no parts
    cat, car = samples
    assert cat.object_class == "cat" and cat.wnid == "n02121808"
    assert cat.path.endswith("JPEGImages/2008_000001.jpg")
    np.testing.assert_array_equal(cat.object_mask, truth["cat"])
    names = [PART_CLASSES[i] for i in cat.part_ids]
    assert names == sorted(names, key=PART_CLASSES.index) and set(names) == {"head", "leg"}
    np.testing.assert_array_equal(cat.part_masks[names.index("leg")], truth["legs"])   # lfleg + rbleg
    np.testing.assert_array_equal(cat.part_masks[names.index("head")], truth["head"])
    assert [PART_CLASSES[i] for i in car.part_ids] == ["door"]
    np.testing.assert_array_equal(car.part_masks[0], truth["door"])                    # door_1 + door_2


def test_table_is_renamed_diningtable(pascal):
    _, parts, _ = pascal
    assert [name for name, _, _ in read_annotation(parts / "2008_000002.mat")] == ["car", "diningtable"]


def test_missing_layout_and_unknown_part_are_named(pascal, tmp_path):
    voc, parts, truth = pascal
    with pytest.raises(DatasetLayoutError, match="ImageSets/Main/test.txt"):
        PascalPartDataset(voc, parts, "test")
    with pytest.raises(DatasetLayoutError, match="Annotations_Part"):
        PascalPartDataset(voc, tmp_path / "nowhere", "val")
    write_mat(parts / "2008_000003.mat", [("cat", truth["cat"], [("wing", truth["head"])])])
    with pytest.raises(ValueError, match="'wing' of a cat"):
        list(PascalPartDataset(voc, parts, "val"))
    (parts / "2008_000003.mat").write_bytes(b"not a mat file")
    with pytest.raises(ValueError, match="2008_000003.mat: not a Pascal-Part annotation"):
        list(PascalPartDataset(voc, parts, "val"))
