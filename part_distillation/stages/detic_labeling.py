"""Stage 1 ``detic_labeling``: object masks for every image of one shard of the tree.

docs/method.md#stage-1. Each image is decoded once, fitted to 640 (``data/frame.py``) and
handed, in batches, to the object-mask source ``stage.source`` (``models/object_masks.py``):
Detic (the reference), given annotations, a COCO Mask2Former or GrabCut. One
``OBJECT_MASKS`` record per image (masks as RLE in the fitted frame); an image with no
object is skipped as ``no_detections``, a file that does not decode as ``bad_image``; both
are remembered so a rerun skips them too. The Detic vocabulary covers every class of the
dataset whatever the shard (docs/differences.md#trap-1), so the own-class filter compares global indices.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from part_distillation.config import ConfigError, RunConfig
from part_distillation.data.frame import ImageFrame
from part_distillation.data.imagenet import ImageRecordRef, ImageTree
from part_distillation.data.images import BadImageError, load_rgb
from part_distillation.context import JobContext
from part_distillation.data.object_annotations import read_object_annotations
from part_distillation.devices import resolve_device
from part_distillation.masks import encode_rles
from part_distillation.models.object_masks import ObjectMasks, SourceImage, build_source
from part_distillation.models.vocabulary import class_vocabulary
from part_distillation.progress import progress
from part_distillation.stages.shard_io import list_shard_images, open_output
from part_distillation.store.schemas import OBJECT_MASKS
from part_distillation.summaries import StageSummary

from part_distillation.config import DeticStageConfig
from part_distillation.stages import SHARDED, StageSpec

SPEC = StageSpec("detic_labeling", DeticStageConfig, SHARDED, shards_over="the images of data.root (shard.by)",
                 reads_image_tree=True,
                 loads_weights=lambda run: run.stage.source in ("detic", "mask2former"),
                 model_family=lambda run: run.stage.source if run.stage.source in ("detic", "mask2former") else None)

log = logging.getLogger("part_distillation")

WEIGHTS_README = "weights/README.md"


def run(cfg: RunConfig, context: JobContext) -> StageSummary:
    summary = StageSummary(cfg.stage.name, output=cfg.stage.output)
    tree, refs = list_shard_images(cfg)
    source = source_from_config(cfg, tree)  # before the output opens: a missing file fails here
    with open_output(cfg, OBJECT_MASKS, context) as out:
        todo = [ref for ref in refs if not out.has(ref.key)]
        summary.seen, summary.already_done = len(refs), len(refs) - len(todo)
        batches = _batches(todo, cfg.stage.batch_size, cfg)
        for batch in progress(batches, (len(todo) + cfg.stage.batch_size - 1) // cfg.stage.batch_size,
                              f"{cfg.stage.name} {cfg.shard.index}/{cfg.shard.count}",
                              max(1, cfg.stage.progress_every // cfg.stage.batch_size)):
            good = []
            for ref, loaded in batch:
                if isinstance(loaded, BadImageError):
                    log.warning("bad image skipped: %s: %s", ref.path, loaded.reason)
                    out.skip(ref.key, "bad_image")
                    summary.skip("bad_image")
                else:
                    good.append((ref, loaded))
            if not good:
                continue
            for (ref, image), found in zip(good, source([image for _, image in good])):
                if len(found) == 0:
                    out.skip(ref.key, "no_detections")
                    summary.skip("no_detections")
                    continue
                out.write(object_record(ref, tree, image.frame, found, source.name))
                summary.written += 1
        counts = out.counts
    summary.skipped.clear()  # whole-shard counts: a resumed run reports earlier skips too
    summary.skipped.update(counts["skipped"])
    summary.extra.update(source=source.name, images_in_tree=len(tree))
    return summary.finish()


def object_record(ref: ImageRecordRef, tree: ImageTree, frame: ImageFrame, found: ObjectMasks, source: str) -> dict:
    """The ``OBJECT_MASKS`` record of one image."""
    return {"key": ref.key, "path": ref.path, "wnid": ref.wnid, "class_index": ref.class_index,
            "class_name": tree.names[ref.class_index], **frame.as_record(), "source": source,
            "masks": encode_rles(found.masks), "boxes": np.asarray(found.boxes, np.float32).reshape(-1, 4),
            "scores": np.asarray(found.scores, np.float32), "pred_classes": np.asarray(found.classes, np.int64),
            "pred_class_names": list(found.class_names)}


def _batches(refs: Sequence[ImageRecordRef], size: int, cfg: RunConfig) -> Iterator[list]:
    """Batches of (ref, SourceImage | BadImageError): every image decoded once and fitted."""
    for start in range(0, len(refs), size):
        batch = []
        for ref in refs[start:start + size]:
            try:
                image = load_rgb(ref.path, max_pixels=cfg.data.max_pixels, oversize=cfg.data.oversize)
            except BadImageError as err:
                batch.append((ref, err))
                continue
            except FileNotFoundError:  # listed, then removed before this job reached it
                batch.append((ref, BadImageError(ref.path, "file disappeared after listing")))
                continue
            frame = ImageFrame.fit(image.shape[:2], cfg.stage.fit_size)
            batch.append((ref, SourceImage(ref.key, frame.fit_image(image), frame, ref.class_index)))
        yield batch


# ---------------------------------------------------------------------------------------------
# Wiring the source from the config


def prepare_device(cfg: RunConfig) -> torch.device:
    """``model.device`` (``devices.resolve_device``); on a GPU, TF32 off unless ``stage.allow_tf32``."""
    device = resolve_device(cfg.model.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.stage.allow_tf32
        torch.backends.cudnn.allow_tf32 = cfg.stage.allow_tf32
    return device


def check(cfg: RunConfig) -> None:
    """The files this job needs, checked before anything is submitted (one line naming the key)."""
    stage = cfg.stage  # model.weights is checked by launch.check_job (stages.loads_weights)
    if stage.source in ("detic", "mask2former") and not cfg.model.weights:
        raise ConfigError(f"config key 'model.weights': stage.source={stage.source} needs a weights file "
                          f"(see {WEIGHTS_README})")
    if stage.source == "detic" and stage.vocabulary and not Path(stage.vocabulary).is_file():
        raise ConfigError(f"config key 'stage.vocabulary': {stage.vocabulary} not found "
                          f"(a (classes, 512) .npy of CLIP embeddings in class order)")
    if stage.source == "annotations" and not (stage.annotations and Path(stage.annotations).is_file()):
        raise ConfigError(f"config key 'stage.annotations': object annotation file {stage.annotations} "
                          f"not found (a COCO json)")


def _require_weights(path: str | None, what: str) -> Path:
    if not path:
        raise FileNotFoundError(f"stage.source={what} needs model.weights (see {WEIGHTS_README})")
    weights = Path(path)
    if not weights.is_file():
        raise FileNotFoundError(f"{what} weights not found at {weights}: place the file there "
                                f"(where to obtain it: {WEIGHTS_README}) or set model.weights=")
    return weights


def source_from_config(cfg: RunConfig, tree: ImageTree):
    """The object-mask source ``cfg.stage.source``, built by ``models.object_masks.build_source``
    from this stage's settings (the image tree's classes are the vocabulary's)."""
    stage = cfg.stage
    weights = vocabulary = annotations = None
    if stage.source in ("detic", "mask2former"):
        weights = str(_require_weights(cfg.model.weights, stage.source))
    if stage.source == "detic":
        vocabulary = class_vocabulary(tree.names, stage.vocabulary, stage.vocabulary_cache, stage.clip_model)
    if stage.source == "annotations":
        if not stage.annotations:
            raise FileNotFoundError("stage.source=annotations needs stage.annotations (a COCO json)")
        annotations = read_object_annotations(stage.annotations, parts=stage.annotations_are_parts)
    index_of = {name: i for i, name in enumerate(tree.names)}
    index_of.update({wnid: i for i, wnid in enumerate(tree.wnids)})
    return build_source(stage.source, class_names=tree.names, class_index_of=index_of, keep_top=stage.keep_top,
                        own_class_filter=stage.own_class_filter, device=prepare_device(cfg), weights=weights,
                        model_size=cfg.model.size, vocabulary=vocabulary, fit_size=stage.fit_size,
                        score_threshold=stage.score_threshold, nms_threshold=stage.nms_threshold,
                        max_detections=stage.max_detections, annotations=annotations,
                        grabcut_margin=stage.grabcut_margin, grabcut_iterations=stage.grabcut_iterations,
                        grabcut_work_size=stage.grabcut_work_size)
