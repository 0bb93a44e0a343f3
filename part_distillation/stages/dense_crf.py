"""Stage ``dense_crf``: dense-CRF refinement of stage 2's part segments (docs/method.md#stage-3).

Input: stage-2 records (``PART_SEGMENTS``: part masks in the fitted frame, ids 1..K).
Output: the same records with the part masks replaced by the CRF's argmax labels.

Geometry: the image is re-read from the record's ``path``, fitted with the record's
frame (``ImageFrame.from_record``), and the CRF runs on the fitted image with labels
0 = background and one label per part id. Ids are kept as they are: internally the
labels are ``[0] + part_ids`` compacted to ``0..P`` (so the background label exists
even when no pixel is background: the reference's ``np.unique`` renumbering then turns
the first part into background and drops it), and mapped back afterwards. A part with
no pixel after the CRF is dropped with its id; an object whose parts all vanish is
skipped with reason ``all_parts_vanished``. The object mask is kept as given.

Parallel: records are split over the jobs of an array by a hash of their key
(``shard.index`` of ``shard.count``), so any number of stage-3 jobs can read one
stage-2 output; inside a job ``stage.workers`` processes run the CRF while the main
process reads the input and is the shard's single writer.

Follow mode (``stage.follow=true``): the input is read shard by shard from the last
byte offset seen, every ``stage.poll_s`` seconds, while stage 2 still writes it; the
job exits after a pass that started when every input shard was closed (a summary
written at close and no writer holding it).
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from part_distillation.config import RunConfig
from part_distillation.data.frame import ImageFrame, fitted_size
from part_distillation.data.images import BadImageError, load_rgb
from part_distillation.context import JobContext
from part_distillation.masks import decode_rles, encode_rles, masks_to_label_map
from part_distillation.progress import progress_line
from part_distillation.stages.shard_io import open_output
from part_distillation.store import RecordStore, manifest_path
from part_distillation.store.sharding import in_shard
from part_distillation.store.schemas import PART_SEGMENTS
from part_distillation.summaries import StageSummary

from part_distillation.config import DenseCRFStageConfig
from part_distillation.stages import SHARDED, StageSpec

SPEC = StageSpec("dense_crf", DenseCRFStageConfig, SHARDED, shards_over="the input records (by key hash)")

log = logging.getLogger("part_distillation")

#: Records handed to the workers at a time (bounds memory; a kill loses only records in flight).
BATCH = 32


@dataclass(frozen=True)
class RefineSettings:
    """What a worker needs to refine one record (picklable, no config objects)."""

    variant: str = "reference"
    fast_factor: float = 2.0
    gt_prob: float = 0.7
    steps: int = 10
    input_size: int | None = 640
    max_pixels: int | None = 64_000_000
    oversize: str = "downscale"

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "RefineSettings":
        s = cfg.stage
        return cls(variant=s.variant, fast_factor=float(s.fast_factor), gt_prob=float(s.gt_prob),
                   steps=int(s.iterations), input_size=int(s.input_size), max_pixels=cfg.data.max_pixels,
                   oversize=cfg.data.oversize)


class InputFrameError(ValueError):
    """A stage-2 record is not in the frame this stage expects (docs/differences.md#trap-2)."""


def refine_parts(image: np.ndarray, part_masks: np.ndarray, part_ids: np.ndarray,
                 settings: RefineSettings) -> tuple[np.ndarray, np.ndarray]:
    """CRF of one object's parts on its fitted image.

    ``image`` uint8 (H, W, 3); ``part_masks`` bool (P, H, W); ``part_ids`` (P,) ints.
    Returns the refined masks (P', H, W) and their ids (P',): the parts that kept a pixel,
    in the given order, ids unchanged.
    """
    from part_distillation.models.dense_crf import CRFParams, dense_crf, dense_crf_reference

    params = CRFParams(gt_prob=settings.gt_prob, steps=settings.steps)
    num_parts = len(part_ids)
    labels = masks_to_label_map(part_masks[:num_parts])  # 0 = background, i + 1 = part_masks[i]
    if settings.variant == "reference":
        refined = dense_crf_reference(image, labels, num_parts + 1, params)
    else:
        refined = dense_crf(image, labels, num_parts + 1, params, factor=settings.fast_factor)
    masks = np.stack([refined == i + 1 for i in range(num_parts)]) if num_parts else part_masks
    kept = masks.reshape(num_parts, -1).any(axis=1)
    return masks[kept], np.asarray(part_ids)[kept]


def refine_record(record: dict, settings: RefineSettings) -> tuple[dict | None, str | None]:
    """One stage-2 record -> (stage-3 record, None) or (None, skip reason)."""
    key = record["key"]
    frame = ImageFrame.from_record(record)
    if settings.input_size is not None and fitted_size(*frame.original, settings.input_size) != frame.fitted:
        raise InputFrameError(
            f"record {key!r}: fitted size {list(frame.fitted)} is not the original {list(frame.original)} fitted "
            f"to stage.input_size={settings.input_size}; set stage.input_size to the size stage 2 used")
    part_ids = np.asarray(record["part_ids"])
    if len(part_ids) == 0:
        return None, "no_parts"
    try:
        image = load_rgb(record["path"], max_pixels=settings.max_pixels, oversize=settings.oversize)
    except (BadImageError, FileNotFoundError):
        return None, "bad_image"
    if tuple(image.shape[:2]) != frame.original:  # the file changed since stage 2 read it
        return None, "image_changed"
    part_masks = decode_rles(record["part_masks"], size=frame.fitted)
    if part_masks.shape[1:] != frame.fitted or len(part_masks) != len(part_ids):
        raise InputFrameError(
            f"record {key!r}: {len(part_masks)} part masks of size {list(part_masks.shape[1:])} for "
            f"{len(part_ids)} ids in the fitted frame {list(frame.fitted)}: not a stage-2 part_segments record")
    masks, ids = refine_parts(frame.fit_image(image), part_masks, part_ids, settings)
    if len(ids) == 0:
        return None, "all_parts_vanished"
    out = dict(record)
    out["part_masks"] = encode_rles(masks)
    out["part_ids"] = ids.astype(part_ids.dtype, copy=False)
    return out, None


# --------------------------------------------------------------------------- input

def _input_store(path: str, follow: bool, poll_s: float) -> RecordStore:
    if not manifest_path(path).is_file():
        if not follow:
            raise FileNotFoundError(f"stage.input={path} holds no stage output (no manifest.json): run stage 2 "
                                    f"(pixel_grouping) first, or set stage.input")
        log.info("waiting for stage 2 to start writing %s", path)
        while not manifest_path(path).is_file():
            time.sleep(poll_s)
    return RecordStore(path)


def follow_records(store: RecordStore, poll_s: float, follow: bool) -> Iterator[list[dict]]:
    """Batches of new input records; with ``follow`` until every input shard is closed.

    Each pass reads every shard file from where the previous pass stopped. The last pass is
    one that began after all shards were seen closed, so it holds their final records.
    """
    offsets: dict[Path, int] = {}
    while True:
        all_closed = len(store.closed_shards()) == store.num_shards
        batch: list[dict] = []
        for path in store.shard_paths():  # every file of every shard (ranks of a job too)
            for end, record in store.iter_file_from(path, offsets.get(path, 0)):
                offsets[path] = end
                if record is not None:
                    batch.append(record)
                    if len(batch) >= BATCH:
                        yield batch
                        batch = []
        if batch:
            yield batch
        if not follow or all_closed:
            return
        time.sleep(poll_s)


# --------------------------------------------------------------------------- workers

_SETTINGS: RefineSettings | None = None


def _worker_init(settings: RefineSettings) -> None:
    """One CRF thread per process; die with the parent (a kill -9 leaves no orphan)."""
    global _SETTINGS
    _SETTINGS = settings
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    import torch

    torch.set_num_threads(1)


def _worker_refine(record: dict) -> tuple[dict | None, str | None]:
    return refine_record(record, _SETTINGS)


class _Refiner:
    """Maps records to results in order, in this process or in a pool of ``workers``."""

    def __init__(self, settings: RefineSettings, workers: int):
        self.settings = settings
        self.pool = (mp.get_context("spawn").Pool(workers, initializer=_worker_init, initargs=(settings,))
                     if workers > 1 else None)

    def map(self, records: list[dict]) -> Iterator[tuple[dict | None, str | None]]:
        if self.pool is None:
            return (refine_record(r, self.settings) for r in records)
        return self.pool.imap(_worker_refine, records, chunksize=1)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


# --------------------------------------------------------------------------- stage

def run(cfg: RunConfig, context: JobContext) -> StageSummary:
    stage = cfg.stage
    summary = StageSummary(stage.name, output=stage.output)
    if not stage.input:
        raise ValueError("stage.input is not set: the stage-2 (pixel_grouping) output to refine")
    store = _input_store(stage.input, stage.follow, stage.poll_s)
    settings = RefineSettings.from_config(cfg)
    index, count = cfg.shard.index, cfg.shard.count
    refiner = _Refiner(settings, stage.workers)
    started, computed, last_log = time.monotonic(), 0, time.monotonic()
    total = None if stage.follow else store.slice_size(index, count, by="image")  # for the ETA
    seen_keys: set[str] = set()
    try:
        with open_output(cfg, PART_SEGMENTS, context) as out:
            for batch in follow_records(store, stage.poll_s, stage.follow):
                todo = []
                for record in batch:
                    key = record["key"]
                    if not in_shard(key, index, count) or key in seen_keys:
                        continue
                    seen_keys.add(key)
                    summary.seen += 1
                    if out.has(key):
                        summary.already_done += 1
                    else:
                        todo.append(record)
                for record, (refined, reason) in zip(todo, refiner.map(todo)):
                    if refined is None:
                        if reason in ("bad_image", "image_changed"):
                            log.warning("skipped %s (%s): %s", record["key"], reason, record["path"])
                        out.skip(record["key"], reason)
                        summary.skip(reason)
                    else:
                        out.write(refined)
                        summary.written += 1
                    computed += 1
                if computed and time.monotonic() - last_log > 60:
                    last_log = time.monotonic()
                    log.info("%s; %d refined", progress_line(f"dense_crf {index}/{count}", summary.seen, total,
                                                             last_log - started), computed)
    finally:
        refiner.close()
    summary.finish()
    summary.extra.update({"variant": stage.variant, "workers": stage.workers,
                          "images_per_s": round(computed / summary.wall_s, 3) if summary.wall_s else 0.0})
    return summary
