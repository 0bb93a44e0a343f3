"""Cityscapes-Part: the uid encoding on worked examples, and the reader on a written fixture."""
import numpy as np
import pytest
from PIL import Image

from part_distillation.data.cityscapes_part import PART_CLASSES, CityscapesPartDataset, decode_uids
from part_distillation.data.part_sample import DatasetLayoutError


@pytest.mark.parametrize("uid, expected", [
    (23, (23, -1, -1)),          # class 23 only
    (23003, (23, 3, -1)),        # class 23, instance 3
    (2300304, (23, 3, 4)),       # class 23, instance 3, part 4
    (7, (7, -1, -1)),            # one-digit class
    (7012, (7, 12, -1)),         # 4 digits: class 7 instance 12
    (2601201, (26, 12, 1)),
    (700304, (7, 3, 4)),         # 6 digits: class 7 instance 3 part 4
    (0, (0, -1, -1)),
])
def test_decode_worked_examples(uid, expected):
    sid, iid, pid = decode_uids(np.array([uid]))
    assert (int(sid[0]), int(iid[0]), int(pid[0])) == expected


def test_decode_refuses_out_of_range():
    with pytest.raises(ValueError, match="uids"):
        decode_uids(np.array([10_000_000]))


def test_reader_on_fixture(tmp_path):
    labels = np.full((4, 6), 7, np.int32)         # road
    labels[0:2, 0:2] = 2400101                    # person 1: torso
    labels[2, 0:2] = 2400102                      # person 1: head
    labels[3, 0] = 24001                          # person 1: pixel without part label
    labels[0:2, 3:6] = 2600201                    # car 2: window
    labels[2:4, 3:6] = 2600205                    # car 2: chassis
    labels[3, 2] = 24                             # person pixels without instance
    labels[2, 2] = 2500300                        # rider 3 with only part 0 (unlabelled): dropped
    city = tmp_path / "gtFinePanopticParts" / "val" / "lindau"
    city.mkdir(parents=True)
    Image.fromarray(labels, mode="I").save(city / "lindau_000000_000019_gtFinePanopticParts.tif")
    person, car = list(CityscapesPartDataset(tmp_path, "val"))
    assert person.key == "lindau_000000_000019/24_1" and person.object_class == "person"
    assert person.path.endswith("leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png")
    assert person.object_mask.sum() == 4 + 2 + 1
    assert [PART_CLASSES[i] for i in person.part_ids] == ["person-torso", "person-head"]
    assert person.part_masks[0].sum() == 4 and person.part_masks[1].sum() == 2
    assert car.wnid == "n02958343"
    assert [PART_CLASSES[i] for i in car.part_ids] == ["car-window", "car-chassis"]
    assert len(PART_CLASSES) == 23


def test_missing_layout_is_named(tmp_path):
    with pytest.raises(DatasetLayoutError, match="gtFinePanopticParts/val"):
        CityscapesPartDataset(tmp_path, "val")
