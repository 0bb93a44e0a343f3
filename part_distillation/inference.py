"""Trained models of the training stages (4, 6 and the baselines) as part predictors: load a checkpoint, predict parts of an image.

A stage-4 run (``proposal_learning``) gives a class-agnostic *proposal* model, a stage-6
run (``part_distillation``) an object-conditioned *part_distillation* model, a baseline run
(``supervised_learning``, ``fewshot_learning``) a *proposal* or *semantic* one. Any is
loaded from a checkpoint file or its run folder (the newest checkpoint, or the one at an
iteration)::

    model = TrainedModel.load("outputs/part_distillation/synthetic_train")
    prediction = model.predict(image, object_mask, object_class=model.class_index("n90000001"))
    prediction.masks     # bool (N, H, W) at the image's original size
    prediction.scores    # float (N,)
    prediction.clusters  # int64 (N,): part class within the object class (0..K-1)

What a run is comes from its folder: the manifest (stage, model size, image size, K,
the training image tree) and, for stage 6, ``classes.json`` (the object classes in head
order, written by the stage). A bare checkpoint file without a run folder is accepted
too: the architecture is recognised from its weights, the kind from its class head
(2 outputs: proposals), and what cannot be recognised is passed to :meth:`TrainedModel.load`.

Prediction follows docs/method.md#inference: the image is fitted to the model's image size (longer
side; ``data.frame.ImageFrame``); a proposal model sees the fitted image as it is, padded to
a multiple of 32 with 0 after normalisation (the reference's stage-4 test input, no grey
square), a PartDistillation model its test resolution (``eval_max_size``); proposals use
``postprocess.proposal_inference_settings`` (top 200 by foreground probability, restricted
to the object, one label per pixel (optionally also the overlapping masks of the same
forward pass), area > 5% then score > -1); the PartDistillation model uses
the object class's K + 1 head rows and ``postprocess.part_inference`` (top 200 (query,
part) pairs of the K + 1 softmax, restricted to the object, one label per pixel, merged
by part class). Masks are computed in the fitted frame and mapped back to the original
size (nearest).

This module also holds what stage 5 needs to find and load its proposal checkpoint
(``engine.checkpoint.resolve_checkpoint``, :func:`load_checkpoint_model`), written once.
Models only compute here: no logging, no files written.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from part_distillation.config import stage_schemas
from part_distillation.data.frame import ImageFrame
from part_distillation.devices import resolve_device
from part_distillation.engine import checkpoint as train_ckpt
from part_distillation.engine.checkpoint import resolve_checkpoint  # noqa: F401 (part of this module's API)
from part_distillation.prediction import Prediction
from part_distillation.state_file import read_model_state

#: The model kinds; which one a training stage's run holds is its schema's ``model_kind``
#: (``config.py``). ``semantic``: the supervised and few-shot baselines' plain head, one output
#: per part class of their dataset (not conditioned); their ``stage.variant`` says which.
KINDS = ("proposal", "part_distillation", "semantic")
#: PartDistillation's test resolution in the reference: shortest side 640, longer side <= 1333.
PD_TEST_SIZE, PD_TEST_MAX_SIZE = 640, 1333
#: The stage-6 run folder's list of object classes in head order (``{"wnids": [...]}``).
CLASSES_FILE = "classes.json"

PathLike = str | os.PathLike


# --------------------------------------------------------------------------- settings

def run_folder_of(checkpoint: PathLike) -> Path | None:
    """The run folder of a checkpoint at ``<run>/checkpoints/model_<iter>.pth`` (None otherwise)."""
    checkpoint = Path(checkpoint)
    if checkpoint.parent.name == "checkpoints" and train_ckpt.CHECKPOINT_RE.match(checkpoint.name):
        return checkpoint.parent.parent
    return None


@dataclass(frozen=True)
class RunInfo:
    """What a checkpoint's run folder says about its model (all optional)."""

    stage: str | None = None
    config: Mapping[str, Any] = field(default_factory=dict)
    class_wnids: tuple[str, ...] | None = None

    @property
    def kind(self) -> str | None:
        schema = stage_schemas().get(self.stage or "")
        model_kind = getattr(schema, "model_kind", None)
        return model_kind(self.get("stage", {})) if model_kind is not None else None

    def get(self, dotted: str, default=None):
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return default
            node = node[part]
        return node


def read_run_info(checkpoint: PathLike) -> RunInfo:
    """The manifest (and ``classes.json``) of the checkpoint's run folder, when there is one."""
    from part_distillation.store import read_manifest
    from part_distillation.store.files import manifest_path

    run = run_folder_of(checkpoint)
    if run is None or not manifest_path(run).is_file():
        return RunInfo()
    manifest = read_manifest(run)
    wnids = None
    classes = run / CLASSES_FILE
    if classes.is_file():
        wnids = tuple(json.loads(classes.read_text())["wnids"])
    return RunInfo(stage=manifest.get("stage"), config=manifest.get("config", {}), class_wnids=wnids)


def _training_classes(info: RunInfo) -> tuple[str, ...] | None:
    """The object classes of a stage-6 run: its ``classes.json``, else its image tree (when still there)."""
    if info.class_wnids is not None:
        return info.class_wnids
    root = info.get("data.root")
    if info.kind != "part_distillation" or not root or not Path(root).is_dir():
        return None
    from part_distillation.data.imagenet import list_classes

    try:
        return list_classes(root, split=info.get("data.split"), words_file=info.get("data.words_file")).wnids or None
    except (OSError, ValueError):
        return None


def _recognise_size(state: Mapping[str, torch.Tensor], num_classes: int, source: Path) -> str:
    """The Mask2Former spec whose parameter shapes are those of ``state`` (built on the meta device)."""
    from part_distillation.models.mask2former import SPECS, build_mask2former

    want = {k: tuple(v.shape) for k, v in state.items() if not k.startswith("class_predictor.")}
    for name in SPECS:
        with torch.device("meta"):
            model = build_mask2former(name, num_classes=num_classes, pretrained_backbone=False)
        have = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("class_predictor.")}
        if all(have.get(k) == s for k, s in want.items()) and set(want) >= set(have) - _unused_keys():
            return name
    raise ValueError(f"{source}: its weights match none of the Mask2Former specs {sorted(SPECS)}; "
                     f"pass size=<spec> to TrainedModel.load")


def _unused_keys() -> set[str]:
    from part_distillation.models.checkpoint import UNUSED_MODEL_KEYS

    return set(UNUSED_MODEL_KEYS)


def load_checkpoint_model(checkpoint: PathLike, device: torch.device | str = "cpu", *, kind: str | None = None,
               size: str | None = None, parts_per_class: int | None = None):
    """The Mask2Former of a stage-4/6 checkpoint file, in eval mode on ``device``.

    ``kind``/``size``/``parts_per_class`` override what the run folder says (needed for a
    PartDistillation checkpoint file without its run folder: K). Returns
    ``(model, kind, info)`` with ``info`` the run folder's :class:`RunInfo`.
    """
    from part_distillation.models.checkpoint import build_model
    from part_distillation.models import checkpoint as ckpt

    checkpoint = Path(checkpoint)
    info = read_run_info(checkpoint)
    state = read_model_state(checkpoint)  # read once: recognised, then loaded
    head = state.get("class_predictor.weight")
    if head is None:
        raise ValueError(f"{checkpoint}: no class head (class_predictor.weight): not a Mask2Former checkpoint")
    outputs = int(head.shape[0])
    kind = kind or info.kind or ("proposal" if outputs == 2 else "part_distillation")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    if kind == "part_distillation":
        parts_per_class = parts_per_class or info.get("stage.parts_per_class")
        if not parts_per_class:
            raise ValueError(f"{checkpoint}: a PartDistillation checkpoint without its run folder: pass "
                             f"parts_per_class=K")
        if (outputs - 1) % int(parts_per_class):
            raise ValueError(f"{checkpoint}: class head of {outputs} outputs is not C x {parts_per_class} + 1")
    elif kind == "semantic":
        if outputs < 2:
            raise ValueError(f"{checkpoint}: a semantic part model needs at least 2 class outputs, this one {outputs}")
        parts_per_class = None
    else:
        if outputs != 2:
            raise ValueError(f"{checkpoint}: a proposal model has 2 class outputs (part, no-object), this one "
                             f"{outputs}")
        parts_per_class = None
    size = size or info.get("model.size") or _recognise_size(state, outputs - 1, checkpoint)
    model = build_model(size, None, num_classes=outputs - 1,
                        parts_per_class=parts_per_class)
    ckpt.load_project_state(model, state, str(checkpoint))
    return model.to(resolve_device(device)).eval(), kind, info


# --------------------------------------------------------------------------- the predictor

def eval_max_size(kind: str, image_size: int) -> int | None:
    """The longer-side cap at test time: PartDistillation's reference 1333 for a shortest side of
    640, scaled to ``image_size``; None (the square canvas, longer side ``image_size``) otherwise."""
    return round(image_size * PD_TEST_MAX_SIZE / PD_TEST_SIZE) if kind == "part_distillation" else None


@dataclass
class TrainedModel:
    """A stage-4 (``proposal``) or stage-6 (``part_distillation``) Mask2Former as a part predictor.

    ``model``: the network (any device; also a model in training, which :meth:`predict`
    runs in eval mode and leaves as it was); ``image_size``: the size images are fitted to;
    ``class_wnids``: stage 6's object classes in head order (None: unknown, pass
    class indices); ``topk``/``one_label``: inference settings (docs/method.md#inference: 200, True);
    ``max_size``: see the field.
    """

    model: torch.nn.Module
    kind: str
    image_size: int = 640
    #: test-time resolution (docs/evaluation.md#resolution): shortest side ``image_size``, longer side
    #: capped at ``max_size``; None: the longer side fitted to ``image_size`` (proposal models:
    #: no canvas, zero-padded to a multiple of 32; semantic baselines: the grey square canvas).
    #: :meth:`load` sets it for PartDistillation.
    max_size: int | None = None
    class_wnids: tuple[str, ...] | None = None
    checkpoint: Path | None = None
    topk: int = 200
    one_label: bool = True

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {self.kind!r}")
        conditioned = getattr(self.model, "parts_per_class", None) is not None
        if conditioned != (self.kind == "part_distillation"):
            raise ValueError(f"a {self.kind} model needs {'an' if not conditioned else 'no'} object-conditioned head")

    # -- construction -----------------------------------------------------------------
    @classmethod
    def load(cls, path: PathLike, iteration: int | None = None, device: torch.device | str = "cpu", *,
             kind: str | None = None, size: str | None = None, parts_per_class: int | None = None,
             image_size: int | None = None, **settings) -> "TrainedModel":
        """From a checkpoint file or a stage-4/6 run folder (newest checkpoint, or ``iteration``).

        ``kind``, ``size``, ``parts_per_class`` and ``image_size`` override the run folder
        (a bare checkpoint file without one needs ``parts_per_class`` for stage 6 and
        gets ``image_size`` 640 unless given); ``settings``: ``topk``, ``one_label``.
        """
        checkpoint = resolve_checkpoint(path, iteration)
        model, kind, info = load_checkpoint_model(checkpoint, device, kind=kind, size=size, parts_per_class=parts_per_class)
        image_size = int(image_size or info.get("stage.image_size") or 640)
        settings.setdefault("max_size", eval_max_size(kind, image_size))
        wnids = _training_classes(info) if kind == "part_distillation" else None
        if wnids is not None and len(wnids) * model.parts_per_class != model.num_classes:
            wnids = None  # the image tree changed since training: classes by index only
        return cls(model=model, kind=kind, image_size=image_size, class_wnids=wnids, checkpoint=checkpoint,
                   **settings)

    # -- properties -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def parts_per_class(self) -> int | None:
        """K of a PartDistillation model (None for proposals)."""
        return getattr(self.model, "parts_per_class", None)

    @property
    def num_object_classes(self) -> int | None:
        k = self.parts_per_class
        return None if k is None else self.model.num_classes // k

    def class_index(self, wnid: str | None) -> int | None:
        """The training class index of an ImageNet synset (None: not a class of this model)."""
        if self.class_wnids is None or wnid is None:
            return None
        try:
            return self.class_wnids.index(wnid)
        except ValueError:
            return None

    # -- prediction -------------------------------------------------------------------
    def predict(self, image: np.ndarray, object_mask: np.ndarray | None = None,
                object_class: int | None = None, *, with_overlapping: bool = False,
                to_original: bool = True) -> Prediction:
        """Parts of one image: ``image`` (H, W, 3) uint8 RGB, ``object_mask`` (H, W) bool or
        None (no restriction), ``object_class`` the training class index (stage 6 only).

        Returns masks (N, H, W) bool at the image's size, scores (N,) and clusters (N,)
        int64: for proposals their rank 0..N-1 (each image its own numbering), for
        PartDistillation the part class within the object class (0..K-1), for a semantic
        baseline the part class of its dataset (the head's index). ``with_overlapping``: a
        proposal model with ``one_label`` also gives the same forward pass's proposals
        without one label per pixel (``Prediction.overlapping``, the published AR setting).
        ``to_original=False``: masks (both sets) at the frame's fitted size (:meth:`frame`, the
        test resolution) instead.
        """
        return self.predict_batch([image], [object_mask], [object_class], with_overlapping=with_overlapping,
                                  to_original=to_original)[0]

    def frame(self, shape: tuple[int, int]) -> ImageFrame:
        """The frame an image of ``shape`` = (h, w) is seen in (see ``max_size``): proposals
        the fitted image without a canvas (batching pads it to a multiple of 32 with 0 after
        normalisation, as the reference's stage-4 test), a semantic baseline the grey square."""
        if self.max_size is None:
            canvas = None if self.kind == "proposal" else self.image_size
            return ImageFrame.fit(shape, size=self.image_size, canvas=canvas)
        h, w = int(shape[0]), int(shape[1])
        scale = min(self.image_size / min(h, w), self.max_size / max(h, w))
        return ImageFrame(tuple(shape), (max(1, round(h * scale)), max(1, round(w * scale))), None)

    @torch.no_grad()
    def predict_batch(self, images: Sequence[np.ndarray], object_masks: Sequence[np.ndarray | None] | None = None,
                      object_classes: Sequence[int | None] | None = None, *,
                      with_overlapping: bool = False, to_original: bool = True) -> list[Prediction]:
        """:meth:`predict` for several images, one forward pass per frame size (any sizes): images
        of different sizes are never padded together, so a batch gives what single images give."""
        from part_distillation.models.mask2former import preprocess_images

        n = len(images)
        object_masks = list(object_masks) if object_masks is not None else [None] * n
        object_classes = list(object_classes) if object_classes is not None else [None] * n
        if not n:
            return []
        if len(object_masks) != n or len(object_classes) != n:
            raise ValueError(f"{n} images but {len(object_masks)} object masks and {len(object_classes)} classes")
        frames, canvases = [], []
        for image in images:
            image = np.asarray(image)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
            frames.append(frame := self.frame(image.shape[:2]))
            canvases.append(frame.pad_image(frame.fit_image(image)))
        device = self.device
        kwargs = {}
        if self.kind == "part_distillation":
            if any(c is None for c in object_classes):
                raise ValueError("a PartDistillation model needs the object class of every image (object_class=)")
            classes = [int(c) for c in object_classes]
            limit = self.num_object_classes
            bad = [c for c in classes if not 0 <= c < limit]
            if bad:
                raise ValueError(f"object class {bad[0]} is outside the model's {limit} classes")
            kwargs["object_class"] = torch.tensor(classes, dtype=torch.long, device=device)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, canvas in enumerate(canvases):
            groups.setdefault(canvas.shape[:2], []).append(i)
        results: list[Prediction | None] = [None] * n
        was_training = self.model.training
        self.model.eval()
        try:
            for members in groups.values():
                batch = preprocess_images([canvases[i] for i in members], device=device)
                out = self.model(batch.pixel_values, **{k: v[members] for k, v in kwargs.items()})
                for j, i in enumerate(members):
                    results[i] = self._postprocess(out["pred_logits"][j], out["pred_masks"][j], frames[i],
                                                   object_masks[i], batch.padded_size, with_overlapping,
                                                   to_original)
        finally:
            self.model.train(was_training)
        return results

    def _postprocess(self, logits: torch.Tensor, mask_logits: torch.Tensor, frame: ImageFrame,
                     object_mask: np.ndarray | None, padded_size: tuple[int, int],
                     with_overlapping: bool = False, to_original: bool = True) -> Prediction:
        from part_distillation import postprocess

        obj = None
        if object_mask is not None:
            object_mask = np.asarray(object_mask, dtype=bool)
            if object_mask.shape != frame.original:
                raise ValueError(f"object mask of size {object_mask.shape} for an image of size {frame.original}")
            obj = torch.from_numpy(frame.masks_to_fitted(object_mask[None])[0]).to(mask_logits.device)
        sizes = dict(padded_size=padded_size, image_size=frame.fitted, object_mask=obj, topk=self.topk)
        overlapping = None
        if self.kind == "proposal":
            setting = "one-label" if self.one_label else "overlapping"
            settings = (setting, "overlapping") if with_overlapping and self.one_label else (setting,)
            sets = postprocess.proposal_inference_settings(logits, mask_logits, **sizes, settings=settings)
            found = sets[setting]
            clusters = np.arange(len(found), dtype=np.int64)
            if len(sets) > 1:
                overlapping = self._to_original(sets["overlapping"], frame, to_original)
        else:
            found = postprocess.part_inference(postprocess.class_probabilities(logits), mask_logits, **sizes,
                                               one_label=self.one_label, restrict="before", merge_classes=True,
                                               min_area_ratio=None, min_score=None)
            clusters = found.classes.cpu().numpy().astype(np.int64)
        prediction = self._to_original(found, frame, to_original)
        return Prediction(masks=prediction.masks, scores=prediction.scores, clusters=clusters,
                          overlapping=overlapping)

    @staticmethod
    def _to_original(found, frame: ImageFrame, to_original: bool = True) -> Prediction:
        """Instances of the fitted frame as masks and scores: masks at the original size, or at
        the fitted size (the test resolution) when not ``to_original``."""
        masks = found.masks.cpu().numpy()
        size = frame.original if to_original else frame.fitted
        masks = frame.masks_to_original(masks) if to_original else frame.crop_to_fitted(masks)
        return Prediction(masks=masks.reshape(len(found), *size),
                          scores=found.scores.float().cpu().numpy().astype(np.float64))


__all__ = ["CLASSES_FILE", "KINDS", "RunInfo", "TrainedModel", "load_checkpoint_model",
           "read_run_info", "resolve_checkpoint", "run_folder_of", "eval_max_size"]
