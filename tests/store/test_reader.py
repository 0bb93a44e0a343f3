"""Reading: order, duplicates, lookup, slices."""
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


