"""Drawing records to look at them: coloured parts, object outlines, labels, collages (OpenCV);
and the training curves of the report (matplotlib).

Any stage's record is drawn by its schema fields, in its fitted frame (masks are
stored there; the image is re-read from ``path`` and fitted with the record's frame):

- stage 1 (``OBJECT_MASKS``): ``masks``, each object coloured, the first (highest
  score) outlined;
- stages 2/3 (``PART_SEGMENTS``): ``part_masks`` coloured by ``part_ids``, the
  ``object_mask`` outlined;
- stage 5 (``PART_LABELS``): ``part_masks`` coloured by ``cluster_ids``.

Images are RGB uint8 (H, W, 3) everywhere; only :func:`write_png` converts to OpenCV's BGR.
"""
from __future__ import annotations

import colorsys
import itertools
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

import cv2
import numpy as np

from part_distillation.data.frame import ImageFrame
from part_distillation.data.images import load_rgb
from part_distillation.masks import decode_rle, decode_rles

#: Part colour of id i: evenly spaced saturated hues, interleaved so neighbours differ.
_HUES = [(i * 0.382) % 1.0 for i in range(64)]
PALETTE = np.array([[round(255 * c) for c in colorsys.hsv_to_rgb(h, 0.9, 1.0)] for h in _HUES], dtype=np.uint8)
OUTLINE_COLOUR = (255, 255, 255)
ALPHA = 0.5


def part_colour(part_id: int) -> np.ndarray:
    """RGB uint8 (3,) colour of a part id (stable across images and stages)."""
    return PALETTE[int(part_id) % len(PALETTE)]


def blend_masks(image: np.ndarray, masks: np.ndarray, ids: Sequence[int], alpha: float = ALPHA) -> np.ndarray:
    """``image`` with each mask (bool (N, H, W)) blended with its id's colour: a copy, uint8 (H, W, 3)."""
    out = image.astype(np.float32)
    for mask, part_id in zip(masks, ids):
        out[mask] = (1 - alpha) * out[mask] + alpha * part_colour(part_id).astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def draw_outline(image: np.ndarray, mask: np.ndarray, colour=OUTLINE_COLOUR, thickness: int = 1) -> np.ndarray:
    """Draw the outer contours of a bool (H, W) mask onto ``image`` (in place); returns it."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(image, contours, -1, tuple(int(c) for c in colour), thickness)
    return image


def _stroke(image: np.ndarray) -> float:
    """Line/text size factor: 1 for a 192-pixel image, so drawings stay visible once tiled."""
    return max(1.0, max(image.shape[:2]) / 192)


def draw_labels(image: np.ndarray, masks: np.ndarray, ids: Sequence[int], scale: float | None = None,
                texts: Sequence[str] | None = None) -> np.ndarray:
    """Write each part's label (``texts``, else its id) at its most interior pixel (in place); returns ``image``."""
    scale = 0.35 * _stroke(image) if scale is None else scale
    thick = max(1, round(scale / 0.35))
    texts = [str(int(i)) for i in ids] if texts is None else [str(t) for t in texts]
    for mask, text in zip(masks, texts):
        if not mask.any() or not text:
            continue
        dist = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 3)[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
        (w, h), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        org = (int(x) - w // 2, int(y) + h // 2)
        cv2.putText(image, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick + 1, cv2.LINE_AA)
        cv2.putText(image, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick, cv2.LINE_AA)
    return image


def draw_parts(image: np.ndarray, masks: np.ndarray, ids: Sequence[int], object_mask: np.ndarray | None = None,
               labels: bool = True, alpha: float = ALPHA, texts: Sequence[str] | None = None) -> np.ndarray:
    """Parts coloured by id and blended (in order: the last is on top), the object outlined,
    labels written (``texts``, else the ids): a new uint8 (H, W, 3) image."""
    out = blend_masks(image, masks, ids, alpha)
    if object_mask is not None:
        draw_outline(out, object_mask, thickness=round(_stroke(out)))
    if labels:
        draw_labels(out, masks, ids, texts=texts)
    return out


def score_overlay(image: np.ndarray, masks: np.ndarray, scores: Sequence[float], max_masks: int = 8,
                  alpha: float = ALPHA) -> np.ndarray:
    """The ``max_masks`` best-scoring masks (bool (N, H, W)) blended over ``image`` (uint8
    (H, W, 3)), coloured by rank (1 = best) with the best on top, no labels: a training preview."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:max_masks]
    ranks = np.arange(1, len(order) + 1)
    return blend_masks(image, np.asarray(masks, bool)[order[::-1]], ranks[::-1].tolist(), alpha)


def record_layers(record: dict) -> tuple[np.ndarray, list[int], np.ndarray | None]:
    """(masks bool (N, H, W), ids, object mask or None) of any stage's record, by its fields."""
    size = tuple(record["fitted_size"]) if "fitted_size" in record else None
    if "part_masks" in record:
        masks = decode_rles(record["part_masks"], size=size)
        id_field = "part_ids" if "part_ids" in record else "cluster_ids" if "cluster_ids" in record else None
        ids = [int(i) for i in record[id_field]] if id_field else list(range(1, len(masks) + 1))
        obj = decode_rle(record["object_mask"]) if record.get("object_mask") is not None else None
        return masks, ids, obj
    if "masks" in record:
        masks = decode_rles(record["masks"], size=size)
        return masks, list(range(1, len(masks) + 1)), (masks[0] if len(masks) else None)
    raise ValueError(f"record {record.get('key', '?')!r} has neither part_masks nor masks: nothing to draw")


def draw_record(record: dict, image: np.ndarray | None = None, labels: bool = True) -> np.ndarray:
    """One record drawn on its fitted image (read from ``record['path']`` unless given)."""
    if image is None:
        image = load_rgb(record["path"])
        if "fitted_size" in record:
            image = ImageFrame.from_record(record).fit_image(image)
    masks, ids, obj = record_layers(record)
    if masks.shape[1:] != image.shape[:2]:
        raise ValueError(f"record {record.get('key', '?')!r}: masks are {list(masks.shape[1:])}, "
                         f"the image {list(image.shape[:2])}: not the record's frame")
    return draw_parts(image, masks, ids, obj, labels=labels)


def fit_cell(image: np.ndarray, cell: int) -> np.ndarray:
    """``image`` scaled to fit a ``cell`` x ``cell`` square, centred on black."""
    h, w = image.shape[:2]
    scale = cell / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST)
    out = np.zeros((cell, cell, 3), np.uint8)
    y, x = (cell - nh) // 2, (cell - nw) // 2
    out[y:y + nh, x:x + nw] = resized
    return out


def grid(rows: Sequence[Sequence[np.ndarray]], row_titles: Sequence[str], cell: int = 192,
         title_width: int = 140, columns: int | None = None) -> np.ndarray:
    """Cells in rows (each image fitted to ``cell``), a title left of each row (lines split on
    ``\\n``): uint8 (H, W, 3). ``columns`` fixes the width (else the longest row's)."""
    columns = max((len(r) for r in rows), default=0) if columns is None else columns
    canvas = np.full((max(1, len(rows)) * (cell + 4), title_width + columns * (cell + 4), 3), 32, np.uint8)
    for r, (cells, title) in enumerate(zip(rows, row_titles)):
        y = r * (cell + 4) + 2
        lines = str(title).split("\n")
        for i, line in enumerate(lines):
            baseline = y + cell // 2 + round((i - (len(lines) - 1) / 2) * 18)
            cv2.putText(canvas, line[:18], (4, baseline), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1,
                        cv2.LINE_AA)
        for c, image in enumerate(cells[:columns]):
            x = title_width + c * (cell + 4) + 2
            canvas[y:y + cell, x:x + cell] = fit_cell(image, cell)
    return canvas


def class_collage(records: Iterable[dict], per_class: int = 4, classes: int = 8, cell: int = 192) -> np.ndarray:
    """The ``per_class`` first records by key of each of the first ``classes`` classes (by class
    index), one row per class: the same images whichever stage or sharding wrote them."""
    by_class: dict[int, list[dict]] = defaultdict(list)
    names: dict[int, str] = {}
    for record in records:
        c = int(record.get("class_index", -1))
        names[c] = str(record.get("class_name", record.get("wnid", c)))
        kept = by_class[c]
        kept.append(record)
        if len(kept) > per_class:
            kept.sort(key=lambda r: r["key"])
            kept.pop()
    chosen = sorted(by_class)[:classes]
    rows = [[draw_record(r) for r in sorted(by_class[c], key=lambda r: r["key"])] for c in chosen]
    return grid(rows, [names[c] for c in chosen], cell)


class CollageSample(NamedTuple):
    """One evaluated object for :func:`evaluation_collage`, every array at the image's size."""

    image: np.ndarray                      #: uint8 (H, W, 3) RGB
    pred_masks: np.ndarray                 #: bool (N, H, W) predicted part masks
    pred_ids: Sequence[int]                #: (N,) colour and label of each (e.g. the GT part its cluster maps to)
    gt_masks: np.ndarray                   #: bool (P, H, W) ground-truth part masks
    gt_ids: Sequence[int]                  #: (P,) ground-truth part class ids
    object_mask: np.ndarray | None = None  #: bool (H, W), outlined in both cells when given


def collage_sample(image: np.ndarray, sample, prediction, cluster_to_part: Sequence[int] | None = None
                   ) -> CollageSample:
    """A :class:`CollageSample` from an evaluation sample (``data.part_sample.PartSample``:
    ``part_masks``, ``part_ids``, ``object_mask``) and its ``evaluation.evaluator.Prediction``
    (``masks``, ``clusters``). Predicted masks take the id of the ground-truth part their
    cluster maps to (``cluster_to_part[cluster]``, so matching parts share a colour), else
    ``cluster + 1``; proposals without clusters are numbered by rank from 1."""
    masks = np.asarray(prediction.masks, bool)
    clusters = getattr(prediction, "clusters", None)
    if clusters is None:
        ids = list(range(1, len(masks) + 1))
    elif cluster_to_part is not None:
        ids = [int(cluster_to_part[int(c)]) for c in clusters]
    else:
        ids = [int(c) + 1 for c in clusters]
    return CollageSample(np.asarray(image), masks, ids, np.asarray(sample.part_masks, bool),
                         [int(i) for i in sample.part_ids], np.asarray(sample.object_mask, bool))


def best_and_worst(per_class_miou: Mapping[str, float], n: int) -> list[tuple[str, float]]:
    """The ``n`` best and ``n`` worst classes by mIoU, best first, each class once (all of them
    when there are at most ``2n``); classes without a value (None or NaN) are left out; ties by name."""
    ranked = sorted(((str(c), float(v)) for c, v in per_class_miou.items()
                     if v is not None and not math.isnan(float(v))), key=lambda cv: (-cv[1], cv[0]))
    return ranked if len(ranked) <= 2 * n else ranked[:n] + ranked[-n:]


def evaluation_collage(per_class_miou: Mapping[str, float],
                       samples_of: Callable[[str], Iterable[CollageSample | tuple]],
                       n: int = 4, per_class: int = 2, cell: int = 192) -> np.ndarray:
    """The ``n`` best and ``n`` worst classes of an evaluation, one row each, best first.

    ``per_class_miou``: object class name -> mIoU (e.g. ``metrics.json``'s
    ``<protocol>.per_class_mIoU``). ``samples_of(name)``: that class's evaluated objects as
    :class:`CollageSample` (or tuples in its field order); only the first ``per_class`` are
    drawn, so it may be a lazy generator. Each row: the title ``<name>`` / ``mIoU <value>``,
    then per sample the prediction overlay next to the ground-truth overlay. Every row has
    ``2 * per_class`` cells (missing samples left dark): the image is
    ``rows * (cell + 4)`` x ``140 + 2 * per_class * (cell + 4)``, uint8 RGB.
    """
    rows, titles = [], []
    for name, miou in best_and_worst(per_class_miou, n):
        cells = []
        for sample in itertools.islice(samples_of(name), per_class):
            s = sample if isinstance(sample, CollageSample) else CollageSample(*sample)
            cells.append(draw_parts(s.image, np.asarray(s.pred_masks, bool), list(s.pred_ids), s.object_mask))
            cells.append(draw_parts(s.image, np.asarray(s.gt_masks, bool), list(s.gt_ids), s.object_mask))
        rows.append(cells)
        titles.append(f"{name}\nmIoU {miou:.1f}")
    return grid(rows, titles, cell, columns=2 * per_class)


def read_per_class_miou(metrics: Mapping | str | Path, protocol: str = "reference") -> dict[str, float]:
    """``per_class_mIoU`` of one protocol from the evaluate stage's ``metrics.json`` (a path or its dict)."""
    if not isinstance(metrics, Mapping):
        metrics = json.loads(Path(metrics).read_text(encoding="utf-8"))
    if protocol not in metrics:
        protocols = sorted(k for k, v in metrics.items() if isinstance(v, Mapping))
        raise KeyError(f"metrics have no protocol {protocol!r}; they have {protocols}")
    return {str(c): v for c, v in (metrics[protocol].get("per_class_mIoU") or {}).items()}


def write_png(path: str | Path, image: np.ndarray) -> Path:
    """Write an RGB uint8 image as PNG (folders made); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
    return path


def plot_curves(series: Mapping[str, Sequence[tuple[int, float]]], title: str,
                ylabel: str = "score (%)") -> bytes:
    """A line chart as PNG bytes: one line per ``label -> [(iteration, value), ...]`` (matplotlib's
    object API, so no display and no global backend state are involved)."""
    import io

    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 3.6), dpi=100)
    axes = figure.subplots()
    for label, points in series.items():
        if points:
            axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    axes.set_xlabel("iteration")
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    if any(series.values()):
        axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def write_curves(path: str | Path, series: Mapping[str, Sequence[tuple[int, float]]], title: str,
                 ylabel: str = "score (%)") -> Path:
    """:func:`plot_curves` written atomically to ``path`` (folders made); returns the path."""
    from part_distillation.store.files import atomic_write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, plot_curves(series, title, ylabel))
    return path
