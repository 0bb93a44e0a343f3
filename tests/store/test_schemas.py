"""Record schemas: the writer refuses records that do not match their declaration."""
import numpy as np
import pytest

from part_distillation.masks import encode_rle
from part_distillation.store import RecordStore, ShardWriter
from part_distillation.store.schemas import OBJECT_MASKS, SCHEMAS, SchemaError


def _object_record(**changes):
    mask = np.zeros((4, 6), bool)
    mask[1:3, 2:5] = True
    record = {"key": "n1/a.jpg", "path": "/d/n1/a.jpg", "wnid": "n1", "class_index": 3, "class_name": "dog",
              "original_size": [8, 12], "fitted_size": [4, 6], "source": "annotations",
              "masks": [encode_rle(mask)], "boxes": np.array([[2.0, 1.0, 5.0, 3.0]]),
              "scores": np.array([0.9]), "pred_classes": np.array([3]), "pred_class_names": ["dog"]}
    record.update(changes)
    return record


def test_every_schema_is_registered_by_name():
    assert set(SCHEMAS) == {"index", "object_masks", "part_segments", "part_labels", "eval_states",
                            "part_predictions"}


def test_writer_accepts_matching_record_and_reads_it_back(tmp_path):
    with ShardWriter(tmp_path / "out", 0, 1, stage="t", config={}, schema=OBJECT_MASKS) as w:
        w.write(_object_record())
    (record,) = RecordStore(tmp_path / "out").iter_records()
    assert record["class_index"] == 3 and record["fitted_size"] == [4, 6]


@pytest.mark.parametrize("changes, message", [
    ({"masks": None}, "'masks'.*missing"),
    ({"class_index": "3"}, "'class_index' should be int"),
    ({"fitted_size": [4]}, "'fitted_size' should be size"),
    ({"part_mask": []}, r"\['part_mask'\] are not in the schema"),
])
def test_writer_refuses_mismatching_record_and_writes_nothing(tmp_path, changes, message):
    with ShardWriter(tmp_path / "out", 0, 1, stage="t", config={}, schema=OBJECT_MASKS) as w:
        with pytest.raises(SchemaError, match=message):
            w.write(_object_record(**changes))
    assert list(RecordStore(tmp_path / "out").iter_records()) == []
