"""Stage 2 ``pixel_grouping``: class-agnostic part segments by k-means of backbone features.

Reads stage-1 object records (``OBJECT_MASKS``), writes ``PART_SEGMENTS``: for each image
the highest-scoring object mask (``stage.objects=all``: every kept mask, keys
``<image key>/<i>``) split into up to K parts by ``models.grouping.group_pixels``
(docs/method.md#stage-2). Images go through the backbone ``stage.batch_size`` at a
time; all their objects share one k-means call. Each image is decoded once. Each
object's k-means seed comes from its key, so results do not depend on batching (a
killed and rerun job writes what an uninterrupted one would).
"""
from __future__ import annotations

import logging
import zlib
from typing import Iterable, Iterator

import numpy as np
import torch

from part_distillation.config import ConfigError, RunConfig
from part_distillation.data.frame import ImageFrame
from part_distillation.data.images import BadImageError, load_rgb
from part_distillation.context import JobContext
from part_distillation.devices import resolve_device
from part_distillation.masks import decode_rle, encode_rles, label_map_to_masks
from part_distillation.models.grouping import SOURCES, ObjectToGroup, build_feature_source, group_pixels
from part_distillation.data.batching import preprocess_images
from part_distillation.progress import progress
from part_distillation.stages.shard_io import open_output
from part_distillation.store import RecordStore
from part_distillation.store.schemas import PART_SEGMENTS
from part_distillation.summaries import StageSummary

from part_distillation.config import PixelGroupingStageConfig
from part_distillation.stages import SHARDED, StageSpec

SPEC = StageSpec("pixel_grouping", PixelGroupingStageConfig, SHARDED, shards_over="the input records (shard.by)",
                 loads_weights=True,
                 model_family=lambda run: "mask2former" if run.stage.features == "mask2former" else None)

log = logging.getLogger("part_distillation")


def shard_input_records(store: RecordStore, index: int, count: int, by: str = "class") -> Iterator[dict]:
    """This job's slice of the stage-1 records (``store/sharding.py``: whole classes, or by key)."""
    return store.iter_slice(index, count, by=by)


def object_keys(record: dict, objects: str) -> list[tuple[str, int]]:
    """(output key, mask index) of the objects to group in one stage-1 record."""
    if not record["masks"]:
        return []
    if objects == "top":
        return [(record["key"], int(np.argmax(np.asarray(record["scores"]))))]
    return [(f"{record['key']}/{i}", i) for i in range(len(record["masks"]))]


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run(cfg: RunConfig, context: JobContext) -> StageSummary:
    st = cfg.stage
    summary = StageSummary(st.name, output=st.output)
    bad_levels = [lvl for lvl in st.feature_levels if lvl not in SOURCES[st.features]]
    if bad_levels or not st.feature_levels:
        raise ConfigError(f"config key 'stage.feature_levels' = {list(st.feature_levels)} is invalid for "
                          f"stage.features={st.features}: expected levels from {list(SOURCES[st.features])}")
    if st.input is None:
        raise ConfigError("config key 'stage.input' is not set: the stage-1 output folder to read")
    device = resolve_device(cfg.model.device)
    spec = {}
    if st.features == "mask2former":
        # transformers: only for features=mask2former
        from part_distillation.models.mask2former import spec_name_for_size

        spec = {"mask2former_spec": spec_name_for_size(cfg.model.size)}
    source = build_feature_source(
        st.features, st.feature_levels, pretrained=st.pretrained,
        weights=cfg.model.weights if st.features == "mask2former" else None, **spec).to(device)
    store = RecordStore(st.input)
    records = shard_input_records(store, cfg.shard.index, cfg.shard.count, cfg.shard.by)
    total = store.slice_size(cfg.shard.index, cfg.shard.count, by=cfg.shard.by)
    with open_output(cfg, PART_SEGMENTS, context) as out:
        records = progress(records, total, f"pixel_grouping {cfg.shard.index}/{cfg.shard.count}", st.progress_every)
        for batch in _batches(_pending(records, out, st.objects, summary), st.batch_size):
            _group_batch(batch, source, cfg, out, summary, device)
    summary.extra["features"] = f"{st.features}:{'+'.join(st.feature_levels)}"
    return summary.finish()


def _pending(records: Iterable[dict], out, objects: str, summary: StageSummary) -> Iterator[tuple[dict, list]]:
    """(record, [(key, mask index) not yet written]) per image with work left."""
    for record in records:
        summary.seen += 1
        keys = object_keys(record, objects)
        if not keys:
            if not out.has(record["key"]):
                out.skip(record["key"], "no_object_mask")
            summary.skip("no_object_mask")
            continue
        left = [(k, i) for k, i in keys if not out.has(k)]
        summary.already_done += len(keys) - len(left)
        if left:
            yield record, left


def _group_batch(batch, source, cfg: RunConfig, out, summary: StageSummary, device: torch.device) -> None:
    st = cfg.stage
    images, frames, rows = [], [], []
    for record, keys in batch:
        frame = ImageFrame.from_record(record)
        try:
            image = load_rgb(record["path"], max_pixels=cfg.data.max_pixels, oversize=cfg.data.oversize)
        except (BadImageError, OSError) as err:
            log.warning("bad image skipped: %s: %s", record["path"], err)
            for key, _ in keys:
                out.skip(key, "bad_image")
            summary.skip("bad_image")
            continue
        if tuple(image.shape[:2]) != frame.original or max(frame.fitted) != st.input_size:
            for key, _ in keys:
                out.skip(key, "frame_mismatch")
            summary.skip("frame_mismatch")
            continue
        rows.append((record, keys, len(images)))
        images.append(np.array(frame.fit_image(image)))  # writable: torch shares it
        frames.append(frame)
    if not images:
        return
    pixels = preprocess_images(images, device=device).pixel_values
    padded = tuple(pixels.shape[-2:])
    features = source(pixels)
    objects, owners = [], []
    for record, keys, image_index in rows:
        frame = frames[image_index]
        for key, mask_index in keys:
            mask = torch.zeros(padded, dtype=torch.bool)
            mask[: frame.fitted[0], : frame.fitted[1]] = torch.from_numpy(decode_rle(record["masks"][mask_index]))
            objects.append(ObjectToGroup(image_index, mask, frame.fitted, zlib.crc32(key.encode("utf-8"))))
            owners.append((record, key, mask_index))
    labels = group_pixels(features, objects, st.num_parts, assignment=st.assignment,
                          normalize=st.normalize_features, n_init=st.kmeans_restarts)
    for obj, (record, key, mask_index), label_map in zip(objects, owners, labels):
        if label_map is None:
            out.skip(key, "object_too_small")
            summary.skip("object_too_small")
            continue
        out.write(_part_record(record, key, mask_index, obj, label_map.cpu().numpy(), st.num_parts))
        summary.written += 1


def _part_record(record: dict, key: str, mask_index: int, obj: ObjectToGroup, label_map: np.ndarray,
                 num_parts: int) -> dict:
    """The PART_SEGMENTS record of one grouped object (masks in the fitted frame)."""
    h, w = obj.fitted_size
    object_mask = obj.mask[:h, :w].numpy()
    parts, ids = label_map_to_masks(label_map, range(1, num_parts + 1))
    return {
        "key": key, "path": record["path"], "wnid": record["wnid"], "class_index": record["class_index"],
        "class_name": record["class_name"], "original_size": record["original_size"],
        "fitted_size": record["fitted_size"],
        "object_mask": encode_rles(object_mask[None])[0],
        "object_score": float(np.asarray(record["scores"])[mask_index]),
        "object_ratio": float(object_mask.sum()) / float(h * w),
        "part_masks": encode_rles(parts),
        "part_ids": ids,
    }
