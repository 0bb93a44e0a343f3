"""The shard writer: resume, skip markers, summaries, locks, ranks, superseding."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from part_distillation.store import DuplicateKeyError, RecordStore, ShardLockedError
from tests.store.helpers import CONFIG, RECORD_SRC, REPO, make_record, writer


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


# ----------------------------------------------------------------------------- ranks

def test_each_rank_of_a_job_writes_its_own_shard_file(tmp_path):
    ranks = [writer(tmp_path, 1, 2, rank=r, world_size=3) for r in range(3)]  # all open at once
    for r, w in enumerate(ranks):
        w.write(make_record(10 * r))
        w.write(make_record(10 * r + 1))
    with writer(tmp_path, 0, 2) as w0:
        w0.write(make_record(99))
    for w in ranks:
        w.close()
    names = [p.name for p in RecordStore(tmp_path).shard_paths()]
    assert names == ["00000-of-00002.rec", "00001-of-00002.rec", "00001-of-00002.r01.rec", "00001-of-00002.r02.rec"]
    store = RecordStore(tmp_path)
    assert [r["i"] for r in store.iter_records()] == [99, 0, 1, 10, 11, 20, 21]
    assert [r["i"] for r in store.iter_records(shards=[1])] == [0, 1, 10, 11, 20, 21]
    assert store.get(make_record(21)["key"])["i"] == 21
    total = store.summary()
    assert total["records"] == 7 and total["shards_closed"] == 2 and total["shards_missing_summary"] == []
    with pytest.raises(ShardLockedError, match="rank=2"):
        with writer(tmp_path, 1, 2, rank=2, world_size=3):
            writer(tmp_path, 1, 2, rank=2, world_size=3)
    with pytest.raises(ValueError, match="rank"):
        writer(tmp_path, 0, 2, rank=3, world_size=3)


def test_open_output_gives_each_rank_of_the_job_context_its_file(tmp_path):
    from part_distillation.config import DataConfig, IndexStageConfig, RunConfig, ShardConfig
    from part_distillation.launch import JobContext
    from part_distillation.stages.shard_io import open_output
    from part_distillation.store.schemas import INDEX

    cfg = RunConfig(stage=IndexStageConfig(output=str(tmp_path / "out")), data=DataConfig(name="toy", root="/d"),
                    shard=ShardConfig(index=2, count=4))
    rec = {"key": "n1/a.jpg", "path": "/d/n1/a.jpg", "wnid": "n1", "class_index": 0, "class_name": "one",
           "height": 4, "width": 4, "ok": True, "reason": ""}
    with open_output(cfg, INDEX, JobContext(rank=1, world_size=2)) as w1, open_output(cfg, INDEX) as w0:
        assert w0.path.name == "00002-of-00004.rec" and w1.path.name == "00002-of-00004.r01.rec"
        w1.write(rec)
    assert RecordStore(tmp_path / "out").keys() == ["n1/a.jpg"]


# ----------------------------------------------------------------------------- superseding

def test_a_replacing_record_supersedes_the_old_one_also_after_reopening(tmp_path):
    key = make_record(1)["key"]
    with writer(tmp_path) as w:
        w.write(make_record(0))
        w.write(make_record(1))
        w.write(make_record(2))
        with pytest.raises(DuplicateKeyError, match="replace=True"):
            w.write({**make_record(1), "i": 100})
        w.write({**make_record(1), "i": 100}, replace=True)
        assert w.read(key)["i"] == 100 and w.counts["records"] == 3
    store = RecordStore(tmp_path)
    assert [r["i"] for r in store.iter_records()] == [0, 2, 100]  # newest frame of a key wins
    assert store.get(key)["i"] == 100 and len(store) == 3
    with writer(tmp_path) as w:  # resume reads the newest frame too
        assert w.read(key)["i"] == 100 and w.counts["records"] == 3
        w.skip(make_record(2)["key"], "file_missing", replace=True)  # a tombstone
        assert w.read(make_record(2)["key"]) is None
    store = RecordStore(tmp_path)
    assert [r["i"] for r in store.iter_records()] == [0, 100]
    assert make_record(2)["key"] not in store and store.skipped() == {make_record(2)["key"]: "file_missing"}
    shard = json.loads(w.summary_path.read_text())
    assert shard["records"] == 2 and shard["skipped"] == {"file_missing": 1}


# ----------------------------------------------------------------------------- bad records

def test_bad_records_are_counted_over_the_whole_file_across_reruns(tmp_path):
    def rec(i, ok=True):
        return {"key": f"k{i}", "ok": ok, "reason": "" if ok else ("truncated" if i % 2 else "empty file")}

    with writer(tmp_path, 0, 2) as w:
        for i in range(6):
            w.write(rec(i, ok=i not in (1, 2, 3)))
    with writer(tmp_path, 0, 2) as w:  # a resumed run that writes nothing new
        assert w.counts == {"records": 6, "skipped": {}, "bad": {"empty file": 1, "truncated": 2}}
        w.write(rec(3), replace=True)  # the file was fixed: no longer bad
    with writer(tmp_path, 1, 2) as w:
        w.write(rec(7, ok=False))
        w.skip("k8", "no_detections")
    total = RecordStore(tmp_path).summary()
    assert total["records"] == 7 and total["bad"] == {"empty file": 1, "truncated": 2}
    assert total["skipped"] == {"no_detections": 1}
