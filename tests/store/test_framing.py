"""Shard framing: value round trips, torn tails, kill -9, corruption in the middle."""
from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from part_distillation.store import FRAME_HEADER_SIZE, CorruptShardError, RecordStore, ShardWriter, repair_shard
from tests.store.helpers import RECORD_SRC, REPO, assert_same, frame_offsets, make_record, writer


def test_round_trip_of_all_value_types(tmp_path):
    record = {
        "key": "n01/ünï_çødé.JPEG",
        "none": None, "flag": True, "int": -3, "big": 2**62, "float": 1.5, "nan": float("nan"),
        "inf": float("inf"), "text": "日本語 and emoji 🦜", "empty_list": [], "empty_dict": {},
        "tuple": (1, "two"),
        "masks": [{"size": [640, 480], "counts": "PPYo0\\3M2N1"}],
        "bool": np.array([True, False]), "u8": np.arange(7, dtype=np.uint8),
        "i16": np.array([-1, 2], dtype=np.int16), "be_i32": np.arange(4, dtype=">i4"),
        "i64": np.array([[2**40, -5]], dtype=np.int64), "f16": np.array([0.5], dtype=np.float16),
        "f32": np.random.default_rng(0).random((3, 4), dtype=np.float32),
        "f64_fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "strided": np.arange(10, dtype=np.int32)[::3], "c64": np.array([1 + 2j], dtype=np.complex64),
        "zero_d": np.array(7.25), "empty": np.zeros((0, 4), dtype=np.float32),
        "np_scalar": np.float32(2.5), "np_int": np.int64(9), "blob": b"\x00\xffraw",
        "nested": {"deep": [{"emb": np.ones((2, 2), dtype=np.float32), "names": ["a", "ß"]}, [np.arange(2)]]},
        "tensor": torch.arange(3, dtype=torch.int32),
    }
    with writer(tmp_path) as w:
        w.write(record)
    (got,) = list(RecordStore(tmp_path).iter_records())
    expected = dict(record, tuple=[1, "two"], tensor=np.arange(3, dtype=np.int32))
    assert_same(expected, got)
    assert got["strided"].flags.writeable and got["f64_fortran"].flags.c_contiguous
    assert_same(expected, RecordStore(tmp_path).get(record["key"]))


@pytest.mark.parametrize("bad, what", [
    ({"key": "a", "x": {1: "int key"}}, "dict keys must be str"),
    ({"key": "a", "x": {1, 2}}, "cannot store a set at x"),
    ({"key": "a", "x": [np.array([object()])]}, "object-dtype array at x.0"),
    ({"key": ""}, "non-empty str 'key'"),
    ({"nokey": 1}, "non-empty str 'key'"),
])
def test_unstorable_values_are_refused_and_nothing_is_written(tmp_path, bad, what):
    with writer(tmp_path) as w:
        with pytest.raises((TypeError, ValueError), match=what):
            w.write(bad)
        assert w.done_keys == set()
    assert len(RecordStore(tmp_path)) == 0


def test_truncation_at_every_offset_of_the_last_record_reopens_cleanly(tmp_path, caplog):
    src = tmp_path / "src"
    with writer(src) as w:
        for i in range(3):
            w.write(make_record(i))
    data = w.path.read_bytes()
    start_last = frame_offsets(w.path)[2]
    expected = list(RecordStore(src).iter_records())
    for cut in range(start_last, len(data)):
        out = tmp_path / f"cut{cut}"
        (out / "shards").mkdir(parents=True)
        (out / "manifest.json").write_bytes((src / "manifest.json").read_bytes())
        shard = out / "shards" / w.path.name
        shard.write_bytes(data[:cut])
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert [r["i"] for r in RecordStore(out).iter_records()] == [0, 1]
        if cut > start_last:
            assert f"{shard}: ignoring incomplete record at byte offset {start_last}" in caplog.text
        with writer(out) as w2:
            assert shard.stat().st_size == start_last  # the torn tail is gone
            assert set(w2.done_keys) == {make_record(0)["key"], make_record(1)["key"]}
            w2.write(make_record(2))
        assert shard.read_bytes() == data
        got = list(RecordStore(out).iter_records())
        for a, b in zip(expected, got, strict=True):
            assert_same(a, b)


def test_a_reader_whose_shard_shrinks_under_it_stops_at_the_cut(tmp_path):
    from part_distillation.store.framing import ShardScan

    with writer(tmp_path) as w:
        for i in range(3):
            w.write(make_record(i))
    size_seen = w.path.stat().st_size
    with open(w.path, "rb") as f:
        os.truncate(w.path, frame_offsets(w.path)[2])  # a writer cutting what it took for a torn tail
        scan = ShardScan(w.path, f.fileno(), size_seen)
        assert len(list(scan)) == 2 and scan.tail[1] == "file shrank while being read"


CHILD = RECORD_SRC + textwrap.dedent('''
    import sys
    from part_distillation.store import ShardWriter
    out, n = sys.argv[1], int(sys.argv[2])
    config = {"model": {"k": 4}}
    with ShardWriter(out, 0, 1, stage="test", config=config, code_version="test", fsync_every=50) as w:
        print("ready", flush=True)
        for i in range(n):
            if not w.has(make_record(i)["key"]):
                w.write(make_record(i))
''')


def test_kill_9_while_writing_then_resume_equals_an_uninterrupted_run(tmp_path):
    n, rng = 4000, random.Random(1234)
    killed_out = tmp_path / "killed"
    kills = 0
    for _ in range(3):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(killed_out), str(n)],
                                 stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.15))
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            kills += 1
        child.wait(timeout=30)
        child.stdout.close()
        partial = list(RecordStore(killed_out).iter_records())  # always readable, prefix of the run
        assert [r["i"] for r in partial] == list(range(len(partial)))
    assert kills >= 1, "the child always finished before the kill; make it write more"
    config = {"model": {"k": 4}}
    with ShardWriter(killed_out, 0, 1, stage="test", config=config, code_version="test") as w:
        for i in range(n):
            if not w.has(make_record(i)["key"]):
                w.write(make_record(i))
    with ShardWriter(tmp_path / "clean", 0, 1, stage="test", config=config, code_version="test") as w:
        for i in range(n):
            w.write(make_record(i))
    killed, clean = RecordStore(killed_out), RecordStore(tmp_path / "clean")
    assert len(killed) == n
    for a, b in zip(clean.iter_records(), killed.iter_records(), strict=True):
        assert_same(a, b)
    assert killed.shard_paths()[0].read_bytes() == clean.shard_paths()[0].read_bytes()


@pytest.mark.parametrize("where", ["payload", "length", "magic"])
def test_corruption_in_the_middle_is_detected_and_nothing_is_lost(tmp_path, caplog, where):
    with writer(tmp_path) as w:
        for i in range(5):
            w.write(make_record(i))
    shard = w.path
    offs = frame_offsets(shard)
    original = shard.read_bytes()
    flip_at = {"payload": offs[2] + FRAME_HEADER_SIZE + 20, "length": offs[2] + 10, "magic": offs[2]}[where]
    damaged = bytearray(original)
    damaged[flip_at] ^= 0x04
    shard.write_bytes(bytes(damaged))

    with pytest.raises(CorruptShardError) as err:
        list(RecordStore(tmp_path).iter_records())
    assert err.value.offset == offs[2] and err.value.path == shard
    assert str(shard) in str(err.value) and f"byte offset {offs[2]}" in str(err.value)
    with caplog.at_level(logging.WARNING):
        assert [r["i"] for r in RecordStore(tmp_path).iter_records(on_corrupt="skip")] == [0, 1, 3, 4]
    assert "skipping corrupt bytes" in caplog.text

    with pytest.raises(CorruptShardError):  # a writer must not truncate intact records away
        writer(tmp_path)
    assert shard.read_bytes() == bytes(damaged)

    report = repair_shard(shard)
    assert report["records_kept"] == 4 and report["corrupt_offsets"] == [offs[2]]
    with writer(tmp_path) as w:
        assert not w.has(make_record(2)["key"]) and len(w.done_keys) == 4
        w.write(make_record(2))
    assert sorted(r["i"] for r in RecordStore(tmp_path).iter_records()) == [0, 1, 2, 3, 4]


def test_bad_crc_on_the_last_record_is_a_torn_tail(tmp_path, caplog):
    with writer(tmp_path) as w:
        for i in range(3):
            w.write(make_record(i))
    data = bytearray(w.path.read_bytes())
    data[-3] ^= 0xFF
    w.path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert len(RecordStore(tmp_path)) == 2
    assert "CRC mismatch" in caplog.text


