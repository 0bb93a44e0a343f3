"""Record schemas: each stage's record fields declared once (name, kind, meaning).

The writer checks every record against its output's schema (``ShardWriter(schema=...)``),
so a stage cannot silently write a field under another name (the reference's
``part_mask`` vs ``part_masks``); the next stage, ``export_coco`` and the docs read the
same declaration. Masks are COCO RLEs in the frame the record names
(``original_size``/``fitted_size``, see ``data/frame.py``).

Kinds: ``str int float bool list dict rle rles array size`` (``size`` = [h, w] of ints;
``array`` = numpy array; ``float`` accepts ints; ``rles`` = list of RLE dicts).
A field may be optional (absent or None). Extra fields not declared are refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np


class SchemaError(ValueError):
    """A record does not match its output's declared schema; the message names the field."""


def _is_rle(v: Any) -> bool:
    return isinstance(v, Mapping) and "size" in v and "counts" in v


_KINDS = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, (bool, np.bool_)),
    "list": lambda v: isinstance(v, (list, tuple)),
    "dict": lambda v: isinstance(v, Mapping),
    "rle": _is_rle,
    "rles": lambda v: isinstance(v, (list, tuple)) and all(_is_rle(r) for r in v),
    "array": lambda v: isinstance(v, np.ndarray),
    "size": lambda v: isinstance(v, (list, tuple)) and len(v) == 2
    and all(isinstance(x, (int, np.integer)) and x > 0 for x in v),
}


@dataclass(frozen=True)
class Field:
    name: str
    kind: str
    meaning: str
    optional: bool = False

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"field {self.name!r}: unknown kind {self.kind!r}; expected one of {sorted(_KINDS)}")


@dataclass(frozen=True)
class RecordSchema:
    """The fields of one kind of record (besides ``key``)."""

    name: str
    fields: tuple[Field, ...]
    #: which fields hold the record's masks, their labels and scores (COCO export, drawing)
    masks_field: str | None = None
    label_field: str | None = None
    score_field: str | None = None

    def __post_init__(self):
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names) or "key" in names:
            raise ValueError(f"schema {self.name!r}: duplicate field names or a 'key' field: {names}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"schema {self.name!r} has no field {name!r}")

    def check(self, record: Mapping[str, Any]) -> None:
        """Raise :class:`SchemaError` naming the first missing, mistyped or undeclared field."""
        key = record.get("key", "?")
        for f in self.fields:
            value = record.get(f.name)
            if value is None:
                if f.optional:
                    continue
                raise SchemaError(f"{self.name} record {key!r}: field {f.name!r} ({f.meaning}) is missing")
            if not _KINDS[f.kind](value):
                raise SchemaError(f"{self.name} record {key!r}: field {f.name!r} should be {f.kind}, "
                                  f"got {type(value).__name__}")
        extra = sorted(set(record) - set(self.names) - {"key"})
        if extra:
            raise SchemaError(f"{self.name} record {key!r}: fields {extra} are not in the schema "
                              f"(declare them in part_distillation/store/schemas.py)")

    def describe(self) -> str:
        """A Markdown table of the fields, for the docs."""
        rows = [f"| `{f.name}` | {f.kind}{'?' if f.optional else ''} | {f.meaning} |" for f in self.fields]
        return "\n".join([f"**{self.name}**", "", "| field | kind | meaning |", "|---|---|---|", *rows])


# ---------------------------------------------------------------------------------
# The stages' records. Masks are in the fitted frame unless a field says otherwise.
# ---------------------------------------------------------------------------------

_IMAGE = (
    Field("path", "str", "image file, as listed by the index"),
    Field("wnid", "str", "WordNet id of the image's class folder"),
    Field("class_index", "int", "the one global class index (words-file order, restricted to the dataset)"),
    Field("class_name", "str", "the class's words-file entry"),
)
_FRAME = (
    Field("original_size", "size", "[h, w] of the decoded image"),
    Field("fitted_size", "size", "[h, w] after fit-to-640: the frame of every mask in the record"),
)

#: Stage ``index``: one per image file of the tree.
INDEX = RecordSchema("index", _IMAGE + (
    Field("height", "int", "decoded height (0 when the file does not decode)"),
    Field("width", "int", "decoded width (0 when the file does not decode)"),
    Field("ok", "bool", "whether the file decodes"),
    Field("reason", "str", "why not, when ok is false"),
    Field("file_size", "int", "file size in bytes when indexed (a rerun notices a changed file)", optional=True),
    Field("mtime", "float", "file modification time (s since epoch) when indexed", optional=True),
))

#: Stage 1 ``detic_labeling`` (every object-mask source writes the same record).
OBJECT_MASKS = RecordSchema("object_masks", _IMAGE + _FRAME + (
    Field("source", "str", "mask source: detic | annotations | mask2former | grabcut"),
    Field("masks", "rles", "object masks, by descending score (fitted frame)"),
    Field("boxes", "array", "(N, 4) float XYXY boxes (fitted frame)"),
    Field("scores", "array", "(N,) float detection scores"),
    Field("pred_classes", "array", "(N,) int predicted class ids (global class index; -1 if none)"),
    Field("pred_class_names", "list", "N predicted class names"),
), masks_field="masks", label_field="pred_classes", score_field="scores")

#: Stages 2 ``pixel_grouping`` and 3 ``dense_crf``: class-agnostic part segments of one object.
PART_SEGMENTS = RecordSchema("part_segments", _IMAGE + _FRAME + (
    Field("object_mask", "rle", "the object the parts belong to (fitted frame)"),
    Field("object_score", "float", "its stage-1 score"),
    Field("object_ratio", "float", "object area / fitted image area"),
    Field("part_masks", "rles", "part segments (fitted frame), one per part id"),
    Field("part_ids", "array", "(P,) int part ids 1..K (0 is background), kept across stages"),
), masks_field="part_masks", label_field="part_ids")

#: Stage 5 ``part_ranking``: parts labelled with their object class's global part classes.
PART_LABELS = RecordSchema("part_labels", _IMAGE + _FRAME + (
    Field("object_mask", "rle", "object mask = union of the pseudo part masks (fitted frame)"),
    Field("object_ratio", "float", "union of the kept part masks / square canvas area (max fitted side)²"),
    Field("part_masks", "rles", "part masks, one per cluster (fitted frame)"),
    Field("cluster_ids", "array", "(P,) int part class within the object class, 0..K-1"),
    Field("scores", "array", "(P,) float scores"),
    Field("part_ratios", "array", "(P,) float part area / square canvas area (max fitted side)²"),
), masks_field="part_masks", label_field="cluster_ids", score_field="scores")

#: Stage ``evaluate``: one image's evaluation state (see ``evaluation/evaluator.py``).
EVAL_STATES = RecordSchema("eval_states", (
    Field("split", "str", "which split the image belongs to: the evaluation or the matching split"),
    Field("object_class", "str", "the object class keying the mIoU (PartImageNet: the image's wnid); absent "
          "in an image's AR state", optional=True),
    Field("supercategory", "str", "its coarser group (PartImageNet's super-category), for keying by it",
          optional=True),
    Field("ar_strict", "dict", "per AR setting (overlapping, one-label), matched IoU per ground-truth part for "
          "each k and part areas, over the whole image (no filter); absent in an object state of an image "
          "with several objects", optional=True),
    Field("ar_reference", "dict", "the same after the reference's ground-truth IoU filter", optional=True),
    Field("confusion_strict", "array", "clusters x parts confusion counts (background last)", optional=True),
    Field("confusion_reference", "array", "the same after the reference's segment filter", optional=True),
    Field("skip", "str", "why the predictor predicted nothing for the sample (scored as finding nothing)",
          optional=True),
    Field("best_iou", "float", "mean over the object's true parts of the best IoU with a predicted segment (a "
          "mask with a cluster); absent in an image's AR state", optional=True),
))

#: Stage ``predict``: a trained model's parts of one image of any folder (masks at the image's size).
PART_PREDICTIONS = RecordSchema("part_predictions", (
    Field("path", "str", "the image file"),
    Field("height", "int", "decoded image height: the frame of every mask in the record"),
    Field("width", "int", "decoded image width"),
    Field("mask_source", "str", "where the object masks came from: whole_image | grabcut | annotations | detic"),
    Field("model_kind", "str", "proposal (stage 4) or part_distillation (stage 6)"),
    Field("object_masks", "rles", "the objects whose parts were predicted (empty for whole_image)"),
    Field("object_classes", "array", "(O,) int object class index of each object (-1: none)"),
    Field("part_masks", "rles", "predicted part masks, by descending score"),
    Field("scores", "array", "(P,) float part scores"),
    Field("clusters", "array", "(P,) int part cluster within the object class (-1 for proposals)"),
    Field("part_classes", "array", "(P,) int part class: the COCO category id (1 for proposals)"),
    Field("part_class_names", "list", "P part class names (COCO category names)"),
), masks_field="part_masks", label_field="part_classes", score_field="scores")

#: The record schema of each stage's output (by the stage name its manifest records).
STAGE_RECORDS: dict[str, RecordSchema] = {
    "index": INDEX, "detic_labeling": OBJECT_MASKS, "pixel_grouping": PART_SEGMENTS, "dense_crf": PART_SEGMENTS,
    "part_ranking": PART_LABELS, "evaluate": EVAL_STATES, "predict": PART_PREDICTIONS,
}

SCHEMAS: dict[str, RecordSchema] = {s.name: s for s in (INDEX, OBJECT_MASKS, PART_SEGMENTS, PART_LABELS,
                                                        EVAL_STATES, PART_PREDICTIONS)}
