"""B2: the fast dense CRF vs the reference pydensecrf call, and its scaling over processes.

Reference settings: a 640x640 image, labels 0..4 (background + 4 parts), 10 steps.
Synthetic inputs like stage 3's: a textured image (smooth colour fields, fine texture
and pixel noise, which is what makes the CRF's lattice costly) with one object covering
20-50 % of the frame; its parts a Voronoi-like partition (each >= 8 % of the object)
with coloured, textured regions; the labels made at 1/8 resolution and upsampled (like
stage 2's) plus 1 % salt noise inside the object.

speedup: images/s of ``dense_crf`` over ``dense_crf_reference``, one process, one thread
each. agreement_miou: per image the mean over part labels of the IoU between the two
outputs, averaged over images. scaling: images/s of ``dense_crf`` with 2 worker processes
over 1 (multiprocessing, spawn, one thread per process).

stage: images/s of the whole ``dense_crf`` stage (read the stage-2 record, decode the
image file, fit it, CRF at the reference geometry 640x640, encode, write the record)
over a stage-2 store of these cases, with ``stage.workers`` 1 and one per core, for the
reference variant (the stage's default) and the fast one. The wall time includes
starting the worker processes.

    .venv/bin/python benchmarks/b2_dense_crf.py          # quick: 4 images, 8 for scaling, 4 for the stage
    .venv/bin/python benchmarks/b2_dense_crf.py --full   # 16 images, 32 for scaling, 16 for the stage
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import limit_threads  # noqa: E402

limit_threads(1)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from part_distillation.masks import label_map_miou  # noqa: E402
from part_distillation.models.dense_crf import dense_crf, dense_crf_reference  # noqa: E402
from part_distillation.store import RecordStore  # noqa: E402

SIZE, PARTS = 640, 4


def smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int, channels: int = 1) -> np.ndarray:
    grid = torch.from_numpy(rng.normal(size=(1, channels, cells, cells)).astype(np.float32))
    return F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()


def make_case(seed: int, size: int = SIZE, parts: int = PARTS) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 (H, W, 3), labels int64 (H, W)) of one synthetic object."""
    rng = np.random.default_rng(seed)
    h = w = size
    image = 110 + 50 * smooth_noise(rng, h, w, 4, 3) + 20 * smooth_noise(rng, h, w, 40, 3)
    image += rng.normal(0, 6, (h, w, 3))
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    frac = rng.uniform(0.2, 0.5)
    ry = np.sqrt(frac * h * w / np.pi * rng.uniform(0.6, 1.6))
    rx = frac * h * w / np.pi / ry
    cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w
    obj = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) < 1 + 0.15 * smooth_noise(rng, h, w, 6)[..., 0]
    inside = np.argwhere(obj)
    bend = 25 * smooth_noise(rng, h, w, 8, 2)
    for _ in range(100):  # parts of at least 8 % of the object, like k-means parts
        seeds = inside[rng.choice(len(inside), parts, replace=False)].astype(np.float32)
        dist = (yy[..., None] + bend[..., :1] - seeds[:, 0]) ** 2 + (xx[..., None] + bend[..., 1:] - seeds[:, 1]) ** 2
        part = dist.argmin(-1) + 1
        if np.bincount(part[obj], minlength=parts + 1)[1:].min() >= 0.08 * obj.sum():
            break
    colours = rng.uniform(30, 225, (parts + 1, 3))
    for p in range(1, parts + 1):
        m = obj & (part == p)
        image[m] = colours[p] + 25 * smooth_noise(rng, h, w, 30, 3)[m] + rng.normal(0, 6, (m.sum(), 3))
    image += 35 * smooth_noise(rng, h, w, 160, 3) + rng.normal(0, 12, (h, w, 3))  # fine texture
    image = np.clip(image, 0, 255).astype(np.uint8)
    truth = np.where(obj, part, 0)
    coarse = truth[4::8, 4::8]
    labels = np.kron(coarse, np.ones((8, 8), dtype=coarse.dtype))[:h, :w]
    salt = (rng.random((h, w)) < 0.01) & (labels > 0)
    labels = np.where(salt, rng.integers(1, parts + 1, (h, w)), labels)
    return image, labels.astype(np.int64)




def _worker_init() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def _fast_job(case: tuple[np.ndarray, np.ndarray]) -> int:
    image, labels = case
    return int(dense_crf(image, labels).max())


def throughput(processes: int, cases: list) -> float:
    """Images/s of the fast CRF over ``cases`` with a pool of ``processes`` workers."""
    with mp.get_context("spawn").Pool(processes, initializer=_worker_init) as pool:
        pool.map(_fast_job, cases[:processes], chunksize=1)  # warm-up: imports, first call
        start = time.perf_counter()
        pool.map(_fast_job, cases, chunksize=1)
        return len(cases) / (time.perf_counter() - start)


def write_stage2_store(root: Path, cases: list) -> Path:
    """The cases as image files plus a stage-2 (PART_SEGMENTS) output over them."""
    from PIL import Image

    from part_distillation.data.frame import ImageFrame
    from part_distillation.masks import encode_rle, encode_rles
    from part_distillation.store import ShardWriter
    from part_distillation.store.schemas import PART_SEGMENTS

    store = root / "stage2"
    with ShardWriter(store, 0, 1, stage="pixel_grouping", config={"b2": True}, code_version="b2",
                     schema=PART_SEGMENTS) as out:
        for i, (image, labels) in enumerate(cases):
            path = root / f"case_{i:03d}.png"
            Image.fromarray(image).save(path)
            frame = ImageFrame.fit(image.shape[:2])
            ids = np.arange(1, PARTS + 1)
            out.write({"key": path.name, "path": str(path), "wnid": "n00000000", "class_index": 0,
                       "class_name": "case", **frame.as_record(), "object_mask": encode_rle(labels > 0),
                       "object_score": 1.0, "object_ratio": float(np.mean(labels > 0)),
                       "part_masks": encode_rles(np.stack([labels == p for p in ids])), "part_ids": ids})
    return store


def stage_throughput(store: Path, out: Path, workers: int, variant: str) -> float:
    """Images/s of one in-process run of the dense_crf stage over ``store``."""
    from part_distillation.config import DataConfig, DenseCRFStageConfig, RunConfig
    from part_distillation.launch import JobContext
    from part_distillation.stages import dense_crf as stage

    cfg = RunConfig(stage=DenseCRFStageConfig(input=str(store), output=str(out), workers=workers, variant=variant),
                    data=DataConfig(name="b2", root=str(store.parent)))
    start, cpu_start = time.perf_counter(), time.process_time()
    summary = stage.run(cfg, JobContext())
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    assert summary.written == len(RecordStore(store)), summary.as_dict()
    if workers == 1:  # CPU time does not depend on what else the machine runs
        print(f"  {variant}, 1 worker: {cpu / summary.written:.2f} CPU s per image in this process")
    return summary.written / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="16 images, 32 for the scaling")
    parser.add_argument("--factor", type=float, default=2.0, help="dense_crf's downscaling factor")
    parser.add_argument("--stage-only", action="store_true", help="only the stage's images/s")
    parser.add_argument("--stage-images", type=int, default=None, help="images for the stage's figures")
    args = parser.parse_args()
    if args.stage_only:
        stage_rates, cores = stage_figures(args.stage_images or (16 if args.full else 4))
        print(stage_line(stage_rates, cores))
        return
    images, scaling_images, stage_images = (16, 32, 16) if args.full else (4, 8, 4)
    stage_images = args.stage_images or stage_images
    print(f"B2 dense CRF: {images} images {SIZE}x{SIZE}, {PARTS + 1} labels, factor {args.factor}, 1 thread")
    ref_times, fast_times, agreements = [], [], []
    for seed in range(images):
        image, labels = make_case(seed)
        start = time.perf_counter()
        ref = dense_crf_reference(image, labels)
        ref_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        fast = dense_crf(image, labels, factor=args.factor)
        fast_times.append(time.perf_counter() - start)
        agreements.append(label_map_miou(fast, ref))
        print(f"image {seed}: object {np.mean(labels > 0):.2f} of the frame, reference {ref_times[-1]:.2f} s, "
              f"fast {fast_times[-1]:.2f} s, part mIoU {agreements[-1]:.4f}, "
              f"changed by the CRF {np.mean(ref != labels):.3f}")
    speedup = sum(ref_times) / sum(fast_times)
    print(f"reference: {len(ref_times) / sum(ref_times):.2f} images/s (median {statistics.median(ref_times):.2f} s); "
          f"fast: {len(fast_times) / sum(fast_times):.2f} images/s (median {statistics.median(fast_times):.2f} s)")
    print(f"agreement part mIoU: mean {np.mean(agreements):.4f}, min {min(agreements):.4f}")
    cases = [make_case(seed) for seed in range(1000, 1000 + scaling_images)]
    cases = [(image, labels.astype(np.uint8)) for image, labels in cases]
    one = throughput(1, cases)
    two = throughput(2, cases)
    print(f"fast variant throughput: 1 process {one:.2f} images/s, 2 processes {two:.2f} images/s")
    stage_rates, cores = stage_figures(stage_images)
    print(f"B2 speedup={speedup:.1f}x agreement_miou={np.mean(agreements):.4f} scaling={two / one:.2f} "
          + stage_line(stage_rates, cores)[3:])


def stage_figures(stage_images: int) -> tuple[dict, int]:
    """Images/s of the stage per (variant, workers), workers 1 and one per core."""
    cores = os.cpu_count() or 1
    stage_rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = write_stage2_store(Path(tmp), [make_case(seed) for seed in range(2000, 2000 + stage_images)])
        for variant in ("reference", "fast"):
            for workers in sorted({1, cores}):
                rate = stage_throughput(store, Path(tmp) / f"out_{variant}_{workers}", workers, variant)
                stage_rates[variant, workers] = rate
                print(f"stage dense_crf ({variant}, 640x640, {stage_images} images): {workers} worker(s) "
                      f"{rate:.3f} images/s")
        reference, fast = (_label_maps(Path(tmp) / f"out_{v}_1") for v in ("reference", "fast"))
        agreement = [label_map_miou(fast[k], reference[k]) for k in reference]
        print(f"stage outputs, fast vs reference variant: part mIoU mean {np.mean(agreement):.4f}, "
              f"min {min(agreement):.4f}")
    return stage_rates, cores


def _label_maps(output: Path) -> dict[str, np.ndarray]:
    """Each record's parts of a stage output as one label map (part ids)."""
    from part_distillation.masks import decode_rles

    maps = {}
    for record in RecordStore(output).iter_records():
        masks = decode_rles(record["part_masks"], size=tuple(record["fitted_size"]))
        labels = np.zeros(masks.shape[1:], np.int64)
        for mask, part_id in zip(masks, record["part_ids"]):
            labels[mask] = part_id
        maps[record["key"]] = labels
    return maps


def stage_line(stage_rates: dict, cores: int) -> str:
    return (f"B2 stage_images_per_s={stage_rates['reference', 1]:.3f} "
            f"stage_images_per_s_{cores}workers={stage_rates['reference', cores]:.3f} "
            f"stage_fast_images_per_s={stage_rates['fast', 1]:.3f} "
            f"stage_fast_images_per_s_{cores}workers={stage_rates['fast', cores]:.3f}")


if __name__ == "__main__":
    main()
