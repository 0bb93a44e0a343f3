import numpy as np
import pytest
import torch

from part_distillation.data.part_records import PartRecordDataset, RecordFilter, collate, map_record
from part_distillation.data.transforms import AugmentConfig
from part_distillation.store import RecordStore

from .part_fixtures import write_part_segments


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    return write_part_segments(root / "synthetic", root / "records")


def test_mapper_gives_fixed_size_samples_with_class_agnostic_labels(records):
    dataset = PartRecordDataset([records], augment=AugmentConfig(size=64), seed=0)
    sample = dataset[(0, 3)]
    assert sample["image"].shape == (3, 64, 64) and sample["image"].dtype == torch.uint8
    n = len(sample["labels"])
    assert n >= 1 and sample["masks"].shape == (n, 64, 64) and sample["masks"].dtype == torch.bool
    assert sample["labels"].tolist() == [0] * n
    assert sample["key"] == dataset.entries[3][1]
    # each kept part is > 5% of the total kept-and-dropped part area after augmentation
    areas = sample["masks"].flatten(1).sum(1).float()
    assert (areas / areas.sum() > 0.05).all()


def test_sample_is_a_pure_function_of_seed_epoch_index(records):
    a = PartRecordDataset([records], augment=AugmentConfig(size=64), seed=0)
    b = PartRecordDataset([records], augment=AugmentConfig(size=64), seed=0)
    for sid in [(0, 1), (2, 1), (0, 5)]:
        assert torch.equal(a[sid]["image"], b[sid]["image"]) and torch.equal(a[sid]["masks"], b[sid]["masks"])
    assert not torch.equal(a[(0, 1)]["image"], a[(1, 1)]["image"])  # another epoch, another augmentation


def test_object_ratio_filter_is_strict_and_record_sets_combine(records):
    ratios = sorted(float(r["object_ratio"]) for r in RecordStore(records).iter_records())
    threshold = ratios[2]
    strict = PartRecordDataset([records], filter=RecordFilter(min_object_ratio=threshold))
    inclusive = PartRecordDataset([records], filter=RecordFilter(min_object_ratio=threshold, inclusive=True))
    assert len(strict) == sum(r > threshold for r in ratios) and strict.filtered_out == len(ratios) - len(strict)
    assert len(inclusive) == sum(r >= threshold for r in ratios)
    both = PartRecordDataset([records, records], filter=RecordFilter(min_object_ratio=threshold))
    assert len(both) == 2 * len(strict) and {s for s, _ in both.entries} == {0, 1}
    with pytest.raises(ValueError, match="no training record passes"):
        PartRecordDataset([records], filter=RecordFilter(min_object_ratio=1.0))


def test_collate_normalises_and_pads_targets_like_the_input(records):
    dataset = PartRecordDataset([records], augment=AugmentConfig(size=48), seed=0)
    batch = collate([dataset[(0, 0)], dataset[(0, 1)]])
    # 48 is padded to the next multiple of 32 = 64, targets too (zeros)
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    assert batch["pixel_values"][:, :, 48:].abs().sum() == 0
    for target, sample in zip(batch["targets"], (dataset[(0, 0)], dataset[(0, 1)])):
        assert target["masks"].shape[1:] == (64, 64) and target["masks"].dtype == torch.float32
        assert torch.equal(target["masks"][:, :48, :48], sample["masks"].float())
        assert target["masks"][:, 48:].sum() == 0 and target["masks"][:, :, 48:].sum() == 0
    assert batch["class_indices"].dtype == torch.int64


def test_mapper_refuses_a_record_whose_image_has_another_size(records):
    record = next(RecordStore(records).iter_records())
    image = np.zeros((10, 10, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="original_size"):
        map_record(record, np.random.default_rng(0), AugmentConfig(size=32), np.zeros(4, np.int64), image=image)


def test_part_labels_records_use_cluster_ids_and_the_part_ratio_filter(records, tmp_path):
    from part_distillation.data.part_records import cluster_labels
    from part_distillation.masks import rle_area
    from part_distillation.store import ShardWriter
    from part_distillation.store.schemas import PART_LABELS

    out = tmp_path / "labels"
    with ShardWriter(out, 0, 1, stage="part_ranking", config={}, code_version="test", schema=PART_LABELS) as w:
        for r in RecordStore(records).iter_records():
            areas = rle_area(r["part_masks"]).astype(float)
            ratios = areas / areas.sum()
            ratios[0] = 0.01  # the first part is declared too small: dropped at load
            w.write({k: r[k] for k in ("key", "path", "wnid", "class_index", "class_name", "original_size",
                                       "fitted_size", "object_mask", "object_ratio", "part_masks")}
                    | {"cluster_ids": np.arange(len(areas))[::-1].copy() + 2, "scores": np.ones(len(areas)),
                       "part_ratios": ratios})
    dataset = PartRecordDataset([out], augment=AugmentConfig(size=64, min_part_ratio=0.0),
                                filter=RecordFilter(min_object_ratio=0.05, inclusive=True, min_part_ratio=0.05),
                                labels=cluster_labels)
    record = dataset.record(0)
    n = len(record["part_masks"])
    sample = dataset[(0, 0)]
    expected = (np.arange(n)[::-1] + 2)[1:]  # the cluster ids of parts 1..n-1
    assert set(sample["labels"].tolist()) <= set(expected.tolist()) and 0 < len(sample["labels"]) <= n - 1
    assert (n + 1) not in sample["labels"].tolist()  # part 0's cluster id never appears


def test_stage_6_filter_refuses_part_ratios_of_the_old_denominator():
    """A PART_LABELS record with ``area_ratios`` (part / object, before stage 5 wrote
    ``part_ratios`` over the canvas) is refused with what to do, never filtered as if it were
    over the canvas; without a part filter (stage 4, baselines) the field is not read."""
    from part_distillation.data.labelled_records import RecordList

    old = RecordList([{"key": "a", "object_ratio": 0.2, "part_masks": [None, None],
                       "area_ratios": np.array([0.6, 0.4])}], name="old labels")
    with pytest.raises(ValueError, match=r"old labels.*'a'.*area_ratios.*rerun part_ranking"):
        PartRecordDataset([old], filter=RecordFilter(min_object_ratio=0.05, inclusive=True, min_part_ratio=0.05))
    assert len(PartRecordDataset([old], filter=RecordFilter(min_object_ratio=0.05))) == 1
    new = RecordList([{"key": "a", "object_ratio": 0.05, "part_masks": [None, None, None],
                       "part_ratios": np.array([0.05, 0.0499, 0.2])}])
    dataset = PartRecordDataset([new], filter=RecordFilter(min_object_ratio=0.05, inclusive=True, min_part_ratio=0.05))
    assert len(dataset) == 1 and dataset.filter.part_indices(dataset.record(0)).tolist() == [0, 2]
