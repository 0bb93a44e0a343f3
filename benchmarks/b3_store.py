"""B3: the record store against the reference layout (one torch.save file per image),
and key lookups at scale.

Both write and then read the same records, realistic stage-1 outputs: 10 object masks
of a 640x640 image as COCO RLE (smooth irregular blobs, RLE strings of a few hundred
bytes to a few KB), boxes, scores, predicted names, size, path and class code.
The baseline reads with ``torch.load``'s default, ``weights_only=True`` (the safe
unpickler); the full pickle load of torch < 2.6, which the reference code ran and this
project does not allow, is also timed and shown in the table.
Reading means decoding every record fully, as a stage consuming its input does (one
record at a time, not kept); the best of ``--repeats`` passes counts, because the
machine may be shared. The store runs with its default fsync policy; the reference
layout does not fsync at all.

Lookups: ``--lookup-records`` small index records (key, path, class, size; keys like
ImageNet-21k's) in 8 shards; the index is built by the first lookup (its retained
memory, traced, is ``index_bytes_per_key``), then ``hit_us`` is the mean time of
``store.get`` for present keys and ``miss_us`` the mean time of ``key in store`` for
absent keys (the store before this version rebuilt its index on every miss: a few
misses are timed, up to a time budget).

    .venv/bin/python benchmarks/b3_store.py          # quick: 1,000 records; 100,000 for lookups
    .venv/bin/python benchmarks/b3_store.py --full   # 10,000 records; 1,000,000 for lookups

Last line: ``B3 read_speedup=.. miss_us=.. hit_us=.. index_bytes_per_key=..``; the line
before it gives ``write_speedup``, the store's file count and the record counts.
"""
from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from part_distillation.masks import encode_rles, rle_to_bbox
from part_distillation.store import RecordStore, ShardWriter

SIZE = 640
MASKS_PER_IMAGE = 10


def blob_masks(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` blob masks: ellipses whose radius wobbles with a few random harmonics."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    out = np.zeros((n, SIZE, SIZE), dtype=bool)
    for i in range(n):
        cy, cx = rng.uniform(100, SIZE - 100, size=2)
        ry, rx = rng.uniform(40, 320, size=2)
        dy, dx = (yy - cy) / ry, (xx - cx) / rx
        theta = np.arctan2(dy, dx)
        wobble = 1.0 + sum(rng.uniform(0, 0.6 / k) * np.cos(k * theta + rng.uniform(0, 6.3)) for k in range(2, 13))
        out[i] = np.hypot(dy, dx) < wobble
    return out


def make_records(n: int, seed: int = 0) -> list[dict]:
    """Records built from a pool of 200 distinct blob RLEs (encoding is not what is measured)."""
    rng = np.random.default_rng(seed)
    pool = encode_rles(blob_masks(rng, 200))
    records = []
    for i in range(n):
        wnid = f"n{rng.integers(10**7, 10**8):08d}"
        rles = [pool[j] for j in rng.choice(len(pool), MASKS_PER_IMAGE, replace=False)]
        path = f"{wnid}/{wnid}_{i}.JPEG"
        records.append({
            "key": path, "file_name": path, "height": SIZE, "width": SIZE, "class_code": wnid,
            "masks": rles,
            "boxes": rle_to_bbox(rles).astype(np.float32),
            "scores": np.sort(rng.random(MASKS_PER_IMAGE).astype(np.float32))[::-1].copy(),
            "pred_names": [f"class_{c}" for c in rng.integers(0, 1000, MASKS_PER_IMAGE)],
        })
    return records


def as_torch(record: dict) -> dict:
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in record.items()}


def consume(records: Iterable[dict]) -> int:
    """Touch every record the way a stage would (its masks and scores), keep none."""
    n = 0
    for rec in records:
        n += len(rec["masks"]) + len(rec["scores"])
    return n


def best_of(repeats: int, read: Callable[[], int], n_records: int) -> float:
    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        n = read()
        times.append(time.perf_counter() - t0)
        assert n == 2 * MASKS_PER_IMAGE * n_records, n
    return min(times)


def bench_store(root: Path, records: list[dict], num_shards: int, repeats: int) -> tuple[float, float, int]:
    out = root / "store"
    t0 = time.perf_counter()
    per_shard = -(-len(records) // num_shards)
    for s in range(num_shards):
        with ShardWriter(out, s, num_shards, stage="b3", config={"bench": "b3"}, code_version="bench") as w:
            for rec in records[s * per_shard:(s + 1) * per_shard]:
                w.write(rec)
    t_write = time.perf_counter() - t0
    t_read = best_of(repeats, lambda: consume(RecordStore(out).iter_records()), len(records))
    first = next(iter(RecordStore(out).iter_records()))
    assert first["masks"] == records[0]["masks"] and np.array_equal(first["boxes"], records[0]["boxes"])
    files = sum(len(fs) for _, _, fs in os.walk(out))
    return t_write, t_read, files


def bench_torch(root: Path, records: list[dict], repeats: int) -> tuple[float, float, float]:
    out = root / "torch"
    out.mkdir()
    t0 = time.perf_counter()
    for i, rec in enumerate(records):
        torch.save(as_torch(rec), out / f"{i:07d}.pth")
    t_write = time.perf_counter() - t0
    t_read = best_of(repeats, lambda: consume(torch.load(out / name) for name in sorted(os.listdir(out))),
                     len(records))
    t_read_pickle = best_of(repeats, lambda: consume(torch.load(out / name, weights_only=False)
                                                     for name in sorted(os.listdir(out))), len(records))
    assert torch.load(out / "0000000.pth")["masks"] == records[0]["masks"]
    return t_write, t_read, t_read_pickle


def index_record(i: int, num_classes: int = 21_841) -> dict:
    """A small index-stage record with an ImageNet-21k-like key."""
    c = (i * 7919) % num_classes
    key = f"n{c:08d}/n{c:08d}_{i}.JPEG"
    return {"key": key, "path": f"/datasets/imagenet21k/{key}", "wnid": f"n{c:08d}", "class_index": c,
            "class_name": f"class {c}", "height": 375, "width": 500, "ok": True, "reason": ""}


def bench_lookup(root: Path, n: int, num_shards: int = 8, miss_budget_s: float = 10.0
                 ) -> tuple[float, float, float, float, float]:
    """Write ``n`` index records; returns (write s, index build s, bytes/key, hit us, miss us)."""
    out = root / "lookup"
    t0 = time.perf_counter()
    per_shard = -(-n // num_shards)
    for s in range(num_shards):
        with ShardWriter(out, s, num_shards, stage="b3", config={"bench": "b3-lookup"}, code_version="bench",
                         fsync_every=4096) as w:
            for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                w.write(index_record(i))
    t_write = time.perf_counter() - t0
    store = RecordStore(out)
    first = index_record(0)["key"]
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    assert first in store  # builds the index
    t_build = time.perf_counter() - t0
    gc.collect()
    index_bytes = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    rng = random.Random(0)
    probes = [index_record(rng.randrange(n)) for _ in range(2000)]
    t0 = time.perf_counter()
    for rec in probes:
        assert store.get(rec["key"])["class_index"] == rec["class_index"]
    hit_us = (time.perf_counter() - t0) / len(probes) * 1e6
    misses, t0 = 0, time.perf_counter()
    while misses < 2000 and (misses < 3 or time.perf_counter() - t0 < miss_budget_s):
        assert f"absent/{misses}.JPEG" not in store
        misses += 1
    miss_us = (time.perf_counter() - t0) / misses * 1e6
    return t_write, t_build, index_bytes / n, hit_us, miss_us


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="10,000 records instead of 1,000")
    parser.add_argument("--records", type=int, help="number of records (overrides --full)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="read passes; the fastest counts")
    parser.add_argument("--lookup-records", type=int, help="records of the lookup test "
                        "(default 100,000; 1,000,000 with --full)")
    args = parser.parse_args(argv)
    n = args.records or (10_000 if args.full else 1_000)
    n_lookup = args.lookup_records or (1_000_000 if args.full else 100_000)
    torch.set_num_threads(1)
    records = make_records(n)
    gc.collect()
    gc.freeze()  # the input records are not what the collector should be timed on
    lengths = [len(m["counts"]) for r in records[:200] for m in r["masks"]]
    print(f"records: {n}, {MASKS_PER_IMAGE} RLE masks of {SIZE}x{SIZE} each, RLE strings "
          f"{min(lengths)}..{max(lengths)} B (mean {np.mean(lengths):.0f} B)")
    with tempfile.TemporaryDirectory(prefix="b3_") as tmp:
        root = Path(tmp)
        s_write, s_read, files = bench_store(root, records, args.shards, args.repeats)
        t_write, t_read, t_read_pickle = bench_torch(root, records, args.repeats)
        store_bytes = sum(p.stat().st_size for p in (root / "store").rglob("*") if p.is_file())
        torch_bytes = sum(p.stat().st_size for p in (root / "torch").iterdir())
    print(f"{'layout':<24}{'write rec/s':>12}{'read rec/s':>12}{'files':>8}{'MB':>8}")
    print(f"{'store (' + str(args.shards) + ' shards)':<24}{n / s_write:>12.0f}{n / s_read:>12.0f}"
          f"{files:>8}{store_bytes / 1e6:>8.1f}")
    print(f"{'torch.save per image':<24}{n / t_write:>12.0f}{n / t_read:>12.0f}{n:>8}{torch_bytes / 1e6:>8.1f}")
    print(f"{'  same, unsafe pickle':<24}{'':>12}{n / t_read_pickle:>12.0f}"
          f"   (torch.load weights_only=False, as torch<2.6 did: store is {t_read_pickle / s_read:.1f}x faster)")
    gc.unfreeze()
    del records
    gc.collect()
    with tempfile.TemporaryDirectory(prefix="b3_") as tmp:
        l_write, l_build, bytes_per_key, hit_us, miss_us = bench_lookup(Path(tmp), n_lookup)
    print(f"lookup: {n_lookup} index records in 8 shards written in {l_write:.1f} s "
          f"({n_lookup / l_write:.0f} rec/s); index built in {l_build:.2f} s, {bytes_per_key:.0f} bytes/key; "
          f"get (hit) {hit_us:.1f} us, miss {miss_us:.1f} us")
    print(f"write_speedup={t_write / s_write:.1f} files={files} records={n} lookup_records={n_lookup}")
    print(f"B3 read_speedup={t_read / s_read:.1f} miss_us={miss_us:.1f} hit_us={hit_us:.1f} "
          f"index_bytes_per_key={bytes_per_key:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
