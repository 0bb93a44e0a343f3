"""Stage 5 ``part_ranking``: global part classes per object class (docs/method.md#stage-5).

Input: stage-3 records (``PART_SEGMENTS``, ``stage.input``, default the dense_crf output)
and the stage-4 proposal model (``stage.checkpoint``, default the newest checkpoint of
``stage.proposal_run``; ``stage.checkpoint_iteration`` picks another one of that run).
Object mask = union of the record's part masks; the model sees the image fitted to
``stage.image_size`` and padded to that square canvas (grey 128); masks come back in the
record's fitted frame.

Partitioned over object classes: job ``shard.index`` of ``shard.count`` takes the
classes of ``RecordStore.iter_slice(index, count, by="class")`` (``store/sharding.py``), so jobs are independent.
Three steps, each resumable, in the work folder ``<output>/part_classes/<i>-of-<n>/``:

1. Cluster pass: per image the kept proposals' L2-normalised embeddings
   (``models.part_ranking.cluster_pass``) are appended to ``class_<c>.f32`` (float32,
   one file per object class) and the image's key with each file's committed length
   to ``progress.tsv``. A rerun truncates the files to the committed lengths and skips
   logged keys, so a kill loses at most one batch of images.
2. K-means per class (the model layer's ``kmeans``, ``stage.n_init`` restarts) from the
   memory-mapped file. Classes with at most K embeddings get no part classes (never
   random centroids). ``centroids.npz`` + ``centroids.json`` (counts, the checkpoint
   used) are written atomically once every class of the job is done.
``stage.part_classes`` (another part-ranking output, e.g. of the training images) skips
steps 1 and 2 and labels these images with its part classes.

3. Label pass (``models.part_ranking.label_pass``): ``PART_LABELS`` records, with
   ``part_ratios`` and ``object_ratio`` over the square canvas (``canvas_ratios``); images
   of a class with no part classes are skipped with ``no_part_classes``, images left with
   no part (none of the object predicted) with ``no_parts``.

Both passes run the model on ``stage.batch_size`` images at a time (``with_model_outputs``
over ``data.batching.in_batches`` and ``models.part_ranking.proposal_outputs``; every canvas
has the same size, so a batch pads nothing and each image's outputs equal a batch of one's)
and handle the records one by one in their order. The embedding files and their
crash-recovery log are ``store.embedding_log.EmbeddingLog``.

Memory: the cluster pass holds one batch's model outputs; k-means holds the class's
embeddings once as float32 (N x D x 4 bytes, read from the file) plus the k-means
workspace (chunked distances; measured in tests/stages/test_part_ranking.py: peak RSS rise
below 2.5 x N x D x 4 bytes + 64 MiB for 1M embeddings).
"""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from part_distillation.config import ConfigError, RunConfig
from part_distillation.context import JobContext
from part_distillation.data.batching import in_batches
from part_distillation.devices import resolve_device
from part_distillation.data.frame import ImageFrame
from part_distillation.data.images import BadImageError, load_rgb
from part_distillation import inference
from part_distillation.masks import decode_rles, encode_rles
from part_distillation.models import part_ranking as ranking
from part_distillation.models.kmeans import kmeans
from part_distillation.progress import progress
from part_distillation.summaries import StageSummary
from part_distillation.stages.shard_io import open_output
from part_distillation.store import RecordStore, manifest_path
from part_distillation.store.embedding_log import EmbeddingLog
from part_distillation.store.files import atomic_write_bytes, atomic_write_json
from part_distillation.store.schemas import PART_LABELS

from part_distillation.config import PartRankingStageConfig
from part_distillation.stages import SHARDED, StageSpec

# model.weights is not read: the stage-4 checkpoint is (checked by its own check)
SPEC = StageSpec("part_ranking", PartRankingStageConfig, SHARDED,
                 shards_over="the object classes of the input records")

log = logging.getLogger("part_distillation")


# --------------------------------------------------------------------------- settings

def proposal_checkpoint(stage) -> Path:
    """The proposal checkpoint this job uses (one-line error naming the setting when absent)."""
    if stage.checkpoint:
        path = Path(stage.checkpoint)
        if not path.is_file():
            raise ConfigError(f"stage.checkpoint={path} not found: give a stage-4 checkpoint file")
        return path
    return inference.resolve_checkpoint(stage.proposal_run, stage.checkpoint_iteration,
                                        path_key="stage.proposal_run", iteration_key="stage.checkpoint_iteration")


def check(cfg: RunConfig) -> None:
    """Before submission: the proposal checkpoint exists (``model.weights`` is not used here)."""
    if cfg.shard.by != "class":
        raise ConfigError(f"shard.by={cfg.shard.by}: part ranking clusters each object class as a whole, "
                          f"use shard.by=class")
    proposal_checkpoint(cfg.stage)


def load_proposal_model(cfg: RunConfig, checkpoint: Path, device: torch.device):
    """The stage-4 model of ``checkpoint``: its architecture from its run folder (or its weights),
    ``model.size`` only when a Mask2Former is chosen (``model=none`` has no size of its own)."""
    size = cfg.model.size if cfg.model.name == "mask2former" else None
    return inference.load_checkpoint_model(checkpoint, device, kind="proposal", size=size)[0]


# --------------------------------------------------------------------------- one image

class RankingInput:
    """A record's object mask (fitted frame) and model input (fitted to ``size``, padded)."""

    def __init__(self, record: dict, size: int):
        self.frame = ImageFrame.from_record(record)
        self.part_masks = decode_rles(record["part_masks"], size=self.frame.fitted)  # (P, h, w) bool
        self.part_ids = np.asarray(record["part_ids"])
        parts = self.part_masks
        self.object_mask = parts.any(0) if len(parts) else np.zeros(self.frame.fitted, dtype=bool)
        image = load_rgb(record["path"])
        if tuple(image.shape[:2]) != self.frame.original:
            raise BadImageError(record["path"], "size changed since stage 1")
        self.model_frame = ImageFrame.fit(self.frame.original, size=size, canvas=size)
        self.canvas = self.model_frame.pad_image(self.model_frame.fit_image(image))


def model_outputs(model, batch: Sequence[RankingInput], device: torch.device) -> list[tuple]:
    """``models.part_ranking.proposal_outputs`` for a batch of images."""
    return ranking.proposal_outputs(model, [inputs.canvas for inputs in batch],
                                    [inputs.model_frame.fitted for inputs in batch],
                                    [inputs.frame.fitted for inputs in batch], device)


def with_model_outputs(records: Iterable[dict], wanted: Callable[[dict], bool], model, device: torch.device,
                       size: int, batch_size: int) -> Iterator[tuple[dict, object]]:
    """Every record, in order, with what the model made of it (``data.batching.in_batches``):
    ``(record, (inputs, outputs))``, ``(record, None)`` for a record ``wanted`` declines,
    ``(record, error)`` for an image that cannot be read."""
    return in_batches(records, lambda record: RankingInput(record, size) if wanted(record) else None,
                      lambda batch: model_outputs(model, batch, device), batch_size,
                      skip=(BadImageError, FileNotFoundError))


def canvas_ratios(part_masks: np.ndarray, frame: ImageFrame) -> dict:
    """``part_ratios`` (each part's area) and ``object_ratio`` (the union of the kept parts)
    over the square canvas the fitted image is padded to (640² in the reference, whose
    stage 6 filters both at >= 0.05), not over the object or the fitted image."""
    canvas = float(max(frame.fitted)) ** 2
    return {"object_ratio": float(part_masks.any(0).sum()) / canvas,
            "part_ratios": (part_masks.reshape(len(part_masks), -1).sum(1) / canvas).astype(np.float32)}


# --------------------------------------------------------------------------- work folder

def cluster_classes(work: EmbeddingLog, classes: list[int], k: int, n_init: int, seed: int,
                    device: torch.device) -> tuple[dict[int, np.ndarray], dict[int, int]]:
    """K-means per class from its embedding file; classes with <= k embeddings get none."""
    centroids, counts = {}, {}
    for cls in classes:
        n = work.lengths.get(cls, 0) // (4 * work.dim) if work.dim else 0
        counts[cls] = n
        if n <= k:
            log.info("class %d: %d embeddings <= K=%d: no part classes", cls, n, k)
            continue
        points = torch.from_numpy(work.file(cls, work.dim).read()).to(device)
        result = kmeans(points, k, n_init=n_init, seed=seed)
        centroids[cls] = result.centroids.cpu().numpy().astype(np.float32)
        del points, result
    return centroids, counts


def save_centroids(folder: Path, centroids: dict[int, np.ndarray], counts: dict[int, int], checkpoint: Path,
                   k: int) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **{f"class_{c}": v for c, v in centroids.items()})
    atomic_write_bytes(folder / "centroids.npz", buffer.getvalue())
    atomic_write_json(folder / "centroids.json", {
        "checkpoint": str(checkpoint), "num_clusters": k,
        "embeddings_per_class": {str(c): n for c, n in counts.items()},
        "classes_with_parts": sorted(int(c) for c in centroids)})


def load_centroids(folder: Path) -> tuple[dict[int, np.ndarray], dict]:
    meta = json.loads((folder / "centroids.json").read_text())
    with np.load(folder / "centroids.npz") as data:
        centroids = {int(name.split("_")[1]): data[name] for name in data.files}
    return centroids, meta


def checked_centroids(folder: Path, checkpoint: Path, hint: str = "") -> dict[int, np.ndarray]:
    """:func:`load_centroids` of ``folder``, refused unless they were ranked with ``checkpoint``
    (part classes are embeddings of one proposal model: another model's are meaningless)."""
    centroids, meta = load_centroids(folder)
    if meta["checkpoint"] != str(checkpoint):
        raise ConfigError(f"{folder}/centroids.json came from {meta['checkpoint']}, this run uses {checkpoint}{hint}")
    return centroids


def other_run_part_classes(output: Path, checkpoint: Path) -> dict[int, np.ndarray]:
    """The centroids of every job of the part-ranking output ``output`` (``stage.part_classes``),
    which must have ranked with the same proposal checkpoint."""
    folders = sorted(p.parent for p in (output / "part_classes").glob("*-of-*/centroids.json"))
    if not folders:
        raise ConfigError(f"stage.part_classes={output} holds no part classes (part_classes/*/centroids.json): "
                          f"give a finished part_ranking output")
    centroids: dict[int, np.ndarray] = {}
    for folder in folders:
        centroids.update(checked_centroids(
            folder, checkpoint, " (stage.part_classes): rank with the same proposal model (stage.proposal_run)"))
    return centroids


# --------------------------------------------------------------------------- run

def work_folder(cfg: RunConfig) -> Path:
    return Path(cfg.stage.output) / "part_classes" / f"{cfg.shard.index}-of-{cfg.shard.count}"


def run(cfg: RunConfig, context: JobContext) -> StageSummary:
    stage = cfg.stage
    summary = StageSummary(stage.name)
    if not stage.input or not manifest_path(stage.input).is_file():
        raise FileNotFoundError(f"stage.input={stage.input} holds no stage output (no manifest.json): run "
                                f"dense_crf first, or set stage.input")
    check(cfg)
    checkpoint = proposal_checkpoint(stage)
    device = resolve_device(cfg.model.device)
    model = load_proposal_model(cfg, checkpoint, device)
    store = RecordStore(stage.input)
    folder = work_folder(cfg)
    total = store.slice_size(cfg.shard.index, cfg.shard.count, by="class")  # for the progress ETA

    def records(step: str) -> Iterator[dict]:
        return progress(store.iter_slice(cfg.shard.index, cfg.shard.count, by="class"), total,
                        f"{stage.name} {step}", stage.progress_every)

    cluster_images = 0
    if stage.part_classes:  # another run's part classes: the label pass only
        centroids = other_run_part_classes(Path(stage.part_classes), checkpoint)
    else:
        if not (folder / "centroids.json").exists():  # steps 1 and 2, skipped entirely once the centroids exist
            cluster_images = cluster_step(cfg, records("cluster pass"), model, device, folder, checkpoint)
        centroids = checked_centroids(folder, checkpoint)
    with open_output(cfg, PART_LABELS, context) as writer:  # 3. label pass
        label_step(cfg, records("label pass"), model, device, centroids, writer, summary)
    summary.output = str(stage.output)
    summary.extra.update({"checkpoint": str(checkpoint), "cluster_pass_images": cluster_images,
                          "classes_with_parts": len(centroids),
                          "centroids": stage.part_classes or str(folder / "centroids.npz")})
    return summary.finish()


def cluster_step(cfg: RunConfig, records: Iterable[dict], model, device: torch.device, folder: Path,
                 checkpoint: Path) -> int:
    """1. The cluster pass into the job's embedding log, then 2. k-means per class; returns the
    number of images embedded by this run (earlier ones are in the log)."""
    stage = cfg.stage
    settings = ranking.PassSettings(stage.topk, stage.min_area_ratio, stage.min_proposal_score, stage.min_object_iou)
    work = EmbeddingLog(folder, checkpoint)
    classes: list[int] = []
    images = 0
    for record, result in with_model_outputs(records, lambda r: r["key"] not in work.done, model, device,
                                             stage.image_size, stage.batch_size):
        cls = int(record["class_index"])
        if cls not in classes:
            classes.append(cls)
        if result is None:  # done before a restart
            continue
        if isinstance(result, Exception):
            work.add(record["key"], cls, torch.zeros((0, 0)))
            continue
        inputs, (logits, masks, queries, sizes) = result
        embeddings, _ = ranking.cluster_pass(logits, masks, queries, torch.from_numpy(inputs.object_mask),
                                             settings=settings, **sizes)
        work.add(record["key"], cls, embeddings)
        images += 1
    log.info("[%s] cluster pass done (%d new images); k-means over %d classes", stage.name, images, len(classes))
    centroids, counts = cluster_classes(work, classes, stage.num_clusters, stage.n_init, cfg.seed, device)
    save_centroids(folder, centroids, counts, checkpoint, stage.num_clusters)
    return images


def label_step(cfg: RunConfig, records: Iterable[dict], model, device: torch.device,
               centroids: dict[int, np.ndarray], writer, summary: StageSummary) -> None:
    """3. The label pass: one ``PART_LABELS`` record (or skip) per record of the job's classes."""
    stage = cfg.stage
    settings = ranking.PassSettings(stage.topk, stage.min_area_ratio, stage.min_label_score, stage.min_object_iou)

    def wanted(record):
        return not writer.has(record["key"]) and int(record["class_index"]) in centroids

    for record, result in with_model_outputs(records, wanted, model, device, stage.image_size, stage.batch_size):
        key = record["key"]
        summary.seen += 1
        if writer.has(key):
            summary.already_done += 1
            continue
        cls = int(record["class_index"])
        skip = ("no_part_classes" if cls not in centroids else "bad_image" if isinstance(result, Exception)
                else None)
        if skip is None:
            inputs, (logits, masks, queries, sizes) = result
            parts = ranking.label_pass(logits, masks, queries, torch.from_numpy(centroids[cls]).to(device),
                                       torch.from_numpy(inputs.object_mask), classifier=stage.classifier,
                                       settings=settings, **sizes)
            skip = "no_parts" if len(parts) == 0 else None  # the IoU-with-the-object filter has no fallback
        if skip is not None:
            writer.skip(key, skip)
            summary.skip(skip)
            continue
        part_masks = parts.masks.cpu().numpy()
        writer.write({
            "key": key, **{name: record[name] for name in ("path", "wnid", "class_index", "class_name")},
            **inputs.frame.as_record(),
            "object_mask": encode_rles(inputs.object_mask[None])[0],
            **canvas_ratios(part_masks, inputs.frame),
            "part_masks": encode_rles(part_masks),
            "cluster_ids": parts.classes.cpu().numpy().astype(np.int64),
            "scores": parts.scores.cpu().numpy().astype(np.float32),
        })
        summary.written += 1
