"""The shard writer: resume, skip markers, summaries, locks, ranks, superseding."""
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

from tests.store.helpers import CONFIG, RECORD_SRC, REPO, assert_same, blob_masks, frame_offsets, make_record, writer


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


