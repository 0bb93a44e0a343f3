"""B3: the record store against the reference layout (one torch.save file per image).

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

    .venv/bin/python benchmarks/b3_store.py          # quick: 1,000 records
    .venv/bin/python benchmarks/b3_store.py --full   # 10,000 records

Last line: ``B3 read_speedup=.. write_speedup=.. files=.. records=..`` where files is
the store's file count for those records.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="10,000 records instead of 1,000")
    parser.add_argument("--records", type=int, help="number of records (overrides --full)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="read passes; the fastest counts")
    args = parser.parse_args(argv)
    n = args.records or (10_000 if args.full else 1_000)
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
    print(f"B3 read_speedup={t_read / s_read:.1f} write_speedup={t_write / s_write:.1f} files={files} records={n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
