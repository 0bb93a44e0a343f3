"""The record store: round trips, sharding, resume, crash safety, manifest, locks, COCO export."""
from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from part_distillation import __version__
from part_distillation.masks import encode_rles, rle_area, rle_to_bbox
from part_distillation.store import (
    FRAME_HEADER_SIZE, ConfigMismatchError, CorruptShardError, DuplicateKeyError, RecordStore,
    ShardCountMismatchError, ShardLockedError, ShardWriter, code_version, coco_results, config_fingerprint,
    export_coco, repair_shard,
)

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"model": {"k": 4}, "data": {"name": "toy", "root": "/data/a"}, "launcher": {"nodes": 8},
          "stage": {"shard_index": 0, "num_shards": 3}}

# Shared with the child process of the kill -9 test, so both build identical records.
RECORD_SRC = textwrap.dedent('''
    import numpy as np
    def make_record(i):
        return {"key": f"n0{i % 7}/img_{i:05d}.jpg", "i": i, "name": "ü" * (i % 5),
                "masks": [{"size": [32, 32], "counts": "x" * (i % 50)}],
                "arr": np.arange(i % 300, dtype=np.float32) * i, "ids": np.full(3, i, dtype=np.int64)}
''')
_ns: dict = {}
exec(RECORD_SRC, _ns)
make_record = _ns["make_record"]


def writer(path, shard=0, num_shards=1, config=None, **kw) -> ShardWriter:
    return ShardWriter(path, shard, num_shards, stage="test", config=CONFIG if config is None else config,
                       code_version="test", **kw)


def assert_same(a, b):
    """Deep equality that compares arrays by dtype, shape and values."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, np.generic):
        assert type(a) is type(b) and a == b
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b)
    else:
        assert type(a) is type(b) and a == b, (a, b)


def frame_offsets(path: Path) -> list[int]:
    """Start offsets of the frames of an intact shard file (framing per the store's docstring)."""
    data, offs, off = path.read_bytes(), [], 0
    while off < len(data):
        offs.append(off)
        _, length, _ = struct.unpack_from("<4sQI", data, off)
        off += FRAME_HEADER_SIZE + length
    return offs


# ----------------------------------------------------------------------------- round trip

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


# ----------------------------------------------------------------------------- shards

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
    # File count grows with shards, not with records: 3 shards + 3 summaries + manifest.
    assert sum(len(files) for _, _, files in os.walk(tmp_path)) == 7


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


# ----------------------------------------------------------------------------- resume and summary

def test_resume_skips_done_keys_and_summary_aggregates(tmp_path):
    with writer(tmp_path, 0, 2) as w:
        for i in range(5):
            w.write(make_record(i))
        w.skip("broken.jpg", "unreadable_image")
    with writer(tmp_path, 0, 2) as w:
        assert w.has(make_record(0)["key"]) and w.has("broken.jpg") and not w.has(make_record(5)["key"])
        assert set(w.done_keys) == {make_record(i)["key"] for i in range(5)} | {"broken.jpg"}
        todo = [i for i in range(8) if not w.has(make_record(i)["key"])]
        assert todo == [5, 6, 7]
        for i in todo:
            w.write(make_record(i))
        w.skip("empty.jpg", "no_detections")
        with pytest.raises(DuplicateKeyError):
            w.skip("broken.jpg", "unreadable_image")
    shard = json.loads((tmp_path / "shards" / "00000-of-00002.summary.json").read_text())
    assert shard["records"] == 8 and shard["written_this_run"] == 3 and shard["resumed_records"] == 5
    assert shard["skipped"] == {"no_detections": 1, "unreadable_image": 1} and shard["status"] == "closed"
    with writer(tmp_path, 1, 2) as w:
        w.skip("x.jpg", "no_detections")
    store = RecordStore(tmp_path)
    assert [r["i"] for r in store.iter_records()] == list(range(8))
    assert store.skipped() == {"broken.jpg": "unreadable_image", "empty.jpg": "no_detections",
                               "x.jpg": "no_detections"}
    total = store.summary()
    assert total["records"] == 8 and total["skipped"] == {"no_detections": 2, "unreadable_image": 1}
    assert total["shards_closed"] == 2 and total["shards_missing_summary"] == []


def test_summary_records_a_failed_run_and_missing_shards(tmp_path):
    with pytest.raises(RuntimeError):
        with writer(tmp_path, 1, 3) as w:
            w.write(make_record(0))
            raise RuntimeError("model crashed")
    total = RecordStore(tmp_path).summary()
    assert total["shards_missing_summary"] == [0, 2] and total["status"] == {"error: RuntimeError": 1}
    assert total["records"] == 1


# ----------------------------------------------------------------------------- crash safety

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
    from part_distillation.store import _ShardScan

    with writer(tmp_path) as w:
        for i in range(3):
            w.write(make_record(i))
    size_seen = w.path.stat().st_size
    with open(w.path, "rb") as f:
        os.truncate(w.path, frame_offsets(w.path)[2])  # a writer cutting what it took for a torn tail
        scan = _ShardScan(w.path, f.fileno(), size_seen)
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


# ----------------------------------------------------------------------------- manifest and lock

def test_manifest_records_the_run(tmp_path):
    with writer(tmp_path, 0, 3):
        pass
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["stage"] == "test" and m["config"] == CONFIG and m["num_shards"] == 3
    assert m["code_version"] == "test" and m["config_fingerprint"] == config_fingerprint(CONFIG) and m["created"]
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind


def test_config_mismatch_is_refused_naming_the_keys_and_can_be_forced(tmp_path):
    with writer(tmp_path, 0, 3):
        pass
    changed = {**CONFIG, "model": {"k": 8}, "data": {"name": "toy"}}  # data.root removed
    with pytest.raises(ConfigMismatchError) as err:
        writer(tmp_path, 1, 3, config=changed)
    msg = str(err.value)
    assert "model.k" in msg and "data.root" in msg and "overwrite_config=True" in msg and "4" in msg
    assert "launcher" not in msg
    with writer(tmp_path, 1, 3, config=changed, overwrite_config=True) as w:
        w.write(make_record(0))
    assert RecordStore(tmp_path).config == changed
    with writer(tmp_path, 2, 3, config=changed):  # the new config is now the output's
        pass


def test_ignored_keys_do_not_count(tmp_path):
    with writer(tmp_path, 0, 3):
        pass
    # shard index, launcher settings are ignored by default; data.root when the caller says so.
    other_job = {**CONFIG, "launcher": {"nodes": 2}, "stage": {"shard_index": 2, "num_shards": 3},
                 "data": {"name": "toy", "root": "/scratch/b"}}
    with pytest.raises(ConfigMismatchError, match="data.root"):
        writer(tmp_path, 1, 3, config=other_job)
    with writer(tmp_path, 1, 3, config=other_job, ignore_keys=["data.root"]):
        pass
    assert config_fingerprint(other_job, ["data.root"]) == config_fingerprint(CONFIG, ["data.root"])
    assert config_fingerprint(other_job) != config_fingerprint(CONFIG)


def test_stage_and_shard_count_mismatch_are_refused(tmp_path):
    with writer(tmp_path, 0, 3):
        pass
    with pytest.raises(ShardCountMismatchError, match="num_shards=3.*num_shards=2"):
        writer(tmp_path, 0, 2)
    with pytest.raises(ShardCountMismatchError):
        writer(tmp_path, 0, 2, overwrite_config=True)
    with pytest.raises(ConfigMismatchError, match="stage: 'test'"):
        ShardWriter(tmp_path, 0, 3, stage="other", config=CONFIG, code_version="test")
    with pytest.raises(ValueError, match="shard_index"):
        writer(tmp_path, 3, 3)


def test_a_second_writer_of_the_same_shard_is_refused(tmp_path):
    first = writer(tmp_path, 0, 2)
    with pytest.raises(ShardLockedError, match="locked by another process"):
        writer(tmp_path, 0, 2)
    with writer(tmp_path, 1, 2):  # other shards are free
        pass
    first.close()
    with writer(tmp_path, 0, 2):
        pass


def test_lock_is_held_across_processes(tmp_path):
    holder = RECORD_SRC + textwrap.dedent(f'''
        import sys, time
        from part_distillation.store import ShardWriter
        w = ShardWriter({str(tmp_path)!r}, 0, 1, stage="test", config={CONFIG!r}, code_version="test")
        print("ready", flush=True)
        sys.stdin.readline()
    ''')
    child = subprocess.Popen([sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, cwd=REPO)
    try:
        assert child.stdout.readline().strip() == "ready"
        with pytest.raises(ShardLockedError):
            writer(tmp_path)
    finally:
        child.kill()
        child.wait(timeout=30)
        child.stdout.close()
        child.stdin.close()
    with writer(tmp_path):  # a killed holder's lock is released by the kernel
        pass


def test_code_version_starts_with_the_package_version():
    assert code_version().startswith(__version__)


# ----------------------------------------------------------------------------- COCO export

def blob_masks(rng, n, h=48, w=64):
    yy, xx = np.mgrid[0:h, 0:w]
    masks = []
    for _ in range(n):
        cy, cx, r = rng.uniform(10, h - 10), rng.uniform(10, w - 10), rng.uniform(4, 12)
        masks.append((yy - cy) ** 2 + (xx - cx) ** 2 < r * r)
    return np.stack(masks)


def test_export_coco_loads_with_pycocotools(tmp_path):
    rng = np.random.default_rng(0)
    with writer(tmp_path / "store") as w:
        for i in range(4):
            rles = encode_rles(blob_masks(rng, 3))
            w.write({"key": f"n0{i}/img{i}.jpg", "file_name": f"n0{i}/img{i}.jpg", "height": 48, "width": 64,
                     "masks": rles, "scores": np.array([0.9, 0.5, 0.1], dtype=np.float32),
                     "classes": f"n0{i % 2}", "boxes": rle_to_bbox(rles)})
        w.write({"key": "empty.jpg", "image_size": [48, 64], "masks": []})
    coco_dict = export_coco(tmp_path / "store", tmp_path / "out.json")
    coco = COCO(str(tmp_path / "out.json"))
    assert len(coco.getImgIds()) == 5 and len(coco.getAnnIds()) == 12
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == {"n00", "n01"}
    img = coco.loadImgs(1)[0]
    assert img["file_name"] == "n00/img0.jpg" and (img["height"], img["width"]) == (48, 64)
    ann = coco.loadAnns(coco.getAnnIds(imgIds=[1]))[0]
    decoded = coco.annToMask(ann)
    assert decoded.shape == (48, 64) and decoded.sum() == ann["area"] and ann["iscrowd"] == 0
    np.testing.assert_allclose(ann["bbox"], rle_to_bbox([ann["segmentation"]])[0])
    assert ann["score"] == pytest.approx(0.9) and ann["category_id"] == coco.getCatIds(catNms=["n00"])[0]
    assert len(coco.loadRes(coco_dict["annotations"]).getAnnIds()) == 12
    results = coco.loadRes(coco_results(coco_dict["annotations"]))  # areas from the masks, not boxes
    assert len(results.getAnnIds()) == 12
    assert results.loadAnns(1)[0]["area"] == pytest.approx(float(rle_area(ann["segmentation"])[0]))
    np.testing.assert_allclose(results.loadAnns(1)[0]["bbox"], ann["bbox"])


def test_export_coco_with_per_mask_ids_and_given_categories(tmp_path):
    rng = np.random.default_rng(1)
    with writer(tmp_path / "store") as w:
        w.write({"key": "a.jpg", "height": 48, "width": 64, "masks": encode_rles(blob_masks(rng, 2)),
                 "part_ids": np.array([3, 1])})
    coco = export_coco(tmp_path / "store", None, category_field="part_ids", categories={1: "head", 3: "leg"})
    assert [a["category_id"] for a in coco["annotations"]] == [3, 1]
    assert coco["categories"] == [{"id": 1, "name": "head"}, {"id": 3, "name": "leg"}]
    assert [a["score"] for a in coco["annotations"]] == [1.0, 1.0]


def test_export_coco_cli(tmp_path):
    with writer(tmp_path / "store") as w:
        w.write({"key": "a.jpg", "height": 48, "width": 64,
                 "masks": encode_rles(blob_masks(np.random.default_rng(2), 2))})
    out = subprocess.run([sys.executable, str(REPO / "tools" / "export_coco.py"), str(tmp_path / "store"),
                          str(tmp_path / "out.json")], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "1 images, 2 annotations, 1 categories" in out.stdout
    coco = COCO(str(tmp_path / "out.json"))
    assert coco.loadCats(coco.getCatIds())[0]["name"] == "object"
