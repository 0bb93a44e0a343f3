"""Stage ``evaluate``: score predictors against a part dataset, both protocols side by side.

``stage.predictors`` lists what is scored, each entry ``<kind>`` or ``<kind>:<path>``:

``records``
    a stage's part records (default ``stage.input``): pixel grouping or dense CRF
    (``part_segments``: clusters are ``part_ids - 1``, each image's own numbering) or part
    ranking (``part_labels``: ``cluster_ids``, consistent within an object class), matched
    to dataset images by image path (an image without a record counts as finding nothing);
``proposal`` / ``part_distillation``
    a trained stage-4/6 model (``inference.TrainedModel``: a checkpoint file or a run
    folder, default ``stage.proposal_run`` / ``stage.part_distillation_run``, its newest
    checkpoint) run on each image with the sample's object mask (and, for stage 6, its
    object class mapped to the training class index by synset, or for a synset that is no
    class of the model by ``stage.class_map_file`` / ``stage.wordnet_is_a``: see
    ``evaluation/class_map.py``): the strict protocol's only ground truth;
``semantic:<path>``
    a semantic-part baseline (``supervised_learning`` / ``fewshot_learning`` with
    ``stage.variant=semantic``): its run folder; clusters are its dataset's part classes;
``strips``
    the trivial baseline: the object's box cut into ``stage.num_clusters`` strips;
``colour_kmeans``
    the colour baseline: k-means of colour + position of the object's pixels
    (``stage.num_clusters`` clusters).

Each predictor has a label (``records_<stage>``, ``proposal``, ``part_distillation``,
``strips``, ``colour_kmeans``; unique) and its own sharded, resumable store of per-image evaluation states
under ``<stage.output>/<label>/`` (``eval_states`` records; its manifest holds what its
states depend on, so each resumes on its own). ``stage.output`` itself is a store as every
stage's (the manifest of the whole config, a shard file per job closed when the job's slice
is done, no records), which is what pipelines and status read. Whichever job finds every
shard of every predictor closed merges them (a pure function of the states): per
predictor ``metrics.json``, ``metrics.md``, ``per_class.csv`` in its folder, and in
``stage.output`` the combined ``metrics.md`` (a row per predictor, protocol and AR
setting: AR@k, C-mIoU, A-mIoU, bestIoU), ``metrics.json`` and ``per_class.csv``; the table is
logged and put in the stage summary.

AR settings (PIPELINE.md "Evaluation"): proposal-type predictors (``proposal``, ``records``,
``strips``, ``colour_kmeans``) get two rows per protocol, ``overlapping`` (the top-k masks
as they are: the setting of the published stage-one AR, the one to compare with the paper)
and ``one-label`` (one label per pixel; their mIoU and bestIoU are of these masks, so they
are on this row);
the others one ``one-label`` row. AR is per image (every object of an image together, one
prediction on the union of their masks, top-k per image, as the reference scores
Pascal-Part and Cityscapes-Part), mIoU per object: jobs take whole images, and an image of
several objects has an AR state keyed ``<split>/image:<path>`` besides its objects' states.

Training (stages 4 and 6 and the baselines, ``stage.eval_period``) scores the model it is training with the
same per-image code (:func:`score_sample`, :func:`evaluate_in_memory`):
:func:`training_evaluation`.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from part_distillation.config import ConfigError, RunConfig
from part_distillation.data.part_datasets import PartDatasetSplit, open_part_dataset
from part_distillation.data.part_sample import PartSample
from part_distillation.evaluation import proposals
from part_distillation.evaluation.evaluator import (AR_SETTINGS, PROTOCOLS, PartEvaluator, image_groups, image_key,
                                                    metrics)
from part_distillation.evaluation.predictors import (ColourKMeansPredictor, ModelPredictor, Predictor,
                                                     RecordsPredictor, StripsPredictor, empty_prediction,
                                                     prediction_from_record)
from part_distillation.evaluation.tables import metric_cell, render_table
from part_distillation.progress import StageSummary, progress
from part_distillation.stages.common import open_output
from part_distillation.store import RecordStore, ShardWriter, code_version, manifest_path, read_manifest
from part_distillation.store.files import atomic_write_text
from part_distillation.store.schemas import EVAL_STATES

from part_distillation.config import EvaluateStageConfig
from part_distillation.stages import SHARDED, StageSpec

SPEC = StageSpec("evaluate", EvaluateStageConfig, SHARDED, shards_over="the images of the dataset split",
                 merged_file="metrics.json")

log = logging.getLogger("part_distillation")

#: The predictor kinds of ``stage.predictors``.
PREDICTOR_KINDS = ("records", "proposal", "part_distillation", "semantic", "strips", "colour_kmeans")
#: Baselines that need nothing but the sample (no path).
BASELINE_KINDS = ("strips", "colour_kmeans")
MODEL_KINDS = ("proposal", "part_distillation", "semantic")

__all__ = ["PREDICTOR_KINDS", "PredictorSpec", "check", "evaluate_in_memory", "markdown_table", "merge_and_write",
           "parse_predictors", "prediction_from_record", "run", "score_image", "score_sample", "state_keys",
           "training_evaluation"]


# --------------------------------------------------------------------------- predictors

@dataclass(frozen=True)
class PredictorSpec:
    """One entry of ``stage.predictors``, resolved: its kind, path (None for the baselines) and label."""

    kind: str
    path: str | None
    label: str
    entry: str


def parse_predictors(stage) -> list[PredictorSpec]:
    """``stage.predictors`` resolved (default paths, unique labels); one-line ``ConfigError`` naming
    the entry when a kind is unknown or a records folder holds no stage output."""
    if not stage.predictors:
        raise ConfigError("stage.predictors is empty: list at least one of " + ", ".join(PREDICTOR_KINDS))
    specs: list[PredictorSpec] = []
    for entry in stage.predictors:
        kind, _, path = str(entry).partition(":")
        kind, path = kind.strip(), path.strip() or None
        where = f"stage.predictors entry {entry!r}"
        if kind not in PREDICTOR_KINDS:
            raise ConfigError(f"{where}: unknown kind {kind!r}; expected <kind> or <kind>:<path> with kind one of "
                              f"{list(PREDICTOR_KINDS)}")
        if kind in BASELINE_KINDS:
            if path:
                raise ConfigError(f"{where}: the {kind} baseline takes no path (write '{kind}')")
            label = kind
        elif kind == "records":
            path = path or stage.input
            if not path:
                raise ConfigError(f"{where}: no records folder: set stage.input or write records:<folder>")
            if not manifest_path(path).is_file():
                raise ConfigError(f"{where}: {path} holds no stage output (no manifest.json): run that stage "
                                  f"first or give another folder")
            label = f"records_{read_manifest(path).get('stage', 'unknown')}"
        elif kind == "semantic":
            if not path:
                raise ConfigError(f"{where}: a semantic baseline needs its run folder (write semantic:<folder>)")
            label = kind
        else:
            path = path or (stage.proposal_run if kind == "proposal" else stage.part_distillation_run)
            label = kind
        unique, n = label, 1
        while any(s.label == unique for s in specs):
            n += 1
            unique = f"{label}_{n}"
        specs.append(PredictorSpec(kind=kind, path=path, label=unique, entry=str(entry)))
    return specs


def check(cfg: RunConfig) -> None:
    """Before submission: every predictor entry is valid and its records or checkpoint exist."""
    st = cfg.stage
    for spec in parse_predictors(st):
        if spec.kind in MODEL_KINDS:
            _checkpoint(spec)


def _checkpoint(spec: PredictorSpec) -> Path:
    """The checkpoint file of a model entry; ``ConfigError`` naming the entry (and the setting it defaults to)."""
    from part_distillation import inference

    default = ":" not in spec.entry
    key = ("stage.proposal_run" if spec.kind == "proposal" else "stage.part_distillation_run") if default else "path"
    try:
        return inference.resolve_checkpoint(spec.path, path_key=key)
    except ConfigError as err:
        raise ConfigError(f"stage.predictors entry {spec.entry!r}: {err}") from None


def build_predictor(spec: PredictorSpec, cfg: RunConfig) -> Predictor:
    """The predictor of one entry (models loaded on ``model.device``)."""
    from part_distillation import inference

    st = cfg.stage
    if spec.kind == "records":
        return RecordsPredictor.from_store(spec.path, spec.label, st.num_clusters)
    if spec.kind == "strips":
        return StripsPredictor(st.num_clusters, spec.label)
    if spec.kind == "colour_kmeans":
        return ColourKMeansPredictor(st.num_clusters, spec.label)
    checkpoint = _checkpoint(spec)
    model = inference.TrainedModel.load(checkpoint, device=cfg.model.device)
    if model.kind != spec.kind:
        raise ConfigError(f"stage.predictors entry {spec.entry!r}: {checkpoint} is a {model.kind} model, "
                          f"not {spec.kind}")
    if model.kind == "part_distillation" and model.class_wnids is None:
        raise ConfigError(f"stage.predictors entry {spec.entry!r}: {checkpoint} does not say which object class "
                          f"each head row is ({inference.CLASSES_FILE} missing in its run folder and its image "
                          f"tree not found): rerun part_distillation to write it")
    rule = None
    if model.kind == "part_distillation":
        from part_distillation.evaluation.class_map import ModelClassRule

        rule = ModelClassRule.from_files(model.class_wnids, st.class_map_file, st.wordnet_is_a)
    return ModelPredictor(model, spec.label, st.num_clusters, class_rule=rule)


def _predictor_config(spec: PredictorSpec, predictor: Predictor, st) -> dict:
    """What a predictor's evaluation states depend on (its store's manifest config)."""
    checkpoint = getattr(getattr(predictor, "model", None), "checkpoint", None)
    return {"predictor": {"kind": spec.kind, "path": spec.path, "checkpoint": str(checkpoint) if checkpoint else None},
            "stage": {"dataset": st.dataset, "dataset_root": st.dataset_root, "image_root": st.image_root,
                      "annotations_root": st.annotations_root, "split": st.split, "match_split": st.match_split,
                      "top_k": list(st.top_k), "num_clusters": predictor.num_clusters,
                      # the state layout: AR per image in these settings (a store of the per-object,
                      # one-setting layout is another config, never mixed in)
                      "ar": {"per": "image", "settings": list(predictor.ar_settings)},
                      "at_test_size": scores_at_test_size(st.dataset, st.score_size),
                      **({"class_map_file": st.class_map_file, "wordnet_is_a": st.wordnet_is_a}
                         if spec.kind == "part_distillation" else {})}}


# --------------------------------------------------------------------------- one sample

def scores_at_test_size(dataset: str, score_size: str = "auto") -> bool:
    """Whether samples are scored at the predictor's test resolution (``stage.score_size``):
    PartImageNet by default, as the reference; Pascal-Part and Cityscapes-Part at the original size."""
    return score_size == "test" or (score_size == "auto" and dataset == "partimagenet")


def at_frame(sample: PartSample, frame) -> PartSample:
    """The sample's masks at ``frame.fitted`` (nearest)."""
    return dataclasses.replace(sample, object_mask=frame.masks_to_fitted(sample.object_mask[None])[0],
                               part_masks=frame.masks_to_fitted(np.asarray(sample.part_masks, dtype=bool)))


def score_image(predictor: Predictor, evaluator: PartEvaluator, samples: Sequence[PartSample],
                at_test_size: bool = False) -> tuple[list[dict], list[str]]:
    """The evaluation states of one image's objects for one predictor (:meth:`PartEvaluator.process_image`:
    per-object confusions, per-image AR), and why it predicted nothing, per object that got nothing
    (each such object's state says it under ``skip``).

    ``at_test_size``: ground truth and predictions scored at the predictor's test resolution
    (``Predictor.score_frame``, one per image: the predictions, the one on the union of the
    object masks included, made there, the ground truth resized to it)."""
    samples = list(samples)
    frame = predictor.score_frame(samples[0]) if at_test_size else None
    scored = [at_frame(s, frame) for s in samples] if frame is not None else samples
    shape = scored[0].object_mask.shape
    predictions, skips = [], []
    for sample in samples:
        prediction = predictor(sample, frame)
        skips.append(None if prediction is not None else predictor.last_skip or "no_prediction")
        predictions.append(prediction if prediction is not None else empty_prediction(shape))
    image_prediction = None
    if len(samples) > 1 and predictor.proposal_type:
        image_prediction = predictor.image_prediction(samples, predictions, frame) or empty_prediction(shape)
    states = evaluator.process_image(scored, predictions, image_prediction)
    for state, skip in zip(states[-len(samples):], skips):  # the objects' states (after an image's AR state)
        if skip:
            state["skip"] = skip
    evaluator.reset()  # the caller keeps the states (a record store, or a list)
    return states, [skip for skip in skips if skip]


def score_sample(predictor: Predictor, evaluator: PartEvaluator, sample: PartSample,
                 at_test_size: bool = False) -> tuple[dict, str | None]:
    """The evaluation state of an image holding one object (``sample``), and why it predicted nothing (or None)."""
    states, skips = score_image(predictor, evaluator, [sample], at_test_size)
    return states[0], (skips[0] if skips else None)


def state_keys(samples: Sequence[PartSample]) -> list[str]:
    """The keys of the states :func:`score_image` gives for one image's samples (in its order)."""
    keys = [s.key for s in samples]
    return keys if len(samples) == 1 else [image_key(samples[0]), *keys]


def _evaluator(predictor: Predictor, num_parts: int, top_k: Sequence[int]) -> PartEvaluator:
    return PartEvaluator(num_parts=num_parts, num_clusters=predictor.num_clusters, top_k=tuple(top_k),
                         ar_settings=predictor.ar_settings)


def evaluate_in_memory(predictor: Predictor, samples: Mapping[str, Iterable[PartSample]], split: str,
                       match_split: str | None, num_parts: int, top_k: Sequence[int] = proposals.TOP_K,
                       mapping: str = "majority", at_test_size: bool = False) -> dict:
    """Both protocols' metrics of ``predictor`` over ``samples`` (split -> samples), no files."""
    evaluator = _evaluator(predictor, num_parts, top_k)
    states: dict[str, list[dict]] = {}
    images: dict[str, int] = {}
    for name, items in samples.items():
        states[name] = []
        for group in image_groups(items):
            states[name] += score_image(predictor, evaluator, group, at_test_size)[0]
            images[name] = images.get(name, 0) + 1
    result = metrics(states.get(split, []), states.get(match_split) if match_split else None, top_k=tuple(top_k),
                     mapping=mapping)
    result["images"] = images.get(split, 0)
    result["objects"] = _count_objects(states.get(split, []))
    return result


# --------------------------------------------------------------------------- the stage

def _open_datasets(kind: str, root, splits: Sequence[str], image_root, annotations_root) -> dict[str, PartDatasetSplit]:
    return {s: open_part_dataset(kind, root, s, image_root, annotations_root) for s in splits}


def _open_store(cfg: RunConfig, folder: Path, config: dict, context) -> ShardWriter:
    rank = getattr(context, "rank", 0) if context is not None else 0
    world_size = getattr(context, "world_size", 1) if context is not None else 1
    return ShardWriter(folder, cfg.shard.index, cfg.shard.count, stage=cfg.stage.name, config=config,
                       code_version=code_version(), overwrite_config=cfg.overwrite_config, schema=EVAL_STATES,
                       rank=rank, world_size=world_size)


def run(cfg: RunConfig, context) -> StageSummary:
    st = cfg.stage
    summary = StageSummary(st.name, output=st.output)
    check(cfg)
    specs = parse_predictors(st)
    predictors = [build_predictor(spec, cfg) for spec in specs]
    splits = [st.split] + ([st.match_split] if st.match_split else [])
    datasets = _open_datasets(st.dataset, st.dataset_root, splits, st.image_root, st.annotations_root)
    num_parts = max(d.num_parts for d in datasets.values())
    evaluators = [_evaluator(p, num_parts, st.top_k) for p in predictors]
    output = Path(st.output)
    at_test_size = scores_at_test_size(st.dataset, st.score_size)
    with contextlib.ExitStack() as stack:
        # the job's shard of stage.output itself: its manifest (this config, predictors included) and,
        # once closed, "this slice is done" as for every stage; the states are in the predictors' stores
        stack.enter_context(open_output(cfg, EVAL_STATES, context))
        writers = [stack.enter_context(_open_store(cfg, output / spec.label, _predictor_config(spec, p, st), context))
                   for spec, p in zip(specs, predictors)]
        for split, dataset in datasets.items():
            samples = progress(dataset.samples(), None, f"evaluate {split}", st.progress_every)
            for i, group in enumerate(image_groups(samples)):  # whole images: AR is per image
                if i % cfg.shard.count != cfg.shard.index:
                    continue
                summary.seen += len(group)
                keys = [f"{split}/{key}" for key in state_keys(group)]
                for spec, predictor, evaluator, writer in zip(specs, predictors, evaluators, writers):
                    if all(writer.has(key) for key in keys):
                        summary.already_done += len(keys)
                        continue
                    states, skips = score_image(predictor, evaluator, group, at_test_size)
                    for skip in skips:
                        summary.skip(f"{spec.label}:{skip}")
                    for key, state in zip(keys, states):
                        if not writer.has(key):
                            writer.write({**state, "key": key, "split": split})
                            summary.written += 1
    stores = {spec.label: RecordStore(output / spec.label) for spec in specs}
    if all(not store.summary()["shards_missing_summary"] for store in stores.values()):
        part_names = datasets[st.split].part_names
        class_names = datasets[st.split].class_names
        results = {label: merge_and_write(store, output / label, st.split, st.match_split, tuple(st.top_k),
                                          st.mapping, part_names, object_key=st.object_key,
                                          class_names=class_names, dataset=st.dataset)
                   for label, store in stores.items()}
        table = write_combined(output, results, st.split, st.match_split, tuple(st.top_k), class_names)
        summary.extra["metrics"] = {label: {p: {k: v for k, v in r[p].items()
                                                if k in AR_SETTINGS or not isinstance(v, (dict, list))}
                                            for p in PROTOCOLS} for label, r in results.items()}
        summary.extra["metrics_table"] = table
        summary.extra["metrics_file"] = str(output / "metrics.json")
        if st.collage_classes and context.is_main:
            summary.extra["collages"] = [str(p) for p in write_collages(
                output, dict(zip((s.label for s in specs), predictors)), results, datasets[st.split],
                st.collage_classes, st.collage_per_class)]
        for label, result in results.items():
            if result.get("skipped"):
                log.warning("[evaluate] %s skipped %d of %d samples of split %s (scored as finding nothing): %s%s",
                            label, sum(result["skipped"].values()), result["objects"], st.split, result["skipped"],
                            " (a PartDistillation model on another dataset's classes: see stage.class_map_file "
                            "and stage.wordnet_is_a)" if "object_class_not_in_model" in result["skipped"] else "")
        images = next(iter(results.values()))["images"]
        log.info("[evaluate] %s, %d images of split %s%s:\n%s", st.dataset, images, st.split,
                 f" (strict protocol matched on {st.match_split})" if st.match_split else
                 " (no disjoint matching split: strict mIoU not computed)", table)
    return summary.finish()


# --------------------------------------------------------------------------- merge and files

def write_collages(folder: Path, predictors: Mapping[str, Predictor], results: Mapping[str, dict],
                   dataset: PartDatasetSplit, classes: int, per_class: int) -> list[Path]:
    """``collage_<label>.png`` per predictor: its ``classes`` best and worst object classes by
    reference-protocol mIoU, each row the prediction next to the ground truth (``viz``)."""
    from part_distillation.data.images import load_rgb
    from part_distillation.viz import collage_sample, evaluation_collage, write_png

    def samples_of(predictor: Predictor, name: str):
        for sample in dataset.samples():
            if sample.object_class == name:
                prediction = predictor(sample) or empty_prediction(sample.object_mask.shape)
                yield collage_sample(load_rgb(sample.path), sample, prediction)

    written = []
    for label, predictor in predictors.items():
        miou = results[label]["reference"].get("per_class_mIoU") or {}
        if not miou:
            continue
        image = evaluation_collage(miou, lambda name, p=predictor: samples_of(p, name), n=classes,
                                   per_class=per_class)
        written.append(write_png(folder / f"collage_{label}.png", image))
    return written


def merge_and_write(store: RecordStore, folder: Path, split: str, match_split: str | None, top_k: tuple[int, ...],
                    mapping: str, part_names: list[str], object_key: str = "imagenet_class",
                    class_names: Mapping[str, str] | None = None, dataset: str = "partimagenet") -> dict:
    """Metrics of every state in ``store``, written as JSON, Markdown and a per-class CSV in ``folder``.

    ``object_key`` keys the mIoU (``evaluator.OBJECT_KEYS``), said in every file;
    ``class_names`` names the object classes of ``per_class.csv`` (wnid -> name)."""
    states = list(store.iter_records())
    evaluation = [s for s in states if s["split"] == split]
    matching = [s for s in states if s["split"] == match_split] if match_split else None
    result = metrics(evaluation, matching, top_k=top_k, mapping=mapping, object_key=object_key)
    result["images"] = sum(1 for s in evaluation if "ar_strict" in s)  # one AR state per image
    result["objects"] = _count_objects(evaluation)
    result["split"], result["match_split"] = split, match_split
    result["object_key_label"] = object_key_label(object_key, dataset)
    _write_atomic(folder / "metrics.json", json.dumps(result, indent=2, default=_json_default))
    _write_atomic(folder / "metrics.md", markdown_table(result, top_k))
    _write_atomic(folder / "per_class.csv", per_class_csv(result, class_names))
    return result


def _count_objects(states: Iterable[Mapping]) -> int:
    """The samples (objects) among states: an image's AR-only state is none."""
    return sum(1 for s in states if "object_class" in s)


def object_key_label(object_key: str, dataset: str) -> str:
    """How ``metrics.md`` names what keys the mIoU."""
    if dataset != "partimagenet":
        return "the dataset's object class"
    return "ImageNet class (wnid)" if object_key == "imagenet_class" else "PartImageNet super-category"


def _key_line(results: Mapping[str, dict]) -> str:
    """The lines under a table: what keys the mIoU, and the samples each predictor skipped."""
    labels = sorted({r["object_key_label"] for r in results.values() if r.get("object_key_label")})
    lines = [f"mIoU per object class keyed by: {', '.join(labels)}"] if labels else []
    for label, result in results.items():
        skipped = result.get("skipped") or {}
        if skipped:
            reasons = ", ".join(f"{reason} {n}" for reason, n in skipped.items())
            who = f"{label}: " if label else ""
            lines.append(f"{who}skipped {sum(skipped.values())} of {result.get('objects', '?')} samples "
                         f"(scored as finding nothing): {reasons}")
    return "".join(f"\n{line}\n" for line in lines)


def _columns(top_k: tuple[int, ...]) -> list[str]:
    return [f"AR@{k}" for k in top_k] + ["C-mIoU", "A-mIoU", "bestIoU"]


def _rows(result: dict, top_k: tuple[int, ...]) -> list[tuple[str, str, list[str]]]:
    """(protocol, AR setting, cells) per row: a row per protocol and AR setting, overlapping first;
    the mIoU and bestIoU on the ``one-label`` row (the masks they are computed from)."""
    rows = []
    for protocol in PROTOCOLS:
        row = result[protocol]
        for setting in [s for s in AR_SETTINGS if s in row] or ["one-label"]:
            ar = row.get(setting, {})
            miou = setting == "one-label"
            rows.append((protocol, setting, [metric_cell(ar.get(f"AR@{k}")) for k in top_k] +
                         [metric_cell(row.get(c) if miou else None) for c in ("C-mIoU", "A-mIoU", "bestIoU")]))
    return rows


def markdown_table(result: dict, top_k: tuple[int, ...]) -> str:
    """One predictor's table: a row per protocol and AR setting (``masks``)."""
    return render_table(["protocol", "masks", *_columns(top_k)],
                        ([protocol, setting, *cells] for protocol, setting, cells in _rows(result, top_k))
                        ) + _key_line({"": result})


def combined_table(results: Mapping[str, dict], top_k: tuple[int, ...]) -> str:
    """Every predictor's table: a row per predictor, protocol and AR setting (``masks``)."""
    return render_table(["predictor", "protocol", "masks", *_columns(top_k)],
                        ([label, protocol, setting, *cells] for label, result in results.items()
                         for protocol, setting, cells in _rows(result, top_k))) + _key_line(results)


def write_combined(folder: Path, results: Mapping[str, dict], split: str, match_split: str | None,
                   top_k: tuple[int, ...], class_names: Mapping[str, str] | None = None) -> str:
    """``metrics.md``, ``metrics.json`` and ``per_class.csv`` over all predictors; returns the table."""
    table = combined_table(results, top_k)
    _write_atomic(folder / "metrics.md", table)
    _write_atomic(folder / "metrics.json", json.dumps(
        {"split": split, "match_split": match_split, "predictors": dict(results)}, indent=2, default=_json_default))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["predictor", "object_class", "class_name", *[f"mIoU_{p}" for p in PROTOCOLS]])
    for label, result in results.items():
        for row in _per_class_rows(result, class_names):
            writer.writerow([label, *row])
    _write_atomic(folder / "per_class.csv", buffer.getvalue())
    return table


def _per_class_rows(result: dict, class_names: Mapping[str, str] | None = None) -> list[list[str]]:
    """A row per object class: its key (a wnid for PartImageNet), its name (the key when unnamed)."""
    names = class_names or {}
    classes = sorted(set().union(*(result[p].get("per_class_mIoU", {}).keys() for p in PROTOCOLS)))
    return [[c, names.get(c, c), *[metric_cell(result[p].get("per_class_mIoU", {}).get(c)) for p in PROTOCOLS]]
            for c in classes]


def per_class_csv(result: dict, class_names: Mapping[str, str] | None = None) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["object_class", "class_name", *[f"mIoU_{p}" for p in PROTOCOLS]])
    writer.writerows(_per_class_rows(result, class_names))
    return buffer.getvalue()


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _write_atomic(path: Path, text: str) -> None:
    """Any shard may do the final merge: a temporary file of its own per writer (store.files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


# --------------------------------------------------------------------------- during training

def check_training_evaluation(stage) -> None:
    """Periodic evaluation settings of a training stage (``stage.eval_*``) are usable."""
    if stage.eval_period and not stage.eval_root:
        raise ConfigError(f"stage.eval_period={stage.eval_period} needs stage.eval_root (the part dataset to "
                          f"evaluate on); or set stage.eval_period=0")
    if stage.eval_period and not Path(stage.eval_root).is_dir():
        raise ConfigError(f"stage.eval_root={stage.eval_root} does not exist: give the {stage.eval_dataset} "
                          f"root, or set stage.eval_period=0")


def training_evaluation(stage, kind: str, class_wnids: Sequence[str] | None = None,
                        top_k: Sequence[int] = proposals.TOP_K) -> Callable:
    """``evaluate(trainer) -> {"<protocol>/<metric>": value}`` for ``engine.hooks.PeriodicEval``.

    Scores the model being trained (``trainer.module``, run in eval mode, left as it was)
    as a ``kind`` predictor on ``stage.eval_split`` (and ``stage.eval_match_split`` for the
    strict protocol's matching), the first ``stage.eval_max_images`` samples of each (0:
    all; samples and images read once and kept). Rank 0 evaluates; other ranks return {}.
    """
    from part_distillation.data.images import load_rgb
    from part_distillation.engine import distributed as ddp_utils
    from part_distillation.inference import TrainedModel, eval_max_size

    check_training_evaluation(stage)
    splits = [stage.eval_split] + ([stage.eval_match_split] if stage.eval_match_split else [])
    # opened now (json only), so a wrong dataset setting fails before training, not at the first evaluation
    try:
        datasets = _open_datasets(stage.eval_dataset, stage.eval_root, splits, stage.eval_image_root, None)
    except (OSError, ValueError) as err:
        raise ConfigError(f"periodic evaluation (stage.eval_root={stage.eval_root}, stage.eval_split="
                          f"{stage.eval_split}, stage.eval_match_split={stage.eval_match_split}): {err}") from None
    cache: dict = {}
    images: dict[str, np.ndarray] = {}

    def load_image(path: str) -> np.ndarray:
        if path not in images:
            images[path] = load_rgb(path)
        return images[path]

    def data() -> tuple[dict[str, list[PartSample]], int]:
        if "samples" not in cache:
            limit = stage.eval_max_images or None
            cache["samples"] = {s: _first(d.samples(), limit) for s, d in datasets.items()}
            cache["num_parts"] = max(d.num_parts for d in datasets.values())
        return cache["samples"], cache["num_parts"]

    def evaluate(trainer) -> dict[str, float]:
        if not ddp_utils.is_main():
            return {}
        samples, num_parts = data()
        model = TrainedModel(trainer.module, kind, image_size=stage.image_size,
                             max_size=eval_max_size(kind, stage.image_size),
                             class_wnids=tuple(class_wnids) if class_wnids is not None else None)
        predictor = ModelPredictor(model, kind, stage.eval_num_clusters, load_image=load_image)
        result = evaluate_in_memory(predictor, samples, stage.eval_split, stage.eval_match_split, num_parts,
                                    top_k=top_k, at_test_size=scores_at_test_size(stage.eval_dataset))
        return flat_metrics(result, top_k)

    return evaluate


def flat_metrics(result: dict, top_k: Sequence[int] = proposals.TOP_K) -> dict[str, float]:
    """``{"reference/overlapping/AR@10": ..., "reference/one-label/AR@10": ..., "strict/C-mIoU": ...}``
    without the undefined (NaN) ones."""
    out = {}

    def put(name: str, value) -> None:
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            out[name] = float(value)

    for protocol in PROTOCOLS:
        row = result[protocol]
        for setting in AR_SETTINGS:
            for k in top_k:
                put(f"{protocol}/{setting}/AR@{k}", row.get(setting, {}).get(f"AR@{k}"))
        for column in ("C-mIoU", "A-mIoU", "bestIoU"):
            put(f"{protocol}/{column}", row.get(column))
    return out


def _first(items: Iterable, limit: int | None) -> list:
    out = []
    for item in items:
        if limit is not None and len(out) >= limit:
            break
        out.append(item)
    return out
