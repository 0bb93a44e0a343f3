"""Reading: order, duplicates, lookup, slices."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from part_distillation.store import DuplicateKeyError, RecordStore
from tests.store.helpers import assert_same, make_record, writer


def test_several_shards_iterate_all_in_shard_order(tmp_path):
    for shard in (2, 0, 1):  # written out of order, read in index order
        with writer(tmp_path, shard, 3) as w:
            for i in range(shard * 10, shard * 10 + 4):
                w.write(make_record(i))
    store = RecordStore(tmp_path)
    order = [0, 1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 23]
    assert [r["i"] for r in store.iter_records()] == order
    assert store.keys() == [make_record(i)["key"] for i in order] and len(store) == 12
    assert [p.name for p in store.shard_paths()] == [f"0000{s}-of-00003.rec" for s in range(3)]
    assert [r["i"] for r in store.iter_records(shards=[2, 0])] == [0, 1, 2, 3, 20, 21, 22, 23]
    assert_same(make_record(12), store.get(make_record(12)["key"]))
    with pytest.raises(KeyError):
        store.get("absent")
    # File count grows with shards, not with records: 3 shards + 3 summaries + 3 key tables + manifest.
    assert sum(len(files) for _, _, files in os.walk(tmp_path)) == 10


def test_duplicate_keys_refused_in_a_shard_and_yielded_once_across_shards(tmp_path, caplog):
    with writer(tmp_path, 0, 2) as w:
        w.write({"key": "same", "v": 0})
        with pytest.raises(DuplicateKeyError, match="already in"):
            w.write({"key": "same", "v": 1})
    with writer(tmp_path, 1, 2) as w:  # a job given an overlapping slice
        w.write({"key": "same", "v": 2})
        w.write({"key": "other", "v": 3})
    store = RecordStore(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert [r["v"] for r in store.iter_records()] == [0, 3]
    assert "duplicate key 'same'" in caplog.text
    assert store.keys() == ["same", "other"] and store.get("same")["v"] == 0


def test_reader_sees_complete_records_while_a_writer_is_active(tmp_path, caplog):
    w = writer(tmp_path)
    for i in range(3):
        w.write(make_record(i))
    with open(w.path, "ab") as f:  # a record half way through being written
        f.write(b"PDR1\x99\x00")
    with caplog.at_level(logging.WARNING):
        assert [r["i"] for r in RecordStore(tmp_path).iter_records()] == [0, 1, 2]
    assert caplog.text == ""  # a torn tail under an active writer is normal, not a warning
    w.close()


# ----------------------------------------------------------------------------- lookup

def _write_keys(path, keys_per_shard, extra=None):
    for shard, keys in enumerate(keys_per_shard):
        with writer(path, shard, len(keys_per_shard)) as w:
            for key in keys:
                w.write({"key": key, "shard": shard, **(extra(key) if extra else {})})


def test_a_missing_key_does_not_rebuild_the_index_and_refresh_sees_new_records(tmp_path, monkeypatch):
    from part_distillation.store import reader

    _write_keys(tmp_path, [[f"a{i}" for i in range(50)], [f"b{i}" for i in range(50)]])
    loads = []
    real_load = reader.load_table
    monkeypatch.setattr(reader, "load_table", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    store = RecordStore(tmp_path)
    assert store.get("b7")["shard"] == 1 and "a3" in store
    assert len(loads) == 2  # one index build: one table per shard file
    for i in range(100):
        assert f"absent{i}" not in store
    with pytest.raises(KeyError):
        store.get("absent")
    assert len(loads) == 2
    with writer(tmp_path, 0, 2) as w:
        w.write({"key": "late", "shard": 0})
    assert "late" not in store  # the index is a snapshot ...
    store.refresh()
    assert store.get("late")["shard"] == 0 and len(loads) == 4  # ... until refreshed


def test_the_index_costs_a_few_dozen_bytes_per_key(tmp_path):
    _write_keys(tmp_path, [[f"n{i % 50:08d}/n{i % 50:08d}_{i}.JPEG" for i in range(s, 3000, 2)] for s in (0, 1)])
    store = RecordStore(tmp_path)
    assert "n00000007/n00000007_7.JPEG" in store
    assert store.index_nbytes / 3000 <= 24


def test_hash_collisions_never_return_a_wrong_record(tmp_path, monkeypatch):
    from part_distillation.store import keytable

    monkeypatch.setattr(keytable, "key_hash", lambda key: len(key))  # every key of one length collides
    with writer(tmp_path, 0, 2) as w:
        for key in ("aa", "bb", "cc"):
            w.write({"key": key, "v": key})
        w.write({"key": "bb", "v": "bb2"}, replace=True)  # supersedes bb only, not aa or cc
    with writer(tmp_path, 1, 2) as w:
        w.write({"key": "dd", "v": "dd"})
        w.write({"key": "aa", "v": "aa-dup"})  # a duplicate of shard 0's aa: first wins
    from part_distillation.store import reader
    monkeypatch.setattr(reader, "key_hash", lambda key: len(key))
    store = RecordStore(tmp_path)
    assert [store.get(k)["v"] for k in ("aa", "bb", "cc", "dd")] == ["aa", "bb2", "cc", "dd"]
    assert "ee" not in store and "a" not in store
    assert sorted(r["v"] for r in store.iter_records()) == ["aa", "bb2", "cc", "dd"]


# ----------------------------------------------------------------------------- key tables

def test_key_tables_are_saved_extended_and_rebuilt_when_stale(tmp_path):
    from part_distillation.store import load_table

    with writer(tmp_path) as w:
        for i in range(5):
            w.write(make_record(i))
    idx = w.path.with_suffix(".idx")
    assert idx.exists() and len(load_table(w.path)) == 5
    with writer(tmp_path) as w2:  # a resumed run appends: the saved table covers a prefix
        w2.write(make_record(5))
        assert [r["i"] for r in RecordStore(tmp_path).iter_records()] == list(range(6))
    idx.write_bytes(b"PDI1garbage")  # a damaged table is rebuilt from the shard
    assert [r["i"] for r in RecordStore(tmp_path).iter_records()] == list(range(6))
    assert len(load_table(w.path)) == 6
    idx.unlink()
    assert RecordStore(tmp_path).get(make_record(3)["key"])["i"] == 3 and idx.exists()
    data = w.path.read_bytes()  # the shard replaced by another one (new inode): rebuilt
    w.path.unlink()
    w.path.write_bytes(data)
    assert [r["i"] for r in RecordStore(tmp_path).iter_records()] == list(range(6))


# ----------------------------------------------------------------------------- duplicates, memory

def _peak_bytes(fn) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _long_keys(shard: int, n: int) -> list[str]:
    return [f"n{shard:08d}/{'x' * 480}_{i:06d}.JPEG" for i in range(n)]


def test_reading_does_not_remember_every_key(tmp_path):
    """Memory while reading is about two shard files' read buffers, not the keys of the store."""
    shards = [_long_keys(s, 1000) for s in range(12)]
    shards[3][:10] = shards[0][:10]  # duplicates across shards are still dropped
    _write_keys(tmp_path, shards, extra=lambda key: {"wnid": key[:9]})
    store = RecordStore(tmp_path)
    next(store.iter_slice(0, 2, by="class"))  # imports done outside the measurement
    seen = []
    peak = _peak_bytes(lambda: seen.extend(r["shard"] for r in store.iter_records()))
    assert len(seen) == 12000 - 10 and seen.count(3) == 990
    key_bytes = sum(len(k) for s in shards for k in s)  # ~6 MB: what a set of keys would hold
    assert peak < key_bytes / 3, (peak, key_bytes)
    for by in ("key", "class"):
        peak = _peak_bytes(lambda: sum(1 for _ in store.iter_slice(1, 3, by=by)))
        assert peak < key_bytes / 3, (by, peak, key_bytes)


# ----------------------------------------------------------------------------- slices

def test_slices_by_key_follow_the_stated_hash_rule(tmp_path):
    import hashlib

    keys = [f"n{i % 7:08d}/img_{i}.JPEG" for i in range(300)]
    _write_keys(tmp_path, [keys[s::3] for s in range(3)])  # written by 3 jobs ...
    store = RecordStore(tmp_path)
    for count in (2, 5):  # ... read by 2 or 5
        got = [[r["key"] for r in store.iter_slice(i, count, by="key")] for i in range(count)]
        for i, keys_i in enumerate(got):
            for key in keys_i:
                h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
                assert h % count == i
        assert sorted(k for g in got for k in g) == sorted(keys)


def test_slices_by_class_match_the_class_partition_of_the_tree(tmp_path):
    from part_distillation.data.imagenet import ImageRecordRef, shard

    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 30, size=23)
    refs = [ImageRecordRef(key=f"n{c:08d}/img_{j}.JPEG", path=f"/d/n{c:08d}/img_{j}.JPEG", wnid=f"n{c:08d}",
                           class_index=c) for c in range(23) for j in range(sizes[c])]
    for m in range(4):  # an index output written by 4 jobs, sharded by image
        with writer(tmp_path, m, 4) as w:
            for ref in shard(refs, m, 4, by="image"):
                w.write({"key": ref.key, "wnid": ref.wnid, "class_index": ref.class_index,
                         "ok": ref.class_index != 5, "reason": "bad" if ref.class_index == 5 else ""})
    store = RecordStore(tmp_path)
    for count in (3, 6):
        for index in range(count):
            got = [r["key"] for r in store.iter_slice(index, count, by="class")]
            assert sorted(got) == [r.key for r in shard(refs, index, count, by="class")]
            # the size of a slice (a progress total) from the key tables, without reading records
            assert store.slice_size(index, count, by="class") == len(got)
            assert store.slice_size(index, count, by="key") == sum(1 for _ in store.iter_slice(index, count, by="key"))
            # one rule (store/sharding.py): the store's slices by image are the tree's shards by image
            by_image = [r["key"] for r in store.iter_slice(index, count, by="image")]
            assert sorted(by_image) == [r.key for r in shard(refs, index, count, by="image")]
    with pytest.raises(ValueError, match="shard index"):
        next(store.iter_slice(3, 3))
    with pytest.raises(ValueError, match="'class' or 'image'"):
        next(store.iter_slice(0, 3, by="wnid"))
    with pytest.raises(ValueError, match="shard index"):
        store.slice_size(3, 3)
