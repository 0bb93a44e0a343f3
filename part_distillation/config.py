"""Typed configuration schemas, registered once with Hydra's ConfigStore.

Hydra composes ``configs/config.yaml`` over these dataclasses, so an unknown key or a
value of the wrong type fails at composition with the key named. Ranges (K >= 1, a
ratio in [0, 1], ...) are checked by :func:`validate`, which runs before any job is
launched (``launch.preflight_sweep`` checks every job of a multirun before
submission) and again inside each job.

Stage schemas subclass :class:`StageConfig`; each stage's YAML in ``configs/stage/``
names its schema in its defaults list (``- /schema/stage/<name>@_here_``), so adding a
stage is one dataclass plus one YAML file.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the key."""


# ---------------------------------------------------------------------------------
# Range checks: each schema lists its constraints next to its fields.
# ---------------------------------------------------------------------------------

def _at_least(lo: float):
    return lambda v: v is None or v >= lo, f">= {lo}"


def _ratio():
    return lambda v: v is None or 0.0 <= v <= 1.0, "in [0, 1]"


def _one_of(*choices: str):
    return lambda v: v in choices, f"one of {list(choices)}"


# ---------------------------------------------------------------------------------
# Shared groups
# ---------------------------------------------------------------------------------

@dataclass
class PathsConfig:
    """Every output location derives from ``root``; nothing is hard-coded to a cluster."""

    root: str = "."
    weights: str = "${paths.root}/weights"
    pseudo_labels: str = "${paths.root}/pseudo_labels"
    datasets: str = "${paths.root}/datasets"
    outputs: str = "${paths.root}/outputs"


@dataclass
class ShardConfig:
    """Which slice of the input this job handles. A SLURM array sweeps ``index``."""

    index: int = 0
    count: int = 1
    by: str = "class"

    _checks = {"count": _at_least(1), "index": _at_least(0), "by": _one_of("class", "image")}


@dataclass
class LauncherConfig:
    """Resources handed to ``hydra/launcher=submitit_slurm`` (and submitit_local).

    Kept here rather than under ``hydra.launcher`` so experiments and ``sh_files/``
    set them the same way whichever launcher is chosen.
    """

    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 2
    mem_gb: Optional[int] = None
    timeout_min: int = 60
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    array_parallelism: int = 256
    max_num_timeout: int = 3  # requeues after a time-out; stages resume where they stopped
    signal_delay_s: int = 120

    _checks = {
        "nodes": _at_least(1),
        "tasks_per_node": _at_least(1),
        "gpus_per_node": _at_least(0),
        "cpus_per_task": _at_least(1),
        "timeout_min": _at_least(1),
        "max_num_timeout": _at_least(0),
    }


@dataclass
class DataConfig:
    """An ImageNet-style image tree (one folder per class, named by WordNet id)."""

    name: str = MISSING
    root: str = MISSING
    split: Optional[str] = "train"  # sub-folder of root (ImageNet-1k); null for flat trees
    words_file: Optional[str] = None  # class names / synset list; null: found next to the tree (imagenet.py)
    max_pixels: int = 64_000_000  # larger images are downscaled (or refused, see oversize)
    oversize: str = "downscale"

    _checks = {"max_pixels": _at_least(1), "oversize": _one_of("downscale", "refuse")}


@dataclass
class ModelConfig:
    """Which network a stage builds, and from which weights."""

    name: str = "none"
    size: str = "tiny"
    weights: Optional[str] = None
    device: str = "auto"  # auto | cpu | cuda

    _checks = {"device": _one_of("auto", "cpu", "cuda")}


@dataclass
class StageConfig:
    """Fields every stage has; stage schemas subclass it."""

    name: str = MISSING
    output: str = MISSING  # the stage output folder in the record store
    input: Optional[str] = None  # the previous stage's output, where there is one
    progress_every: int = 200  # log line period (records) when not on a terminal

    _checks = {"progress_every": _at_least(1)}  # stage schemas add theirs (merged, see _check_node)


@dataclass
class IndexStageConfig(StageConfig):
    """Stage ``index``: list and check every image before GPU time is spent."""

    name: str = "index"
    redo_changed: bool = False  # rerun: re-probe images whose file changed size/mtime; tombstone vanished ones


@dataclass
class SyntheticDataStageConfig(StageConfig):
    """Stage ``synthetic_data``: write the synthetic part dataset the demo and tests use."""

    name: str = "synthetic_data"
    classes: int = 4
    images_per_class: int = 12
    parts_per_class: int = 4
    size: int = 128
    seed: int = 0

    _checks = {"classes": _at_least(1), "images_per_class": _at_least(1),
               "parts_per_class": _at_least(1), "size": _at_least(32)}


@dataclass
class SamplePhotosStageConfig(StageConfig):
    """Stage ``sample_photos``: the scikit-image photos as an image tree (real-photo check)."""

    name: str = "sample_photos"


@dataclass
class PipelineStageConfig(StageConfig):
    """Stage ``pipeline``: several stages in order, in this process (the demo)."""

    name: str = "pipeline"
    stages: list[str] = field(default_factory=lambda: ["synthetic_data", "index"])


@dataclass
class DeticStageConfig(StageConfig):
    """Stage 1, object-mask caching with Detic (PIPELINE.md section 1)."""

    name: str = "detic_labeling"
    test_size: int = 640
    max_detections: int = 1000
    keep_top: int = 10
    score_threshold: float = 0.5

    _checks = {"test_size": _at_least(32), "max_detections": _at_least(1), "keep_top": _at_least(1),
               "score_threshold": _ratio()}


@dataclass
class PixelGroupingStageConfig(StageConfig):
    """Stage 2, k-means of backbone features inside each object mask (section 2)."""

    name: str = "pixel_grouping"
    num_parts: int = 4
    features: str = "mask2former"  # mask2former (reference, model.weights) | efficientnet_lite0
    # levels standing in for res3 + res4, finest = the grid (efficientnet: stride4..stride32)
    feature_levels: list[str] = field(default_factory=lambda: ["res3", "res4"])
    pretrained: bool = True  # false: random-initialised backbone (a baseline)
    normalize_features: bool = False
    assignment: str = "dot"
    objects: str = "top"  # top: the highest-scoring stage-1 mask (reference) | all: every kept mask
    kmeans_restarts: int = 10
    batch_size: int = 8  # images per forward pass and per k-means call
    input_size: int = 640

    _checks = {"num_parts": _at_least(1), "assignment": _one_of("dot", "l2"), "input_size": _at_least(32),
               "features": _one_of("mask2former", "efficientnet_lite0"), "objects": _one_of("top", "all"),
               "kmeans_restarts": _at_least(1), "batch_size": _at_least(1)}


@dataclass
class DenseCRFStageConfig(StageConfig):
    """Stage 3, dense-CRF refinement of the part segments (section 3)."""

    name: str = "dense_crf"
    gt_prob: float = 0.7
    iterations: int = 10
    input_size: int = 640

    _checks = {"gt_prob": _ratio(), "iterations": _at_least(1), "input_size": _at_least(32)}


@dataclass
class TrainStageConfig(StageConfig):
    """Stages 4 and 6: Mask2Former training (sections 4 and 6)."""

    name: str = MISSING
    batch_size: int = 512
    lr: float = 1e-4
    max_iter: int = 50_000
    steps: list[int] = field(default_factory=lambda: [40_000, 45_000])
    min_object_area_ratio: float = 0.05
    min_part_area_ratio: float = 0.05
    parts_per_class: int = 8
    freeze_backbone: bool = True
    freeze_encoder: bool = True

    _checks = {"batch_size": _at_least(1), "lr": _at_least(0.0), "max_iter": _at_least(1),
               "min_object_area_ratio": _ratio(), "min_part_area_ratio": _ratio(),
               "parts_per_class": _at_least(1)}


@dataclass
class PartRankingStageConfig(StageConfig):
    """Stage 5, per-class k-means of proposal embeddings, then relabelling (section 5)."""

    name: str = "part_ranking"
    num_clusters: int = 8
    min_area_ratio: float = 0.05
    min_proposal_score: float = 0.3
    min_label_score: float = 0.1

    _checks = {"num_clusters": _at_least(1), "min_area_ratio": _ratio(),
               "min_proposal_score": _ratio(), "min_label_score": _ratio()}


@dataclass
class EvaluateStageConfig(StageConfig):
    """Stage ``evaluate``: a stage's part records scored against a part dataset (both protocols)."""

    name: str = "evaluate"
    dataset: str = "partimagenet"
    dataset_root: str = "${data.root}"
    image_root: Optional[str] = None  # PartImageNet: the ImageNet-1k train folder (default <root>/<split>)
    annotations_root: Optional[str] = None  # Pascal-Part: Annotations_Part (default <root>/Annotations_Part)
    split: str = "valtest"
    match_split: Optional[str] = None  # a split disjoint from `split` for the strict protocol's matching
    num_clusters: int = 8
    top_k: list[int] = field(default_factory=lambda: [1, 10, 50, 100, 200])
    mapping: str = "majority"

    _checks = {"dataset": _one_of("partimagenet", "pascal_part", "cityscapes_part"),
               "num_clusters": _at_least(1), "mapping": _one_of("majority", "hungarian")}


@dataclass
class RunConfig:
    """The whole composed configuration of one job."""

    stage: StageConfig = MISSING
    data: DataConfig = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    experiment: str = "default"
    seed: int = 0
    overwrite_config: bool = False  # allow writing into an output made with another config
    log_level: str = "INFO"

    _checks = {"log_level": _one_of("DEBUG", "INFO", "WARNING", "ERROR")}


STAGE_SCHEMAS: dict[str, type[StageConfig]] = {
    "synthetic_data": SyntheticDataStageConfig,
    "sample_photos": SamplePhotosStageConfig,
    "pipeline": PipelineStageConfig,
    "index": IndexStageConfig,
    "detic_labeling": DeticStageConfig,
    "pixel_grouping": PixelGroupingStageConfig,
    "dense_crf": DenseCRFStageConfig,
    "proposal_learning": TrainStageConfig,
    "part_ranking": PartRankingStageConfig,
    "part_distillation": TrainStageConfig,
    "evaluate": EvaluateStageConfig,
}


def register_configs() -> None:
    """Register every schema once; YAML files in ``configs/`` extend them."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="schema/data", name="imagenet", node=DataConfig)
    cs.store(group="schema/model", name="model", node=ModelConfig)
    for name, schema in STAGE_SCHEMAS.items():
        cs.store(group="schema/stage", name=name, node=schema)


# ---------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------

def _check_node(obj: Any, prefix: str) -> None:
    checks: dict = {}
    for klass in reversed(type(obj).__mro__):  # a subclass's checks add to its base's
        checks.update(vars(klass).get("_checks", {}))
    for f in fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if f.name in checks:
            ok, expected = checks[f.name]
            if not ok(value):
                raise ConfigError(f"config key '{key}' = {value!r} is invalid: expected {expected}")
        if is_dataclass(value):
            _check_node(value, key + ".")


def _unknown_keys(tree: Any, obj: Any, prefix: str = "") -> list[str]:
    """Dotted keys of ``tree`` that the typed ``obj`` has no field for."""
    if not isinstance(tree, dict) or not is_dataclass(obj):
        return []
    known = {f.name for f in fields(obj)}
    found: list[str] = []
    for key, sub in tree.items():
        if key == "hydra" and not prefix:
            continue
        if key not in known:
            found.append(f"{prefix}{key}")
        else:
            found += _unknown_keys(sub, getattr(obj, key), f"{prefix}{key}.")
    return found


def validate(cfg: DictConfig) -> RunConfig:
    """Check ranges and cross-field rules; return the typed config.

    Raises :class:`ConfigError` naming the key. Interpolations are resolved here, so a
    dangling ``${...}`` is reported too.
    """
    try:
        run = OmegaConf.to_object(cfg)
        if isinstance(run, dict):  # a copy that lost the root schema (e.g. hydra node masked out)
            run = RunConfig(**{f.name: run[f.name] for f in fields(RunConfig) if f.name in run})
    except Exception as err:  # omegaconf errors already name the key
        raise ConfigError(f"invalid configuration: {err}") from err
    unknown = _unknown_keys(OmegaConf.to_container(cfg, resolve=False), run)
    if unknown:  # only keys added with '+' get past the schema
        raise ConfigError(f"config key '{unknown[0]}' is unknown: no schema has it (a typo?)")
    _check_node(run, "")
    if run.shard.index >= run.shard.count:
        raise ConfigError(f"config key 'shard.index' = {run.shard.index} is invalid: "
                          f"expected < shard.count ({run.shard.count})")
    if run.stage.name not in STAGE_SCHEMAS:
        raise ConfigError(f"config key 'stage.name' = {run.stage.name!r} is invalid: "
                          f"expected one of {sorted(STAGE_SCHEMAS)}")
    return run
