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

AR settings (docs/evaluation.md#protocols): proposal-type predictors (``proposal``, ``records``,
``strips``, ``colour_kmeans``) get two rows per protocol, ``overlapping`` (the top-k masks
as they are: the setting of the published stage-one AR, the one to compare with the paper)
and ``one-label`` (one label per pixel; their mIoU and bestIoU are of these masks, so they
are on this row);
the others one ``one-label`` row. AR is per image (every object of an image together, one
prediction on the union of their masks, top-k per image, as the reference scores
Pascal-Part and Cityscapes-Part), mIoU per object: jobs take whole images, and an image of
several objects has an AR state keyed ``<split>/image:<path>`` besides its objects' states.

The per-image scoring lives in ``evaluation/scoring.py``; a training run scores the model it
trains with the same code (``evaluation/during_training.py``).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from part_distillation import inference
from part_distillation.config import ConfigError, RunConfig
from part_distillation.data.images import load_rgb
from part_distillation.data.part_datasets import PartDatasetSplit, open_part_dataset
from part_distillation.evaluation.class_map import ModelClassRule
from part_distillation.evaluation.evaluator import AR_SETTINGS, PROTOCOLS, image_groups, image_key, metrics
from part_distillation.evaluation.predictors import (ColourKMeansPredictor, ModelPredictor, Predictor,
                                                     RecordsPredictor, StripsPredictor, empty_prediction,
                                                     prediction_from_record)
from part_distillation.evaluation.scoring import (count_objects, new_evaluator, score_image, scores_at_test_size,
                                                  state_keys)
from part_distillation.evaluation.tables import metric_cell, render_table
from part_distillation.progress import progress
from part_distillation.stages.shard_io import open_output
from part_distillation.summaries import StageSummary
from part_distillation.store import RecordStore, ShardWriter, code_version, manifest_path, read_manifest
from part_distillation.store.files import atomic_write_text
from part_distillation.store.schemas import EVAL_STATES
from part_distillation.store.sharding import in_shard

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

__all__ = ["PREDICTOR_KINDS", "PredictorSpec", "check", "markdown_table", "merge_and_write", "parse_predictors",
           "prediction_from_record", "run"]


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
    default = ":" not in spec.entry
    key = ("stage.proposal_run" if spec.kind == "proposal" else "stage.part_distillation_run") if default else "path"
    try:
        return inference.resolve_checkpoint(spec.path, path_key=key)
    except ConfigError as err:
        raise ConfigError(f"stage.predictors entry {spec.entry!r}: {err}") from None


def build_predictor(spec: PredictorSpec, cfg: RunConfig) -> Predictor:
    """The predictor of one entry (models loaded on ``model.device``)."""
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

# --------------------------------------------------------------------------- the stage

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
    datasets = {s: open_part_dataset(st.dataset, st.dataset_root, s, st.image_root, st.annotations_root) for s in splits}
    num_parts = max(d.num_parts for d in datasets.values())
    evaluators = [new_evaluator(p, num_parts, st.top_k) for p in predictors]
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
            for group in image_groups(samples):  # whole images (AR is per image), by key (store/sharding.py)
                if not in_shard(f"{split}/{image_key(group[0])}", cfg.shard.index, cfg.shard.count):
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
        merge_all(st, context, specs, predictors, datasets, stores, summary)
    return summary.finish()


def merge_all(st, context, specs, predictors, datasets, stores, summary: StageSummary) -> None:
    """Once every job's shard is closed: each predictor's metrics, the combined table and
    collages, written by whichever job finds them complete (a pure function of the states)."""
    output = Path(st.output)
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


# --------------------------------------------------------------------------- merge and files

def write_collages(folder: Path, predictors: Mapping[str, Predictor], results: Mapping[str, dict],
                   dataset: PartDatasetSplit, classes: int, per_class: int) -> list[Path]:
    """``collage_<label>.png`` per predictor: its ``classes`` best and worst object classes by
    reference-protocol mIoU, each row the prediction next to the ground truth (``viz``)."""
    # OpenCV: only when collages are drawn
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
    result["objects"] = count_objects(evaluation)
    result["split"], result["match_split"] = split, match_split
    result["object_key_label"] = object_key_label(object_key, dataset)
    _write_atomic(folder / "metrics.json", json.dumps(result, indent=2, default=_json_default))
    _write_atomic(folder / "metrics.md", markdown_table(result, top_k))
    _write_atomic(folder / "per_class.csv", per_class_csv(result, class_names))
    return result


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
    table = combined_table(results, top_k) + (
        f"\nScored on split `{split}`" + (f"; the strict protocol matched clusters to parts on `{match_split}`"
                                           if match_split else " (no stage.match_split: no strict mIoU)") + ".\n")
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
