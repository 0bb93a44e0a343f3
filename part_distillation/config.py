"""Typed configuration schemas, registered once with Hydra's ConfigStore.

Hydra composes ``configs/config.yaml`` over these dataclasses, so an unknown key or a
value of the wrong type fails at composition with the key named. Ranges (K >= 1, a
ratio in [0, 1], ...) are checked by :func:`validate`, which runs before any job is
launched (``launch.preflight_sweep`` checks every job of a multirun before
submission) and again inside each job.

Stage schemas subclass :class:`StageConfig`; each stage's YAML in ``configs/stage/``
names its schema in its defaults list (``- /schema/stage/<name>@_here_``), so adding a
stage is one dataclass and one YAML file here plus its module ``stages/<name>.py`` (with
its ``SPEC``; see ``part_distillation.stages``). The schemas stay here, not in the stage
modules, because composing and validating a config must not import the stages.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Mapping, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


from part_distillation.errors import ConfigError  # noqa: E402 (defined below every layer)


# ---------------------------------------------------------------------------------
# Range checks: each schema lists its constraints next to its fields.
# ---------------------------------------------------------------------------------

def _at_least(lo: float):
    return lambda v: v is None or v >= lo, f">= {lo}"


def _ratio():
    return lambda v: v is None or 0.0 <= v <= 1.0, "in [0, 1]"


def _open_ratio():
    return lambda v: v is None or 0.0 < v < 1.0, "in (0, 1), both ends excluded"


def _one_of(*choices: str):
    return lambda v: v in choices, f"one of {list(choices)}"


def _stem(path: str) -> str:
    """``${pd.stem:<path>}``: a file's or folder's name without its suffix (default output names)."""
    import os

    return os.path.splitext(os.path.basename(os.path.abspath(str(path))))[0] or "root"


if not OmegaConf.has_resolver("pd.stem"):
    OmegaConf.register_new_resolver("pd.stem", _stem)


# ---------------------------------------------------------------------------------
# Shared groups
# ---------------------------------------------------------------------------------

@dataclass
class PathsConfig:
    """Every output location derives from ``root``; nothing is hard-coded to a cluster.

    The stages' output folders are named here, once, by stage name: a stage's YAML writes
    ``output: ${paths.<stage>}`` and the next stage ``input: ${paths.<stage>}``, so moving an
    output is one edit (the folder names follow the reference's layout).
    """

    root: str = "."
    weights: str = "${paths.root}/weights"
    pseudo_labels: str = "${paths.root}/pseudo_labels"
    datasets: str = "${paths.root}/datasets"
    outputs: str = "${paths.root}/outputs"
    detic_labeling: str = "${paths.pseudo_labels}/object_labels/${data.name}/detic_predictions"
    vocabulary_cache: str = "${paths.pseudo_labels}/object_labels/${data.name}/vocabulary"  # CLIP class embeddings
    pixel_grouping: str = "${paths.pseudo_labels}/part_labels/proposal_generation/${data.name}"
    dense_crf: str = "${paths.pseudo_labels}/part_labels/proposal_generation_dcrf/${data.name}"
    part_ranking: str = "${paths.pseudo_labels}/part_labels/part_ranking/${data.name}"
    proposal_learning: str = "${paths.outputs}/proposal_learning/${data.name}"
    part_distillation: str = "${paths.outputs}/part_distillation/${data.name}"
    pipeline: str = "${paths.outputs}/pipeline"  # the pipeline's plan and job ledger (read by status)


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
    # The 20-query demo network (model=mask2former_tiny) trains outside experiment=demo only
    # with this set (a small trial); otherwise it is refused before anything runs.
    allow_tiny: bool = False

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
    #: ``distinct``: each part its own colour; ``shared``: all parts of an object share one
    #: appearance (colour cannot find the parts; shapes and layout are the same templates)
    appearance: str = "distinct"

    _checks = {"classes": _at_least(1), "images_per_class": _at_least(1),
               "parts_per_class": _at_least(1), "size": _at_least(32), "appearance": _one_of("distinct", "shared")}


@dataclass
class SamplePhotosStageConfig(StageConfig):
    """Stage ``sample_photos``: the scikit-image photos as an image tree (real-photo check)."""

    name: str = "sample_photos"


@dataclass
class CollageStageConfig(StageConfig):
    """Stage ``collage``: PNG collages of stage outputs (``inputs``), a row per class."""

    name: str = "collage"
    inputs: list[str] = field(default_factory=list)
    per_class: int = 4
    classes: int = 8
    cell: int = 192

    _checks = {"per_class": _at_least(1), "classes": _at_least(1), "cell": _at_least(16)}


@dataclass
class PipelineStageConfig(StageConfig):
    """Stage ``pipeline``: several stages in order, in this process or as dependent SLURM jobs.

    ``launcher``: ``local`` runs the stages here one after another; ``slurm`` submits every
    stage at once (arrays over ``shard.index`` for the sharded stages, ``shards[<stage>]``
    jobs each; one job with the stage's ``launcher.*`` for training), chained by SLURM
    dependencies, and exits. Either way a complete stage is skipped and a stage with some
    shards done runs only the missing ones. ``output``: the pipeline's own folder (plan,
    submission ledger, job logs).
    """

    name: str = "pipeline"
    stages: list[str] = field(default_factory=lambda: ["synthetic_data", "index", "detic_labeling"])
    #: extra overrides for one sub-stage, "<stage>:<override>", e.g. "proposal_learning:stage.max_iter=10"
    #: (this run's own ``stage.*`` overrides configure the pipeline, not its stages)
    overrides: list[str] = field(default_factory=list)
    launcher: str = "local"
    #: jobs (``shard.count``) per sharded stage; a stage not named runs as one shard
    shards: dict[str, int] = field(default_factory=dict)

    _checks = {"launcher": _one_of("local", "slurm")}


@dataclass
class StatusStageConfig(StageConfig):
    """Stage ``status``: per stage of the pipeline, shards done / running / failed / pending,
    records, bad inputs and the last error, from the stores (and SLURM's accounting when
    there is one). ``output``: the pipeline's folder (``stage.output`` of ``stage=pipeline``)."""

    name: str = "status"


@dataclass
class ReportStageConfig(StageConfig):
    """Stage ``report``: ``file`` (a Markdown page), the evaluation table, each stage's summary
    and the collages of the pipelines of ``experiments`` (empty: this run's experiment).
    ``output``: the stage's own folder (its saved summary)."""

    name: str = "report"
    file: str = "${paths.root}/report.md"
    experiments: list[str] = field(default_factory=list)


@dataclass
class ObjectMaskSourceFields:
    """The settings of stage 1's object mask sources (``models/object_masks``), written once:
    stage 1 (:class:`DeticStageConfig`) and ``predict`` (:class:`PredictStageConfig`) inherit
    them, so both take the same keys (``stage.score_threshold``, ``stage.grabcut_margin``, ...).
    A mixin rather than a nested ``stage.source.*`` node: the flat keys are the ones the
    scripts, experiments and saved manifests already use."""

    fit_size: int = 640  # the image frame: longer side fitted to this (data/frame.py)
    score_threshold: float = 0.02  # Detic's
    nms_threshold: float = 0.5  # Detic's
    max_detections: int = 1000  # Detic's
    vocabulary: Optional[str] = None  # (C, 512) .npy in class order; default: CLIP, cached in vocabulary_cache
    clip_model: str = "${paths.weights}/clip/clip-vit-base-patch32"  # local transformers CLIP directory
    vocabulary_cache: str = "${paths.vocabulary_cache}"
    annotations: Optional[str] = None  # COCO json for the annotations source
    annotations_are_parts: bool = False  # object = union of the image's parts (PartImageNet)
    grabcut_margin: float = 0.1  # GrabCut's initial box leaves this fraction of each side out
    grabcut_iterations: int = 5
    grabcut_work_size: Optional[int] = 320  # GrabCut on the image at this longer side (null: fitted size)

    _checks = {"fit_size": _at_least(32), "max_detections": _at_least(1), "score_threshold": _ratio(),
               "nms_threshold": _ratio(), "grabcut_margin": _ratio(), "grabcut_iterations": _at_least(1),
               "grabcut_work_size": _at_least(16)}


@dataclass
class DeticStageConfig(StageConfig, ObjectMaskSourceFields):
    """Stage 1, object masks for every image (docs/method.md#stage-1); the source is a choice.

    ``source``: ``detic`` (the reference; ``model=detic_swinb`` and a vocabulary), ``annotations``
    (a COCO json of given objects, or of parts with ``annotations_are_parts``), ``mask2former``
    (a COCO instance Mask2Former, ``model.weights`` its detectron2 .pkl) or ``grabcut`` (no
    weights). The sources' own settings: :class:`ObjectMaskSourceFields`.
    """

    name: str = "detic_labeling"
    source: str = "detic"
    keep_top: int = 10
    own_class_filter: bool = True  # keep the image's own class when detected (the intent; docs/differences.md#trap-1)
    batch_size: int = 4  # images per forward pass
    allow_tf32: bool = False  # fp32 matmuls/convolutions on GPU unless turned on

    _checks = {"source": _one_of("detic", "annotations", "mask2former", "grabcut"),
               "keep_top": _at_least(1), "batch_size": _at_least(1)}


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
    """Stage 3, dense-CRF refinement of the part segments (section 3).

    ``variant``: ``reference`` (default) is the reference pydensecrf call on the whole
    fitted image. ``fast`` (``models.dense_crf.dense_crf``: the object's box plus a
    margin, the CRF at 1/``fast_factor`` resolution) agrees with it at part mIoU 0.986
    (``fast_factor=2``, about 7x faster) and 0.998 (``fast_factor=1``, about 2x) on
    benchmark B2's textured 640x640 cases; on degraded synthetic parts fitted to 640
    (tests/stages/fixtures.py, 6 objects) 0.950 (factor 2) and 0.968 (factor 1). Small
    fitted images lose more at factor 2 (0.77 at 128x128): keep factor 1 there.
    ``gt_prob``: the unary's probability of the given label, in (0, 1) exclusive (pydensecrf's
    ``unary_from_labels`` asserts it: 1 or 0 gives an infinite -log unary).
    ``input_size``: the fit size stage 2 used; a record in another frame is an error.
    ``workers``: local CRF processes of this job (one writer, in the main process).
    ``follow``: process stage-2 records as they appear, polling the input every
    ``poll_s`` seconds, and exit once all its shards are closed.
    """

    name: str = "dense_crf"
    gt_prob: float = 0.7
    iterations: int = 10
    input_size: int = 640
    variant: str = "reference"
    fast_factor: float = 2.0
    workers: int = 1
    follow: bool = False
    poll_s: float = 30.0

    _checks = {"gt_prob": _open_ratio(), "iterations": _at_least(1), "input_size": _at_least(32),
               "variant": _one_of("reference", "fast"), "fast_factor": _at_least(1.0),
               "workers": _at_least(1), "poll_s": _at_least(0.0)}


@dataclass
class TrainStageConfig(StageConfig):
    """What the training stages share (4, 6 and the two baselines): the training engine's settings.

    ``batch_size`` is the global batch; each process takes ``per_device_batch`` images per
    micro-batch and the engine accumulates ``batch_size / (processes x per_device_batch)``
    micro-batches per step. ``output`` is the run folder (checkpoints, TensorBoard logs,
    manifest); ``extra_inputs`` are further record sets trained on with ``input``.
    """

    name: str = MISSING
    extra_inputs: list[str] = field(default_factory=list)
    batch_size: int = 256
    per_device_batch: int = 8
    lr: float = 1e-4
    backbone_multiplier: float = 0.1  # the backbone's lr = lr x this (reference); acts only when it trains
    weight_decay: float = 0.05
    clip_grad_norm: float = 0.01
    max_iter: int = 50_000
    steps: list[int] = field(default_factory=lambda: [40_000, 45_000])
    warmup_iters: int = 0
    warmup_factor: float = 0.001
    amp: bool = True  # torch.amp on CUDA only; CPU runs float32
    image_size: int = 640
    num_workers: int = 4
    checkpoint_period: int = 5000
    checkpoint_minutes: float = 30.0  # also checkpoint this often (0: off): a requeued job loses little
    keep_last: int = 3
    log_period: int = 20
    preview_period: int = 1000  # 0: no image previews
    eval_period: int = 0  # 0: no periodic evaluation; else every eval_period iterations (stages.evaluate)
    eval_dataset: str = "partimagenet"  # the part dataset periodic evaluation scores against
    eval_root: Optional[str] = None  # its root (required when eval_period > 0)
    eval_split: str = "valtest"
    eval_match_split: Optional[str] = None  # disjoint split for the strict protocol's matching (null: strict mIoU off)
    eval_image_root: Optional[str] = None  # PartImageNet: the ImageNet-1k train folder (default <root>/<split>)
    eval_max_images: int = 0  # images of each split scored (0: all)
    eval_num_clusters: int = 8  # proposals: the top K per image form the segmentation scored by mIoU
    min_object_area_ratio: float = 0.05
    min_part_area_ratio: float = 0.05
    freeze_backbone: bool = True
    freeze_encoder: bool = True
    frozen_mode: str = "train"  # frozen modules follow train() (reference: drop-path acts) or stay in "eval"
    deterministic: bool = False  # torch.use_deterministic_algorithms (bitwise resume on CPU)
    num_points: int = 12544  # points per mask for the matcher and mask losses (reference 112 x 112)

    @classmethod
    def model_kind(cls, stage: Mapping[str, Any]) -> Optional[str]:
        """The kind of model this stage's checkpoints hold (``inference.KINDS``), from the run's
        ``stage`` settings as its manifest saved them; None: not a part predictor."""
        return None

    _checks = {"frozen_mode": _one_of("train", "eval"),
               "batch_size": _at_least(1), "per_device_batch": _at_least(1), "lr": _at_least(0.0),
               "backbone_multiplier": _at_least(0.0),
               "weight_decay": _at_least(0.0), "clip_grad_norm": _at_least(0.0), "max_iter": _at_least(1),
               "warmup_iters": _at_least(0), "image_size": _at_least(32), "num_workers": _at_least(0),
               "checkpoint_period": _at_least(1), "checkpoint_minutes": _at_least(0.0),
               "keep_last": _at_least(1), "log_period": _at_least(1),
               "preview_period": _at_least(0), "eval_period": _at_least(0), "eval_max_images": _at_least(0),
               "eval_num_clusters": _at_least(1),
               "eval_dataset": _one_of("partimagenet", "pascal_part", "cityscapes_part"),
               "min_object_area_ratio": _ratio(), "min_part_area_ratio": _ratio(), "num_points": _at_least(1)}


@dataclass
class ProposalLearningStageConfig(TrainStageConfig):
    """Stage 4: class-agnostic part-proposal Mask2Former (section 4). Reference schedule:
    batch 256 (the seed document; the released script's 512 on 8 nodes is an experiment),
    50k iterations, lr x0.1 at 40k and 45k."""

    name: str = "proposal_learning"
    max_iter: int = 50_000
    steps: list[int] = field(default_factory=lambda: [40_000, 45_000])

    @classmethod
    def model_kind(cls, stage: Mapping[str, Any]) -> Optional[str]:
        return "proposal"


@dataclass
class PartDistillationStageConfig(TrainStageConfig):
    """Stage 6: object-conditioned part Mask2Former (section 6): batch 256, 120k iterations,
    lr x0.1 at 100k and 110k; objects and parts kept at ratio >= 0.05."""

    name: str = "part_distillation"
    max_iter: int = 120_000
    steps: list[int] = field(default_factory=lambda: [100_000, 110_000])
    parts_per_class: int = 8

    @classmethod
    def model_kind(cls, stage: Mapping[str, Any]) -> Optional[str]:
        return "part_distillation"

    _checks = {**TrainStageConfig._checks, "parts_per_class": _at_least(1)}


@dataclass
class PartRankingStageConfig(StageConfig):
    """Stage 5, per-class k-means of proposal embeddings, then relabelling (section 5).

    The proposal model: ``checkpoint`` (a file) or, when null, the checkpoint of
    ``proposal_run`` at ``checkpoint_iteration`` (null: the newest; the in22k/in1k experiments
    set the reference's 40k). ``part_classes``: label with the part classes another run found.
    ``image_size``: the model's input canvas (reference 640). ``classifier``: ``l2``
    (the reference, x·c − |x|² − |c|²) or ``dot``. ``batch_size``: images per model
    forward in both passes (the canvas is fixed, so batching pads nothing and results equal
    batch 1's; a kill loses at most one batch of the cluster pass).
    """

    name: str = "part_ranking"
    proposal_run: str = "${paths.proposal_learning}"
    checkpoint: Optional[str] = None
    checkpoint_iteration: Optional[int] = None
    image_size: int = 640
    num_clusters: int = 8
    n_init: int = 10
    classifier: str = "l2"
    topk: int = 200
    min_area_ratio: float = 0.05
    min_proposal_score: float = 0.3
    min_label_score: float = 0.1
    min_object_iou: float = 0.001
    batch_size: int = 8
    #: another part-ranking output whose part classes (centroids) label these images, with no
    #: clustering of their own: the part-ranking labels held-out images get (same proposal model)
    part_classes: Optional[str] = None

    _checks = {"num_clusters": _at_least(1), "min_area_ratio": _ratio(), "batch_size": _at_least(1),
               "min_proposal_score": _ratio(), "min_label_score": _ratio(), "min_object_iou": _ratio(),
               "image_size": _at_least(32), "n_init": _at_least(1), "topk": _at_least(1),
               "classifier": _one_of("l2", "dot")}


@dataclass
class PartDatasetFields:
    """Which labelled part dataset a stage reads (``data/part_datasets.py``), written once:
    ``evaluate`` and the two baselines inherit it (same keys, ``stage.dataset_root`` etc.).
    The training stages' periodic evaluation names its dataset with ``eval_*`` keys instead."""

    dataset: str = "partimagenet"
    dataset_root: str = "${data.root}"
    image_root: Optional[str] = None  # PartImageNet: the ImageNet-1k train folder (default <root>/<split>)
    annotations_root: Optional[str] = None  # Pascal-Part: Annotations_Part (default <root>/Annotations_Part)
    split: str = "valtest"

    _checks = {"dataset": _one_of("partimagenet", "pascal_part", "cityscapes_part")}


@dataclass
class EvaluateStageConfig(StageConfig, PartDatasetFields):
    """Stage ``evaluate``: predictors scored against a part dataset (both protocols).

    ``predictors``: ``<kind>`` or ``<kind>:<path>``; kinds ``records`` (a stage's records,
    default ``input``), ``proposal`` / ``part_distillation`` (a stage-4/6 checkpoint file
    or run folder, default that stage's output), ``strips`` (the trivial baseline),
    ``colour_kmeans`` (k-means of colour + position inside the object).
    """

    name: str = "evaluate"
    predictors: list[str] = field(default_factory=lambda: ["records"])
    proposal_run: str = "${paths.proposal_learning}"  # default of `proposal`
    part_distillation_run: str = "${paths.part_distillation}"  # default of `part_distillation`
    match_split: Optional[str] = None  # a split disjoint from `split` for the strict protocol's matching
    num_clusters: int = 8
    top_k: list[int] = field(default_factory=lambda: [1, 10, 50, 100, 200])
    mapping: str = "majority"
    #: what keys the part mIoU (confusion matrices, majority vote): imagenet_class (the image's
    #: ImageNet class, as the reference; Pascal/Cityscapes: their object class) | supercategory
    object_key: str = "imagenet_class"
    #: a PartDistillation model's class for a dataset class (evaluation/class_map.py): a json or
    #: csv file of dataset class (or its wnid) -> model wnid, and ImageNet's wordnet.is_a.txt
    #: (the model's first class under the dataset class's synset); null: the synset itself only
    class_map_file: Optional[str] = None
    wordnet_is_a: Optional[str] = None
    #: where masks are scored: test (each predictor's test resolution, shortest side 640: the
    #: reference for PartImageNet) | original (the image's size: Pascal-Part, Cityscapes-Part)
    #: | auto (test for partimagenet, original otherwise)
    score_size: str = "auto"
    collage_classes: int = 4  # the best and the worst classes drawn per predictor (collage_<label>.png); 0: none
    collage_per_class: int = 2  # images per class in that collage

    _checks = {"num_clusters": _at_least(1), "mapping": _one_of("majority", "hungarian"),
               "object_key": _one_of("imagenet_class", "supercategory"),
               "score_size": _one_of("auto", "test", "original"),
               "collage_classes": _at_least(0), "collage_per_class": _at_least(1)}


@dataclass
class PredictStageConfig(StageConfig, ObjectMaskSourceFields):
    """Stage ``predict``: parts of any images (a file or a folder) with a stage-4 or stage-6 model.

    ``images``: an image file or a folder (searched recursively; default ``<paths.root>/images``).
    ``checkpoint``: a run folder (its newest checkpoint, or ``iteration``) or a ``.pth`` file
    (default: the stage-6 run of ``data``).
    ``mask_source``: where each image's object mask comes from: ``whole_image`` (no mask),
    ``grabcut``, ``annotations`` (a COCO json, ``annotations``) or ``detic`` (``model.weights``
    and the object classes' vocabulary, as in stage 1). ``object_class``: the object class
    (name or index) a PartDistillation model segments the parts of; null: the class the
    mask source found (a wnid or a words-file name is looked up in the model's classes).
    Parts scoring below ``min_score`` are dropped and the best ``max_parts`` of each object
    kept (the model gives one label per pixel, so by default every part is kept). The mask
    sources' settings (``fit_size``, ``annotations``, ``grabcut_*``, Detic's): as in stage 1,
    :class:`ObjectMaskSourceFields`.
    """

    name: str = "predict"
    images: str = MISSING
    checkpoint: str = MISSING
    iteration: Optional[int] = None
    mask_source: str = "whole_image"
    object_class: Optional[str] = None
    max_objects: int = 1  # the best objects of the mask source, each segmented into parts
    min_score: float = 0.0
    max_parts: int = 20

    _checks = {"mask_source": _one_of("whole_image", "grabcut", "annotations", "detic"),
               "iteration": _at_least(0), "max_objects": _at_least(1), "min_score": _ratio(),
               "max_parts": _at_least(1)}


@dataclass
class SupervisedLearningStageConfig(TrainStageConfig, PartDatasetFields):
    """The supervised baseline: Mask2Former trained on a part dataset's labelled split.

    ``variant``: ``proposal`` (one class-agnostic foreground class, like stage 4) or
    ``semantic`` (one class per part class of the dataset, not object-conditioned: the
    reference's ``NUM_CLASSES`` head). Reference (``supervised_learning/*.sh``): from the
    COCO instance weights, nothing frozen, batch 128 on 4 x 8 GPUs, lr 1e-4, 20k
    iterations (its steps at 40k/45k never act), importance-sample ratio 0.75.
    """

    name: str = "supervised_learning"
    variant: str = "semantic"
    split: str = "train"
    batch_size: int = 128
    per_device_batch: int = 4
    max_iter: int = 20_000
    steps: list[int] = field(default_factory=lambda: [40_000, 45_000])
    min_object_area_ratio: float = 0.0  # ground truth: every labelled object is used
    min_part_area_ratio: float = 0.0  # after augmentation keep every non-empty part
    freeze_backbone: bool = False
    freeze_encoder: bool = False
    importance_sample_ratio: float = 0.75

    @classmethod
    def model_kind(cls, stage: Mapping[str, Any]) -> Optional[str]:
        return "proposal" if stage.get("variant") == "proposal" else "semantic"

    _checks = {"variant": _one_of("proposal", "semantic"),
               "importance_sample_ratio": _ratio()}


@dataclass
class FewshotLearningStageConfig(SupervisedLearningStageConfig):
    """The few-shot baseline: a PartDistillation model (``checkpoint``: a stage-6 run folder,
    its newest checkpoint, or a checkpoint file) fine-tuned on ``percent`` % of the labelled
    images of ``split``, chosen by ``subset_seed`` (``data.labelled_records.fewshot_subset``)
    and saved as ``fewshot_subset.json`` in the run folder. Class head re-initialised for the
    variant's classes. Reference (``fewshot_learning/*.sh``): 1 node x 8 GPUs, batch 32."""

    name: str = "fewshot_learning"
    checkpoint: str = "${paths.part_distillation}"
    percent: float = 1.0
    subset_seed: int = 0
    batch_size: int = 32

    _checks = {"percent": (lambda v: 0 < v <= 100, "in (0, 100]")}


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


def stage_schemas() -> dict[str, type[StageConfig]]:
    """Stage name -> schema: every ``StageConfig`` subclass whose ``name`` has a default (the
    stage's name; bases such as ``TrainStageConfig`` have none). The one list of the stages:
    the registry (``part_distillation.stages``) finds each stage's module by this name."""
    found: dict[str, type[StageConfig]] = {}
    todo = list(StageConfig.__subclasses__())
    while todo:
        schema = todo.pop()
        todo += schema.__subclasses__()
        if not schema.__module__ == __name__:
            continue  # a schema defined elsewhere (a test's) is not a stage of the package
        name = next(f.default for f in fields(schema) if f.name == "name")
        if isinstance(name, str) and name != MISSING:
            if found.get(name, schema) is not schema:
                raise TypeError(f"stage {name!r} has two schemas: {found[name].__name__} and {schema.__name__}")
            found[name] = schema
    return dict(sorted(found.items()))


def config_dir() -> str:
    """``configs/`` of the source tree, or the copy installed as package data."""
    from importlib import resources
    from pathlib import Path

    source_tree = Path(__file__).resolve().parents[1] / "configs"
    if (source_tree / "config.yaml").is_file():
        return str(source_tree)
    return str(resources.files("part_distillation") / "configs")


def register_configs() -> None:
    """Register every schema once; YAML files in ``configs/`` extend them."""
    import warnings

    # Our configs/hydra/launcher/submitit_*.yaml extend the plugin's schema of the same name
    # on purpose (resources come from `launcher.*`); Hydra warns about that pattern.
    warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema")
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="schema/data", name="imagenet", node=DataConfig)
    cs.store(group="schema/model", name="model", node=ModelConfig)
    for name, schema in stage_schemas().items():
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
    if run.stage.name not in stage_schemas():
        raise ConfigError(f"config key 'stage.name' = {run.stage.name!r} is invalid: "
                          f"expected one of {sorted(stage_schemas())}")
    return run
