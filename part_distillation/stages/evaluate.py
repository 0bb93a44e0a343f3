"""Stage ``evaluate``: score a stage's part records against a part dataset, both protocols.

Predictions are the records of a stage output (``stage.input``): pixel grouping or dense
CRF (``part_segments``: clusters are ``part_ids - 1``, each image's own numbering) or part
ranking (``part_labels``: ``cluster_ids``, consistent within an object class). Records
are matched to dataset images by image path; an image without a record counts as a
model that found nothing. Masks are mapped from the records' fitted frame to the
image's original size, where the ground truth lives.

Sharded like every stage: each job writes one evaluation state per image of its slice
(``eval_states`` records, resumable), and whichever job finds every shard closed merges
them (a pure function of the states) into ``metrics.json``, ``metrics.md`` and
``per_class.csv`` in the output folder.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from pathlib import Path

import numpy as np

from part_distillation.config import RunConfig
from part_distillation.data.frame import ImageFrame
from part_distillation.data.part_datasets import open_part_dataset
from part_distillation.data.part_sample import PartSample
from part_distillation.evaluation.evaluator import PROTOCOLS, PartEvaluator, Prediction, metrics
from part_distillation.masks import decode_rles
from part_distillation.progress import StageSummary, progress
from part_distillation.stages.common import open_output
from part_distillation.store import RecordStore
from part_distillation.store.schemas import EVAL_STATES

log = logging.getLogger("part_distillation")


def prediction_from_record(record: dict, sample: PartSample) -> Prediction:
    """A stage record's part masks at the sample's original size, with their clusters."""
    frame = ImageFrame.from_record(record)
    if tuple(frame.original) != tuple(sample.object_mask.shape):
        raise ValueError(f"record {record['key']!r} is of an image of size {frame.original}, but the dataset's "
                         f"{sample.path} is {tuple(sample.object_mask.shape)}")
    masks = frame.masks_to_original(decode_rles(record["part_masks"], size=frame.fitted))
    if "cluster_ids" in record:
        clusters, scores = np.asarray(record["cluster_ids"]), np.asarray(record["scores"], dtype=np.float64)
    else:
        clusters, scores = np.asarray(record["part_ids"]) - 1, np.ones(len(masks))
    return Prediction(masks=masks, scores=scores, clusters=clusters.astype(np.int64))


def _records_by_path(path: str) -> dict[str, dict]:
    return {os.path.realpath(r["path"]): r for r in RecordStore(path).iter_records()}


def run(cfg: RunConfig, context) -> StageSummary:
    st = cfg.stage
    summary = StageSummary(st.name, output=st.output)
    records = _records_by_path(st.input)
    splits = [st.split] + ([st.match_split] if st.match_split else [])
    datasets = {s: open_part_dataset(st.dataset, st.dataset_root, s, st.image_root, st.annotations_root)
                for s in splits}
    num_parts = max(d.num_parts for d in datasets.values())
    evaluator = PartEvaluator(num_parts=num_parts, num_clusters=st.num_clusters, top_k=tuple(st.top_k))
    with open_output(cfg, EVAL_STATES) as out:
        for split, dataset in datasets.items():
            for i, sample in enumerate(progress(dataset.samples(), None, f"evaluate {split}", st.progress_every)):
                if i % cfg.shard.count != cfg.shard.index:
                    continue
                summary.seen += 1
                key = f"{split}/{sample.key}"
                if out.has(key):
                    summary.already_done += 1
                    continue
                record = records.get(os.path.realpath(sample.path))
                if record is None:
                    summary.skip("no_prediction")
                    prediction = Prediction(masks=np.zeros((0, *sample.object_mask.shape), bool),
                                            scores=np.zeros(0), clusters=np.zeros(0, np.int64))
                else:
                    prediction = prediction_from_record(record, sample)
                state = evaluator.process(sample, prediction)
                out.write({**state, "key": key, "split": split})
                summary.written += 1
    store = RecordStore(st.output)
    if not store.summary()["shards_missing_summary"]:
        result = merge_and_write(store, Path(st.output), st.split, st.match_split, tuple(st.top_k), st.mapping,
                                 datasets[st.split].part_names)
        summary.extra["metrics"] = {p: {k: v for k, v in result[p].items() if not isinstance(v, dict)}
                                    for p in PROTOCOLS}
        summary.extra["metrics_file"] = str(Path(st.output) / "metrics.json")
        log.info("[evaluate] %s, %d images of split %s%s:\n%s", st.dataset, result["images"], st.split,
                 f" (strict protocol matched on {st.match_split})" if st.match_split else
                 " (no disjoint matching split: strict mIoU not computed)",
                 markdown_table(result, tuple(st.top_k)))
    return summary.finish()


def merge_and_write(store: RecordStore, folder: Path, split: str, match_split: str | None, top_k: tuple[int, ...],
                    mapping: str, part_names: list[str]) -> dict:
    """Metrics of every state in ``store``, written as JSON, Markdown and a per-class CSV."""
    states = list(store.iter_records())
    evaluation = [s for s in states if s["split"] == split]
    matching = [s for s in states if s["split"] == match_split] if match_split else None
    result = metrics(evaluation, matching, top_k=top_k, mapping=mapping)
    result["images"] = len(evaluation)
    result["split"], result["match_split"] = split, match_split
    _write_atomic(folder / "metrics.json", json.dumps(result, indent=2, default=_json_default))
    _write_atomic(folder / "metrics.md", markdown_table(result, top_k))
    _write_atomic(folder / "per_class.csv", per_class_csv(result))
    return result


def markdown_table(result: dict, top_k: tuple[int, ...]) -> str:
    columns = [f"AR@{k}" for k in top_k] + ["C-mIoU", "A-mIoU"]
    lines = ["| protocol | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for protocol in PROTOCOLS:
        row = result[protocol]
        lines.append(f"| {protocol} | " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def per_class_csv(result: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["object_class", *[f"mIoU_{p}" for p in PROTOCOLS]])
    classes = sorted(set().union(*(result[p].get("per_class_mIoU", {}).keys() for p in PROTOCOLS)))
    for c in classes:
        writer.writerow([c, *[_fmt(result[p].get("per_class_mIoU", {}).get(c)) for p in PROTOCOLS]])
    return buffer.getvalue()


def _fmt(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
