"""Shared by the store tests: a writer with a fixed config, deep equality, frame offsets, masks."""
from __future__ import annotations

import math
import struct
import textwrap
from pathlib import Path

import numpy as np

from part_distillation.store import FRAME_HEADER_SIZE, ShardWriter
REPO = Path(__file__).resolve().parents[2]
CONFIG = {"model": {"k": 4}, "data": {"name": "toy", "root": "/data/a"}, "launcher": {"nodes": 8},
          "shard": {"index": 0, "count": 3}}

# Shared with the child processes of the kill -9 and lock tests, so both build identical records.
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


def blob_masks(rng, n, h=48, w=64):
    yy, xx = np.mgrid[0:h, 0:w]
    masks = []
    for _ in range(n):
        cy, cx, r = rng.uniform(10, h - 10), rng.uniform(10, w - 10), rng.uniform(4, 12)
        masks.append((yy - cy) ** 2 + (xx - cx) ** 2 < r * r)
    return np.stack(masks)


