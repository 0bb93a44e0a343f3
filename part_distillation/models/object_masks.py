"""Object-mask sources for stage 1, interchangeable: each turns fitted images into object masks.

Every source takes a batch of :class:`SourceImage` (the image already fitted to 640 with
``data/frame.py``) and returns one :class:`ObjectMasks` per image, in the fitted frame and by
descending score, so the stage writes the same record whichever source ran:

- :class:`DeticSource` (the reference, docs/method.md#stage-1): Detic with a vocabulary of all
  the dataset's classes; keep the detections of the image's own class (compared by the one
  global class index), else all; the top ``keep_top`` by score (:func:`select_own_class_top`).
- :class:`AnnotationSource`: object masks given with the dataset (COCO json; see
  ``data/object_annotations.py``), same selection rule, score 1.
- :class:`Mask2FormerSource`: a COCO instance Mask2Former, upstream's plain instance inference
  (``postprocess.instance_inference``); its classes are COCO's, so the own-class filter does not
  apply (predicted class -1 = not a dataset class; the COCO id is in the name).
- :class:`GrabCutSource`: OpenCV GrabCut initialised from a central box: no weights at all.

:func:`build_source` builds any of them from plain values (stage 1 and ``predict`` both use it).

Sources compute only: no logging, files or config (the stage wires them).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol, Sequence

import numpy as np
import torch

from part_distillation.data.frame import ImageFrame, fitted_size, resize_image
from part_distillation.data.object_annotations import wnid_of_key
from part_distillation.masks import decode_rles, resize_masks_nearest
from part_distillation.postprocess import instance_inference


@dataclass(frozen=True)
class SourceImage:
    """One image handed to a source."""

    key: str
    image: np.ndarray  #: fitted uint8 RGB (h, w, 3)
    frame: ImageFrame
    class_index: int  #: the one global class index of the image's folder


@dataclass
class ObjectMasks:
    """Objects of one image in the fitted frame, by descending score."""

    masks: np.ndarray  #: (N, h, w) bool
    boxes: np.ndarray  #: (N, 4) float32 XYXY pixels
    scores: np.ndarray  #: (N,) float32
    classes: np.ndarray  #: (N,) int64 global class index, -1 when not a dataset class
    class_names: list[str]  #: N names

    def __len__(self) -> int:
        return len(self.scores)

    def select(self, index: np.ndarray) -> "ObjectMasks":
        index = np.asarray(index, dtype=np.int64)
        return ObjectMasks(self.masks[index], self.boxes[index], self.scores[index], self.classes[index],
                           [self.class_names[i] for i in index])

    @classmethod
    def empty(cls, size: tuple[int, int]) -> "ObjectMasks":
        return cls(np.zeros((0, *size), bool), np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                   np.zeros(0, np.int64), [])


class ObjectMaskSource(Protocol):
    name: str

    def __call__(self, images: Sequence[SourceImage]) -> list[ObjectMasks]: ...


def select_own_class_top(classes, scores, own_class: int, keep_top: int, own_class_filter: bool = True) -> np.ndarray:
    """Indices kept from one image's detections: those of ``own_class`` if any (and the filter is
    on), else all; then the ``keep_top`` best by score, best first (ties keep input order)."""
    classes = np.asarray(classes).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    candidates = np.arange(len(scores))
    if own_class_filter:
        own = candidates[classes == own_class]
        if len(own):
            candidates = own
    order = np.argsort(-scores[candidates], kind="stable")
    return candidates[order[:keep_top]]


def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """(N, h, w) bool -> (N, 4) float32 XYXY boxes of pixel edges (an empty mask gives zeros)."""
    masks = np.asarray(masks, dtype=bool)
    boxes = np.zeros((len(masks), 4), np.float32)
    for i, mask in enumerate(masks):
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if len(rows):
            boxes[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return boxes


# ---------------------------------------------------------------------------------------------
# Detic


class DeticSource:
    """Detic under the labelling preset; ``model`` already holds the dataset's vocabulary, so a
    predicted class id *is* the global class index."""

    name = "detic"

    def __init__(self, model, class_names: Sequence[str], keep_top: int = 10, own_class_filter: bool = True):
        if model.num_classes != len(class_names):
            raise ValueError(f"the Detic vocabulary has {model.num_classes} classes, the dataset {len(class_names)}")
        self.model = model
        self.class_names = list(class_names)
        self.keep_top = keep_top
        self.own_class_filter = own_class_filter

    def __call__(self, images: Sequence[SourceImage]) -> list[ObjectMasks]:
        def select(i, raw):  # before the mask head: only the kept detections pay for masks
            return torch.from_numpy(select_own_class_top(raw.classes.cpu().numpy(), raw.scores.cpu().numpy(),
                                                         images[i].class_index, self.keep_top,
                                                         self.own_class_filter))

        dets = self.model.predict([im.image for im in images], [im.frame.fitted for im in images], select=select)
        out = []
        for det in dets:
            classes = det.classes.cpu().numpy().astype(np.int64)
            out.append(ObjectMasks(det.masks.cpu().numpy(), det.boxes.cpu().numpy().astype(np.float32),
                                   det.scores.cpu().numpy().astype(np.float32), classes,
                                   [self.class_names[c] for c in classes]))
        return out


# ---------------------------------------------------------------------------------------------
# Given annotations


class AnnotationSource:
    """Object masks given with the dataset (``data.object_annotations.ObjectAnnotations``).

    ``class_index_of`` maps a category's wnid or name to the global class index (else -1). The
    object of a part file (PartImageNet) is of the image's class: its wnid, from the json or
    else from the image's key (file name prefix or folder), never the parts' super-category.
    """

    name = "annotations"

    def __init__(self, annotations, class_index_of: Mapping[str, int], keep_top: int = 10,
                 own_class_filter: bool = True):
        self.annotations = annotations
        self.class_index_of = dict(class_index_of)
        self.keep_top = keep_top
        self.own_class_filter = own_class_filter

    def __call__(self, images: Sequence[SourceImage]) -> list[ObjectMasks]:
        return [self._one(im) for im in images]

    def _one(self, im: SourceImage) -> ObjectMasks:
        given = self.annotations.get(im.key)
        if given is None or not given.rles:
            return ObjectMasks.empty(im.frame.fitted)
        if tuple(given.size) != im.frame.original:
            raise ValueError(f"{im.key}: the annotation is {given.size[0]}x{given.size[1]} but the image decodes "
                             f"to {im.frame.original[0]}x{im.frame.original[1]}")
        masks = im.frame.masks_to_fitted(decode_rles(list(given.rles), size=given.size))
        keep = masks.reshape(len(masks), -1).any(1)
        wnids = list(given.wnids)
        if given.whole_image:  # a part file's object: the image's class, from its key when the json has none
            wnids = [w or wnid_of_key(im.key) for w in wnids]
        classes = np.array([self.class_index_of.get(w or "", self.class_index_of.get(n, -1))
                            for w, n in zip(wnids, given.names)], dtype=np.int64)
        found = ObjectMasks(masks, boxes_from_masks(masks), np.ones(len(masks), np.float32), classes,
                            list(given.names)).select(np.flatnonzero(keep))
        return found.select(select_own_class_top(found.classes, found.scores, im.class_index, self.keep_top,
                                                  self.own_class_filter))


# ---------------------------------------------------------------------------------------------
# COCO instance Mask2Former


class Mask2FormerSource:
    """Plain Mask2Former instance inference (COCO classes); the best ``keep_top`` non-empty masks."""

    name = "mask2former"

    def __init__(self, model, keep_top: int = 10, topk: int = 100, class_names: Sequence[str] | None = None):
        self.model = model
        self.keep_top = keep_top
        self.topk = topk
        self.class_names = list(class_names) if class_names is not None else None

    @torch.no_grad()
    def __call__(self, images: Sequence[SourceImage]) -> list[ObjectMasks]:
        from part_distillation.models.mask2former import preprocess_images  # transformers: only for this source

        device = next(self.model.parameters()).device
        batch = preprocess_images([im.image for im in images], device=device)
        outputs = self.model(batch.pixel_values)
        out = []
        for i, im in enumerate(images):
            pred = instance_inference(outputs["pred_logits"][i], outputs["pred_masks"][i],
                                      padded_size=batch.padded_size, image_size=batch.image_sizes[i],
                                      topk=self.topk)
            masks = pred.masks.cpu().numpy()
            scores = pred.scores.float().cpu().numpy().astype(np.float32)
            coco_ids = pred.classes.cpu().numpy()
            nonempty = np.flatnonzero(masks.reshape(len(masks), -1).any(1))
            order = nonempty[np.argsort(-scores[nonempty], kind="stable")][: self.keep_top]
            names = [self.class_names[c] if self.class_names else f"coco:{int(c)}" for c in coco_ids[order]]
            out.append(ObjectMasks(masks[order], boxes_from_masks(masks[order]), scores[order],
                                   np.full(len(order), -1, np.int64), names))
        return out


# ---------------------------------------------------------------------------------------------
# GrabCut


class GrabCutSource:
    """OpenCV GrabCut from a central box (``margin`` of each side left out): one mask, score 1.

    GrabCut runs on the image scaled to ``work_size`` (longer side; 10 s -> 2 s per image at 640
    -> 320 on a busy CPU) and its mask is brought back to the given frame (nearest).

    For photos when no detector weights are present; ImageNet images are mostly centred on
    their object. The result is deterministic (GrabCut's GMM init uses OpenCV's fixed RNG).
    """

    name = "grabcut"

    def __init__(self, margin: float = 0.1, iterations: int = 5, work_size: int | None = 320):
        if not 0.0 <= margin < 0.5:
            raise ValueError(f"GrabCut box margin must be in [0, 0.5), got {margin}")
        self.margin = margin
        self.iterations = iterations
        self.work_size = work_size  # GrabCut runs with the longer side at most this (None: as given)

    def __call__(self, images: Sequence[SourceImage]) -> list[ObjectMasks]:
        return [self._one(im) for im in images]

    def _one(self, im: SourceImage) -> ObjectMasks:
        import cv2  # OpenCV: only for GrabCut

        out_size = im.image.shape[:2]
        image = im.image
        if self.work_size is not None and max(out_size) > self.work_size:  # ~4x faster per halving
            image = resize_image(image, fitted_size(*out_size, self.work_size))
        h, w = image.shape[:2]
        x0, y0 = int(round(w * self.margin)), int(round(h * self.margin))
        rect = (x0, y0, max(w - 2 * x0, 1), max(h - 2 * y0, 1))
        mask = np.zeros((h, w), np.uint8)
        if h < 2 or w < 2 or rect[2] < 2 or rect[3] < 2:
            return ObjectMasks.empty(out_size)
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        cv2.setRNGSeed(0)
        cv2.grabCut(np.ascontiguousarray(image[:, :, ::-1]), mask, rect, bgd, fgd, self.iterations,
                    cv2.GC_INIT_WITH_RECT)
        found = resize_masks_nearest((mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD), out_size)
        if not found.any():
            return ObjectMasks.empty(out_size)
        return ObjectMasks(found[None], boxes_from_masks(found[None]), np.ones(1, np.float32),
                           np.full(1, -1, np.int64), [""])


# ---------------------------------------------------------------------------------------------
# Building a source from plain values (stage 1 and predict read them from their own configs)

#: ``model.size`` -> Mask2Former spec name for the ``mask2former`` source where it differs from the
#: stages' map (``models.mask2former.spec_name_for_size``): the tiny model is the reference fixture's.
MASK2FORMER_SPECS = {"tiny": "tiny_fixture"}
SOURCES = ("detic", "annotations", "mask2former", "grabcut")


def build_source(kind: str, *, class_names: Sequence[str] = (), class_index_of: Mapping[str, int] | None = None,
                 keep_top: int = 10, own_class_filter: bool = True, device: torch.device | str = "cpu",
                 weights: str | None = None, model_size: str = "base", vocabulary: np.ndarray | None = None,
                 fit_size: int = 640, score_threshold: float = 0.02, nms_threshold: float = 0.5,
                 max_detections: int = 1000, annotations=None, grabcut_margin: float = 0.1,
                 grabcut_iterations: int = 5, grabcut_work_size: int | None = 320) -> ObjectMaskSource:
    """The object-mask source ``kind``, ready to call.

    ``class_names``: the dataset's classes in global index order (Detic's vocabulary names them;
    ``vocabulary`` is their (C, 512) CLIP embeddings). ``class_index_of``: wnid or name -> class
    index, for ``annotations`` (an ``ObjectAnnotations``, already read). ``weights``: the
    detector's file for ``detic`` and ``mask2former``; ``fit_size``, ``score_threshold``,
    ``nms_threshold``, ``max_detections``: Detic's own settings.
    """
    if kind == "grabcut":
        return GrabCutSource(grabcut_margin, grabcut_iterations, grabcut_work_size)
    if kind == "annotations":
        if annotations is None:
            raise ValueError("the annotations source needs the object annotations (a COCO json, read)")
        return AnnotationSource(annotations, class_index_of or {}, keep_top, own_class_filter)
    if kind in ("mask2former", "detic"):
        if not weights:
            raise FileNotFoundError(f"the {kind} source needs a weights file")
        if not Path(weights).is_file():
            raise FileNotFoundError(f"{kind} weights not found at {weights}")
    if kind == "mask2former":
        # transformers: only for this source
        from part_distillation.models.checkpoint import load_detectron2_pickle
        from part_distillation.models.mask2former import build_mask2former, spec_name_for_size

        model = build_mask2former(MASK2FORMER_SPECS.get(model_size) or spec_name_for_size(model_size))
        load_detectron2_pickle(model, weights)
        return Mask2FormerSource(model.to(device).eval(), keep_top)
    if kind == "detic":
        from part_distillation.models.detic import DeticConfig, build_detic  # heavy: only for this source

        if vocabulary is None or len(vocabulary) != len(class_names):
            raise ValueError(f"the detic source needs one vocabulary embedding per class ({len(class_names)}), "
                             f"got {0 if vocabulary is None else len(vocabulary)}")
        config = DeticConfig.for_labeling(model_size, min_size_test=fit_size, score_thresh=score_threshold,
                                          nms_thresh=nms_threshold, detections_per_image=max_detections)
        model = build_detic(weights, config, vocabulary=vocabulary, device=device)
        return DeticSource(model, class_names, keep_top, own_class_filter)
    raise ValueError(f"unknown object-mask source {kind!r} (one of {', '.join(SOURCES)})")
