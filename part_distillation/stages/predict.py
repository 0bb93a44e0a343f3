"""Stage ``predict``: the parts of any images (a file or a folder) with a trained model.

    python -m part_distillation stage=predict stage.images=<file or folder> stage.checkpoint=<run or .pth>
    python -m part_distillation predict <file or folder> <run or .pth> [overrides]      # the same

The model is a stage-4 (class-agnostic proposals) or stage-6 (PartDistillation, parts of
a given object class) checkpoint, loaded by ``inference.TrainedModel``. Each image is
decoded once (``data/images.py``); its object masks come from ``stage.mask_source``:
``whole_image`` (no mask: the model sees the whole image), or one of stage 1's sources
(``models/object_masks.py``: ``grabcut``, ``annotations``, ``detic``) run in the fitted
frame and brought back to the image's size; the best ``stage.max_objects`` objects are
segmented into parts, one model call each.

Output under ``stage.output``:

- ``overlays/<image key>.png``: the image at its decoded size, parts coloured and labelled
  (``p<k>``: part class k of the object class, PartDistillation; ``#<rank>``: proposals),
  objects outlined (``viz.py``);
- one ``part_predictions`` record per image (``store/schemas.py``; masks at the image's
  size), resumable: a rerun skips images whose record and overlay exist, and redraws a
  missing overlay from its record without the model;
- ``predictions.json``: every record as one COCO instance-segmentation json (``store/coco.py``),
  written by whichever job finds every shard closed. Category ids: 1 (``part``) for
  proposals; ``c * K + k + 1`` (``<object class> part <k>``) for part k of object class c
  of a PartDistillation model with K parts per class.

A file that does not decode is one warning line and skipped (``bad_image``); an image where
the mask source finds no object is skipped (``no_object``); with a PartDistillation model and
no ``stage.object_class``, an object whose class the model does not know is a warning line
and left out, an image left with none skipped (``unknown_object_class``). Skips are
remembered by the store, so a rerun skips them too. With ``mask_source=annotations`` an
object's class is the image's ImageNet class (its wnid, as the evaluator keys it): a
PartImageNet json's super-category never names it. A run in which no image yields a part
ends with one warning line counting why. Images are spread over ``shard.count`` jobs by key
(``store/sharding.py``).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
from pathlib import Path

import numpy as np

from part_distillation.config import ConfigError, RunConfig
from part_distillation.data.frame import ImageFrame
from part_distillation.data.imagenet import IMAGE_EXTENSIONS, list_image_tree, printable_name
from part_distillation.data.images import BadImageError, load_rgb
from part_distillation.data.object_annotations import read_object_annotations
from part_distillation.devices import resolve_device
from part_distillation.inference import TrainedModel, read_run_info, resolve_checkpoint
from part_distillation.masks import decode_rles, encode_rles
from part_distillation.models.object_masks import SourceImage, build_source
from part_distillation.models.vocabulary import class_vocabulary
from part_distillation.prediction import Prediction
from part_distillation.progress import progress
from part_distillation.summaries import StageSummary
from part_distillation.stages.shard_io import open_output
from part_distillation.store import RecordStore
from part_distillation.store.coco import export_coco
from part_distillation.store.schemas import PART_PREDICTIONS
from part_distillation.store.sharding import in_shard
from part_distillation.viz import draw_parts, write_png

from part_distillation.config import PredictStageConfig
from part_distillation.stages import SHARDED, StageSpec

SPEC = StageSpec("predict", PredictStageConfig, SHARDED, shards_over="the images, by key",
                 loads_weights=lambda run: run.stage.mask_source == "detic", merged_file="predictions.json")

log = logging.getLogger("part_distillation")

COCO_FILE = "predictions.json"
OVERLAYS = "overlays"
PROPOSAL_CATEGORY = (1, "part")


# ---------------------------------------------------------------------------------------------
# Images


def list_images(images: str | os.PathLike) -> list[tuple[str, str]]:
    """``(key, path)`` of every image file under ``images`` (a folder, searched recursively,
    hidden entries left out; or one file), by key. Keys are paths relative to the folder
    (``/``-separated, undecodable bytes written ``\\xNN``); a single file's key is its name.
    Raises ``FileNotFoundError`` naming the path when there is nothing to read."""
    root = Path(images).expanduser()
    if root.is_file():
        return [(printable_name(root.name), str(root))]
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist (give an image file or a folder of images)")
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in files:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(folder, name)
            found.append((printable_name(Path(os.path.relpath(path, root)).as_posix()), path))
    if not found:
        raise FileNotFoundError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {root}")
    return sorted(found)


def overlay_path(output: str | os.PathLike, key: str) -> Path:
    """Where the overlay of image ``key`` goes: ``<output>/overlays/<key>.png``."""
    return Path(output) / OVERLAYS / f"{key}.png"


# ---------------------------------------------------------------------------------------------
# Object classes and mask sources


@dataclasses.dataclass(frozen=True)
class ObjectClasses:
    """The object classes a model knows, in its class-index (head) order; either list may be None."""

    names: list[str] | None = None
    wnids: list[str] | None = None

    def name(self, index: int) -> str:
        if self.names is not None and 0 <= index < len(self.names):
            return self.names[index]
        return f"class {index}"


def _tree_classes(root, split, words_file) -> tuple[list[str], list[str]] | None:
    """(names, wnids) of an image tree, or None when it is not there."""
    if not root or not os.path.isdir(str(root)):
        return None

    try:
        tree = list_image_tree(root, split=split, words_file=words_file)
    except (OSError, ValueError):
        return None
    return list(tree.names), list(tree.wnids)


def object_classes(cfg: RunConfig, model=None) -> ObjectClasses:
    """The model's object classes: a PartDistillation model's own list (``class_wnids``), named
    by its training image tree (from its run folder) or by ``cfg.data``'s; else ``cfg.data``'s
    tree when present (the classes a detector or the annotations name)."""
    wnids = list(getattr(model, "class_wnids", None) or []) or None
    trees = []
    checkpoint = getattr(model, "checkpoint", None)
    if wnids is not None and checkpoint is not None:
        info = read_run_info(checkpoint)
        trees.append((info.get("data.root"), info.get("data.split"), info.get("data.words_file")))
    trees.append((getattr(cfg.data, "root", None), cfg.data.split, cfg.data.words_file))
    for tree in trees:
        found = _tree_classes(*tree)
        if found is None:
            continue
        names, tree_wnids = found
        if wnids is None:
            return ObjectClasses(names, tree_wnids)
        name_of = dict(zip(tree_wnids, names))
        if all(w in name_of for w in wnids):
            return ObjectClasses([name_of[w] for w in wnids], wnids)
    return ObjectClasses(list(wnids) if wnids else None, wnids)


def resolve_object_class(value: str | int | None, classes: ObjectClasses) -> int | None:
    """``stage.object_class`` as a class index: an index as is; a WordNet id or a name (any of
    a words-file entry's comma-separated synonyms, any case) looked up in ``classes``."""
    if value is None:
        return None
    text = str(value).strip()
    count = len(classes.names) if classes.names is not None else None
    if text.lstrip("-").isdigit():
        index = int(text)
        if index < 0 or (count is not None and index >= count):
            raise ConfigError(f"config key 'stage.object_class' = {value!r} is invalid: expected an index in "
                              f"[0, {count if count is not None else 'C'}) or a class name")
        return index
    if classes.wnids is not None and text in classes.wnids:
        return classes.wnids.index(text)
    if not classes.names:
        raise ConfigError(f"config key 'stage.object_class' = {value!r}: no class list to look the name up in "
                          f"(give the index, or data.root=<the training image tree>)")
    lowered = [n.lower() for n in classes.names]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    matches = [i for i, n in enumerate(lowered) if text.lower() in [p.strip() for p in n.split(",")]]
    if len(matches) == 1:
        return matches[0]
    raise ConfigError(f"config key 'stage.object_class' = {value!r} is not one of the model's "
                      f"{count} object classes (e.g. {', '.join(classes.names[:3])})")


def _known_classes(classes: ObjectClasses) -> str:
    """A few of the model's classes, for a message."""
    listed = classes.wnids or classes.names
    if not listed:
        return "the model carries no class list"
    return f"{len(listed)} classes, e.g. {', '.join(listed[:3])}"


def build_mask_source(cfg: RunConfig, classes: ObjectClasses, own_class_filter: bool = False):
    """Stage 1's object-mask source for ``stage.mask_source`` (None for ``whole_image``), built by
    ``models.object_masks.build_source`` from this stage's settings; its class ids are indices of
    ``classes`` (the Detic vocabulary is their names, in that order). ``own_class_filter``: prefer
    the objects of the image's given class (stage 1's rule)."""
    st = cfg.stage
    if st.mask_source == "whole_image":
        return None
    if st.mask_source == "detic" and not classes.names:
        raise ValueError("stage.mask_source=detic needs the object classes for its vocabulary: "
                         "data.root=<the training image tree> (or a model that carries its class names)")
    names = list(classes.names or [])
    vocabulary = annotations = None
    if st.mask_source == "detic":
        vocabulary = class_vocabulary(names, st.vocabulary, st.vocabulary_cache, st.clip_model)
    if st.mask_source == "annotations":
        annotations = read_object_annotations(st.annotations, parts=st.annotations_are_parts)
    index_of = {name: i for i, name in enumerate(names)}
    index_of.update({wnid: i for i, wnid in enumerate(classes.wnids or [])})
    return build_source(st.mask_source, class_names=names, class_index_of=index_of, keep_top=st.max_objects,
                        own_class_filter=own_class_filter, device=resolve_device(cfg.model.device),
                        weights=cfg.model.weights, model_size=cfg.model.size, vocabulary=vocabulary,
                        fit_size=st.fit_size, score_threshold=st.score_threshold, nms_threshold=st.nms_threshold,
                        max_detections=st.max_detections, annotations=annotations,
                        grabcut_margin=st.grabcut_margin, grabcut_iterations=st.grabcut_iterations,
                        grabcut_work_size=st.grabcut_work_size)


def find_objects(source, key: str, image: np.ndarray, fit_size: int, object_class: int | None,
                 max_objects: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The objects of one image: (masks bool (O, H, W) at the image's size, classes int (O,)),
    at most ``max_objects`` by descending score; ``source`` None: the whole image, one object
    without a mask (returns None)."""
    if source is None:
        return None
    frame = ImageFrame.fit(image.shape[:2], fit_size)
    found = source([SourceImage(key, frame.fit_image(image), frame, -1 if object_class is None else object_class)])[0]
    keep = np.flatnonzero([mask.any() for mask in found.masks])[:max_objects]
    return frame.masks_to_original(found.masks[keep]).astype(bool), np.asarray(found.classes[keep], np.int64)


# ---------------------------------------------------------------------------------------------
# One image


@dataclasses.dataclass
class ImageParts:
    """The parts found in one image, at its size, by descending score."""

    masks: np.ndarray        #: bool (P, H, W)
    scores: np.ndarray       #: float32 (P,)
    clusters: np.ndarray     #: int64 (P,) part cluster within its object class (-1: proposal)
    categories: np.ndarray   #: int64 (P,) COCO category id
    names: list[str]         #: P category names


def part_categories(kind: str, clusters: np.ndarray, object_class: int | None, parts_per_class: int | None,
                    classes: ObjectClasses) -> tuple[np.ndarray, list[str]]:
    """COCO category ids and names of predicted masks (see the module notes)."""
    clusters = np.asarray(clusters, np.int64)
    if kind == "proposal":
        return np.full(len(clusters), PROPOSAL_CATEGORY[0], np.int64), [PROPOSAL_CATEGORY[1]] * len(clusters)
    k = int(parts_per_class) if parts_per_class else int(clusters.max(initial=-1)) + 1
    c = int(object_class or 0)
    return c * k + clusters + 1, [f"{classes.name(c)} part {int(i)}" for i in clusters]


def predict_parts(model, image: np.ndarray, objects: tuple[np.ndarray, np.ndarray] | None,
                  object_class: int | None, *, min_score: float, max_parts: int,
                  classes: ObjectClasses = ObjectClasses()) -> ImageParts:
    """The model's parts of each object of one image (``objects`` None: the whole image), the
    object's class being ``object_class`` when given, else the one its mask source found."""
    h, w = image.shape[:2]
    if objects is None:
        objects = (np.ones((1, h, w), bool), np.full(1, -1, np.int64))
        whole = True
    else:
        whole = False
    pieces = []
    for mask, found_class in zip(*objects):
        cls = object_class if object_class is not None else (int(found_class) if found_class >= 0 else None)
        if model.kind == "proposal":
            cls = None  # class-agnostic
        elif cls is None:
            continue  # an object of no known class: a PartDistillation model has no parts for it
        pred: Prediction = model.predict(image, None if whole else mask, cls)
        masks = np.asarray(pred.masks, bool).reshape(-1, h, w)
        scores = np.asarray(pred.scores, np.float32).reshape(-1)
        keep = np.flatnonzero((scores >= min_score) & masks.reshape(len(masks), -1).any(1))
        keep = keep[np.argsort(-scores[keep], kind="stable")][:max_parts]
        proposals = model.kind == "proposal" or pred.clusters is None
        clusters = np.full(len(keep), -1, np.int64) if proposals else np.asarray(pred.clusters, np.int64)[keep]
        cats, names = part_categories("proposal" if proposals else model.kind, clusters, cls,
                                      getattr(model, "parts_per_class", None), classes)
        pieces.append(ImageParts(masks[keep], scores[keep], clusters, cats, names))
    if not pieces:
        return ImageParts(np.zeros((0, h, w), bool), np.zeros(0, np.float32), np.zeros(0, np.int64),
                          np.zeros(0, np.int64), [])
    order = np.argsort(-np.concatenate([p.scores for p in pieces]), kind="stable")
    all_names = [n for p in pieces for n in p.names]
    return ImageParts(np.concatenate([p.masks for p in pieces])[order],
                      np.concatenate([p.scores for p in pieces])[order],
                      np.concatenate([p.clusters for p in pieces])[order],
                      np.concatenate([p.categories for p in pieces])[order], [all_names[i] for i in order])


def part_record(key: str, path: str, image_size: tuple[int, int], parts: ImageParts,
                objects: tuple[np.ndarray, np.ndarray] | None, mask_source: str, model_kind: str) -> dict:
    """The ``PART_PREDICTIONS`` record of one image."""
    h, w = image_size
    object_masks, object_classes = objects if objects is not None else (np.zeros((0, h, w), bool),
                                                                        np.zeros(0, np.int64))
    return {"key": key, "path": path, "height": int(h), "width": int(w), "mask_source": mask_source,
            "model_kind": model_kind, "object_masks": encode_rles(object_masks),
            "object_classes": np.asarray(object_classes, np.int64), "part_masks": encode_rles(parts.masks),
            "scores": np.asarray(parts.scores, np.float32), "clusters": np.asarray(parts.clusters, np.int64),
            "part_classes": np.asarray(parts.categories, np.int64), "part_class_names": list(parts.names)}


def draw_prediction(image: np.ndarray, record: dict) -> np.ndarray:
    """The overlay of one ``PART_PREDICTIONS`` record on its image: parts coloured (part
    cluster k as id k + 1; proposals by rank) and labelled (``p<k>`` / ``#<rank>``), the best
    on top, objects outlined."""
    size = (int(record["height"]), int(record["width"]))
    if tuple(image.shape[:2]) != size:
        raise ValueError(f"{record['path']}: the image decodes to {image.shape[:2]}, its record says {size}")
    masks = decode_rles(record["part_masks"], size=size)
    clusters = np.asarray(record["clusters"], np.int64)
    proposals = record["model_kind"] == "proposal"
    ids = [rank + 1 if proposals else int(k) + 1 for rank, k in enumerate(clusters)]
    texts = [f"#{rank + 1}" if proposals else f"p{int(k)}" for rank, k in enumerate(clusters)]
    objects = decode_rles(record["object_masks"], size=size)
    outline = objects.any(0) if len(objects) else None
    return draw_parts(image, masks[::-1], ids[::-1], object_mask=outline, texts=texts[::-1])


# ---------------------------------------------------------------------------------------------
# The stage


def load_trained_model(cfg: RunConfig):
    """The trained model of ``stage.checkpoint`` (``inference.TrainedModel``) on ``model.device``."""
    return TrainedModel.load(cfg.stage.checkpoint, iteration=cfg.stage.iteration,
                             device=cfg.model.device)


def check(cfg: RunConfig) -> None:
    """What can be checked before anything runs: the images, the checkpoint, the annotations."""
    st = cfg.stage
    try:
        list_images(st.images)
    except FileNotFoundError as err:
        raise ConfigError(f"config key 'stage.images': {err}") from None
    if not os.path.exists(st.checkpoint):
        raise ConfigError(f"config key 'stage.checkpoint': {st.checkpoint} not found (a stage-4 or stage-6 run "
                          f"folder, or one of its checkpoints/model_*.pth)")

    resolve_checkpoint(st.checkpoint, st.iteration, path_key="stage.checkpoint", iteration_key="stage.iteration")
    if st.mask_source == "annotations" and not (st.annotations and os.path.isfile(st.annotations)):
        raise ConfigError(f"config key 'stage.annotations': object annotation file {st.annotations} not found "
                          f"(a COCO json; mask_source=annotations needs one)")
    if st.mask_source == "detic" and not cfg.model.weights:
        raise ConfigError("config key 'model.weights': stage.mask_source=detic needs Detic's weights "
                          "(model=detic_swinb; see weights/README.md)")


def run(cfg: RunConfig, context) -> StageSummary:
    st = cfg.stage
    summary = StageSummary(st.name, output=st.output)
    images = list_images(st.images)
    mine = [(key, path) for key, path in images if in_shard(key, cfg.shard.index, cfg.shard.count)]
    tally = PredictTally()
    with open_output(cfg, PART_PREDICTIONS, context) as out:
        todo = resume(cfg, out, mine, summary, tally)
        if todo:
            setup = PredictSetup.load(cfg)
            for key, path in progress(todo, len(todo), f"predict {cfg.shard.index}/{cfg.shard.count}",
                                      st.progress_every):
                predict_image(cfg, setup, key, path, out, summary, tally)
        counts = out.counts
    if todo and not tally.with_parts:
        log.warning("[predict] no part found in any of the %d images: %s", len(todo),
                    ", ".join(f"{n} {reason}" for reason, n in tally.why.most_common()))
    summary.skipped.clear()  # whole-shard counts: a resumed run reports earlier skips too
    summary.skipped.update(counts["skipped"])
    summary.extra.update(overlays=str(Path(st.output) / OVERLAYS), overlays_redrawn=tally.redrawn,
                         images_found=len(images), objects_of_unknown_class=tally.unknown_objects)
    coco = Path(st.output) / COCO_FILE
    store = RecordStore(st.output)
    if getattr(context, "is_main", True) and not store.summary()["shards_missing_summary"]:
        if summary.written or tally.redrawn or not coco.is_file():
            written = write_coco(store, coco)
            log.info("[predict] %d images, %d parts: %s", written["images"], written["annotations"], coco)
        summary.extra["coco"] = str(coco)
    return summary.finish()


@dataclasses.dataclass
class PredictTally:
    """What one run did beyond the summary's counts."""

    redrawn: int = 0  #: overlays redrawn from their records
    with_parts: int = 0  #: images given at least one part
    unknown_objects: int = 0  #: objects of no class the model knows, left out
    #: this run's images without parts, by reason
    why: collections.Counter = dataclasses.field(default_factory=collections.Counter)


@dataclasses.dataclass
class PredictSetup:
    """The model, its object classes, the object class asked for and the mask source."""

    model: object
    classes: ObjectClasses
    object_class: int | None
    source: object

    @classmethod
    def load(cls, cfg: RunConfig) -> "PredictSetup":
        st = cfg.stage
        model = load_trained_model(cfg)
        classes = object_classes(cfg, model)
        object_class = resolve_object_class(st.object_class, classes)
        if model.kind == "part_distillation" and object_class is None and st.mask_source in ("whole_image", "grabcut"):
            raise ConfigError(f"config key 'stage.object_class' is needed: a PartDistillation model segments the "
                              f"parts of a given object class, and mask_source={st.mask_source} finds none")
        return cls(model, classes, object_class,
                   build_mask_source(cfg, classes, own_class_filter=object_class is not None))


def resume(cfg: RunConfig, out, mine: list[tuple[str, str]], summary: StageSummary, tally: PredictTally) -> list:
    """The ``(key, path)`` still to predict; a done image whose overlay was lost gets it redrawn
    from its record (no model needed)."""
    todo = []
    for key, path in mine:
        if not out.has(key):
            todo.append((key, path))
            continue
        record = out.read(key)  # None: skipped (bad image, no object)
        if record is not None and not overlay_path(cfg.stage.output, key).is_file():
            try:
                write_png(overlay_path(cfg.stage.output, key), draw_prediction(_load(cfg, path), record))
                tally.redrawn += 1
            except (BadImageError, FileNotFoundError, ValueError) as err:
                log.warning("overlay of %s not redrawn: %s", path, err)
        summary.already_done += 1
    summary.seen = len(mine)
    return todo


def _skip(out, summary: StageSummary, tally: PredictTally, key: str, reason: str, why: str | None = None) -> None:
    out.skip(key, reason)
    summary.skip(reason)
    tally.why[why or reason] += 1


def predict_image(cfg: RunConfig, setup: PredictSetup, key: str, path: str, out, summary: StageSummary,
                  tally: PredictTally) -> None:
    """One image: its objects, their parts, its record and overlay (or a skip)."""
    st, model, object_class = cfg.stage, setup.model, setup.object_class
    try:
        image = _load(cfg, path)
    except (BadImageError, FileNotFoundError) as err:
        log.warning("bad image skipped: %s: %s", path, getattr(err, "reason", "file not found"))
        return _skip(out, summary, tally, key, "bad_image")
    objects = find_objects(setup.source, key, image, st.fit_size, object_class, st.max_objects)
    if objects is not None and len(objects[0]) == 0:
        log.info("no object found in %s (mask_source=%s): skipped", path, st.mask_source)
        return _skip(out, summary, tally, key, "no_object", f"no_object (mask_source={st.mask_source})")
    if objects is not None and object_class is not None and model.kind == "part_distillation":
        objects = (objects[0], np.full(len(objects[0]), object_class, np.int64))  # the class segmented
    elif objects is not None and model.kind == "part_distillation":
        known = objects[1] >= 0
        if not known.all():
            log.warning("%s: %d of its %d objects are of no class the model knows (%s): skipped; the "
                        "class is the image's wnid (json 'wnid', file name n01234567_*, or its folder), "
                        "or give stage.object_class", path, int((~known).sum()), len(known),
                        _known_classes(setup.classes))
            tally.unknown_objects += int((~known).sum())
        if not known.any():
            return _skip(out, summary, tally, key, "unknown_object_class")
        objects = (objects[0][known], objects[1][known])
    parts = predict_parts(model, image, objects, object_class, min_score=st.min_score, max_parts=st.max_parts,
                          classes=setup.classes)
    record = part_record(key, path, image.shape[:2], parts, objects, st.mask_source, model.kind)
    write_png(overlay_path(st.output, key), draw_prediction(image, record))  # first: a record means both
    out.write(record)
    summary.written += 1
    if len(parts.scores):
        tally.with_parts += 1
    else:
        tally.why[f"no part scored >= stage.min_score={st.min_score:g}"] += 1


def write_coco(store: RecordStore, path: str | os.PathLike) -> dict:
    """Every record of a predict output as one COCO json (``store.coco.export_coco``), with the
    part classes met as categories (id, name)."""
    categories: dict[int, str] = {}
    for record in store.iter_records():
        categories.update(zip((int(c) for c in record["part_classes"]), record["part_class_names"]))
    table = [{"id": i, "name": categories[i]} for i in sorted(categories)]
    return export_coco(store, path, categories=table)


def _load(cfg: RunConfig, path: str) -> np.ndarray:
    return load_rgb(path, max_pixels=cfg.data.max_pixels, oversize=cfg.data.oversize)
