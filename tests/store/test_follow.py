"""Reading a stage output while it is written: closed shards and reading on from an offset."""
from __future__ import annotations

import numpy as np

from part_distillation.store import RecordStore, ShardWriter


def _writer(path, index, count=2):
    return ShardWriter(path, index, count, stage="s", config={"a": 1}, code_version="test")


def test_closed_shards_are_those_with_a_summary_and_no_writer(tmp_path):
    out = tmp_path / "out"
    first = _writer(out, 0)
    second = _writer(out, 1)
    store = RecordStore(out)
    assert store.closed_shards() == set()
    first.write({"key": "a", "x": 1})
    first.close()
    assert store.closed_shards() == {0}
    second.close()
    assert store.closed_shards() == {0, 1}
    reopened = _writer(out, 0)  # a rerun of a closed shard: its old summary is still there
    assert store.closed_shards() == {1}
    reopened.close()
    assert store.closed_shards() == {0, 1}


def test_reading_on_from_the_last_offset_yields_each_record_once(tmp_path):
    out = tmp_path / "out"
    writer = _writer(out, 0, 1)
    store = RecordStore(out)
    shard = out / "shards" / "00000-of-00001.rec"
    assert store.shard_paths() == [shard]
    assert list(store.iter_file_from(shard)) == []
    writer.write({"key": "a", "v": np.arange(3)})
    writer.skip("b", "no_parts")
    seen = list(store.iter_file_from(shard))
    assert [r["key"] if r else None for _, r in seen] == ["a", None]
    assert np.array_equal(seen[0][1]["v"], np.arange(3))
    offset = seen[-1][0]
    assert offset == shard.stat().st_size
    writer.write({"key": "c", "v": np.arange(2)})
    more = list(store.iter_file_from(shard, offset))
    assert [r["key"] for _, r in more] == ["c"]
    # a torn record at the end (a writer mid-append) is not yielded and the offset stays before it
    with open(out / "shards" / "00000-of-00001.rec", "ab") as f:
        f.write(b"PDR1\x10\x00")
    assert list(store.iter_file_from(shard, more[-1][0])) == []
    writer.close()
