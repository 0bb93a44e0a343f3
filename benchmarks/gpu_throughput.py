"""GPU throughput: what one GPU does per second in each heavy step of the pipeline.

Sections (``--sections``, all by default), each measured the way its stage runs it:

* ``stage4``: a proposal-learning training step (stage 4) of the Swin-L reference model
  (``swin_l_coco_instance``, one foreground class), backbone and pixel-decoder encoder
  frozen by name (``FREEZE_NAME_KEYS``, frozen modules follow ``train()``), the engine's
  own step (``engine.train_loop.Trainer``: float16 autocast with a grad scaler on CUDA,
  unscale, clipping 0.01, AdamW over ``engine.optim.build_adamw``) and loss
  (``stages.training.reference_criterion``, 12544 points per mask), at ``--batch`` images
  per GPU (8, the reference's per-device batch) of ``--size`` (640) pixels, targets 4
  random-box parts;
* ``stage6``: the same step with the object-conditioned head (stage 6): ``--objects``
  classes x K = 8 parts + 1 outputs, each image's object class selecting its K + 1 rows
  (``stages.training.conditioned_forward``);
* ``detic``: object-mask inference (stage 1) of the native Detic Swin-B under its
  labelling preset (fitted to 640, score 0.02, NMS 0.5, up to 1000 detections, the top 10
  of the image's class get masks: ``models.object_masks.DeticSource``), a vocabulary of
  ``--objects`` classes, images fitted to 640x480, the stage's batch;
* ``grouping``: pixel grouping (stage 2): normalisation, Swin-L res3+res4 features,
  k-means K=4 with 10 restarts inside one object per image, labels back on the host
  (``models.grouping``), the stage's batch;
* ``cpu_model``: the CPU Mask2Former (``--cpu-model``: a ``configs/model`` name, a
  ``model.size`` or a spec name) on the GPU: its stage-4 training step (as above) and its
  inference forward pass, at ``--batch`` images of ``--cpu-model-size`` pixels; a name this
  version of the project does not know is reported as not available.

Weights are random (nothing is downloaded; the EfficientNet backbone's ImageNet weights come
from its installed package): the cost does not depend on their values, except Detic's,
where random scores change how many detections pass the threshold before NMS (the mask
head, the costly part, only runs on the 10 kept ones).

Each section: its model built, ``--warmup`` untimed steps, then timed steps, each between
``torch.cuda.synchronize()`` calls, until ``--steps`` steps or ``--section-s`` seconds,
whichever comes first; a section is skipped when the whole run's ``--budget-s`` is spent,
so the script ends within about 10 minutes on one H100/H200. images/s = images of the timed
steps / their time. Memory: ``torch.cuda.max_memory_allocated()`` (peak of tensors, reset
at the start of each section, so weights, gradients, optimiser state and activations
count), and the allocator's reserved peak beside it. A section that fails (out of memory,
say) prints its error in its row and the others still run.

    .venv/bin/python benchmarks/gpu_throughput.py                       # on a GPU node, ~8 min
    .venv/bin/python benchmarks/gpu_throughput.py --out gpu.json        # also the figures as JSON
    .venv/bin/python benchmarks/gpu_throughput.py --sections stage4,stage6 --batch 4
    .venv/bin/python benchmarks/gpu_throughput.py --dry-run             # CPU, tiny sizes: the code paths only

``--dry-run`` runs every section on the CPU with tiny sizes (the demo's tiny Mask2Former and
the tiny Detic, 1 image of 128 pixels, 1 warm-up and 2 timed steps, 3 object classes); its
figures only prove that the code runs (memory there: the process's peak resident set minus
its resident set at the section's start, an upper bound). The last line:
``GPU mode=... stage4_images_per_s=... stage4_peak_gb=... stage6_... detic_images_per_s=...
grouping_images_per_s=... cpu_model_train_images_per_s=... cpu_model_infer_images_per_s=...``.
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from _common import limit_threads, threads_from_argv  # noqa: E402

limit_threads(threads_from_argv(2 if "--dry-run" in sys.argv else 8))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from part_distillation.config import DeticStageConfig, PartDistillationStageConfig, PixelGroupingStageConfig, \
    TrainStageConfig  # noqa: E402

SECTIONS = ("stage4", "stage6", "detic", "grouping", "cpu_model")
NOT_AVAILABLE = "not available in this version"


@dataclass
class Settings:
    """Sizes of one run: the GPU's (the reference's) or the dry run's (tiny, CPU)."""

    label: str
    device: torch.device
    spec: str  # the Mask2Former of stages 2, 4 and 6
    detic: str  # the Detic architecture
    size: int  # training image side; Detic and grouping images are fitted to it (4:3)
    batch: int  # training and CPU-model images per GPU
    objects: int  # object classes: stage 6's head, Detic's vocabulary
    stage_batch: bool = True  # Detic and grouping at their stage's batch (else 1 image)
    parts: int = PartDistillationStageConfig.parts_per_class
    num_points: int = TrainStageConfig.num_points
    warmup: int = 2
    steps: int = 20
    section_s: float = 40.0
    budget_s: float = 480.0
    cpu_model: str = "mask2former_effnet"
    cpu_model_size: int = 640


@dataclass
class Row:
    section: str
    model: str
    batch: int
    size: str
    images_per_s: float | None = None
    peak_gb: float | None = None
    reserved_gb: float | None = None
    step_ms: float | None = None  # median timed step
    steps: int = 0
    note: str = ""
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- timing and memory


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return 0.0


class PeakMemory:
    """Peak memory of one section: CUDA's allocator peak (reset at entry), or on CPU the
    process's peak RSS minus its RSS at entry (an upper bound: the peak is process-wide)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        self.rss_start = _rss_gb()
        return self

    def __exit__(self, *exc) -> None:
        pass

    def peak_gb(self) -> tuple[float, float | None]:
        """(allocated peak, reserved peak) in GiB; reserved is None on CPU."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) / 2**30,
                    torch.cuda.max_memory_reserved(self.device) / 2**30)
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
        return max(0.0, peak_rss - self.rss_start), None


def timed_steps(step, s: Settings, seconds: float) -> list[float]:
    """``s.warmup`` untimed calls, then timed ones (each between synchronisations) until
    ``s.steps`` calls or ``seconds`` have passed (at least one)."""
    for _ in range(s.warmup):
        step()
    _sync(s.device)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < s.steps and (not times or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        step()
        _sync(s.device)
        times.append(time.perf_counter() - t0)
    return times


def fill(row: Row, times: list[float], images_per_step: int, memory: PeakMemory) -> Row:
    row.steps = len(times)
    row.images_per_s = images_per_step * len(times) / sum(times)
    row.step_ms = statistics.median(times) * 1e3
    row.peak_gb, row.reserved_gb = memory.peak_gb()
    return row


# --------------------------------------------------------------------------- inputs


def _box_parts(g: torch.Generator, height: int, width: int, parts: int = 4) -> torch.Tensor:
    masks = torch.zeros(parts, height, width, dtype=torch.bool)
    for k in range(parts):
        y = int(torch.randint(0, height // 2, (1,), generator=g))
        x = int(torch.randint(0, width // 2, (1,), generator=g))
        masks[k, y:y + height // 3, x:x + width // 3] = True
    return masks


def training_batch(batch: int, size: int, device: torch.device, *, parts_per_class: int | None = None,
                   objects: int = 1) -> dict:
    """A collated batch (``data.part_records.collate``, the engine's input) on ``device``:
    random images, 4 random-box parts each; part labels 0 (stage 4) or cluster ids 0..K-1
    and an object class per image (stage 6)."""
    from part_distillation.data.part_records import collate

    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(batch):
        masks = _box_parts(g, size, size)
        labels = (torch.randint(0, parts_per_class, (len(masks),), generator=g) if parts_per_class
                  else torch.zeros(len(masks), dtype=torch.int64))
        samples.append({"key": f"image{i}", "image": torch.randint(0, 256, (3, size, size), generator=g,
                                                                    dtype=torch.uint8),
                        "masks": masks, "labels": labels,
                        "class_index": int(torch.randint(0, objects, (1,), generator=g))})
    out = collate(samples)
    out["pixel_values"] = out["pixel_values"].to(device)
    out["targets"] = [{k: v.to(device) for k, v in t.items()} for t in out["targets"]]
    out["class_indices"] = out["class_indices"].to(device)
    return out


def fitted_images(count: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """Random RGB uint8 images already fitted to ``size`` (4:3, longer side = ``size``)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size * 3 // 4, size, 3), dtype=np.uint8) for _ in range(count)]


def ellipse(height: int, width: int) -> np.ndarray:
    """A centred ellipse over half of each side: one object per image."""
    y, x = np.ogrid[:height, :width]
    return ((y - height / 2) / (height / 4)) ** 2 + ((x - width / 2) / (width / 4)) ** 2 <= 1


# --------------------------------------------------------------------------- sections


def _train_row(section: str, model_name: str, model, s: Settings, seconds: float, memory: PeakMemory, *,
               size: int, parts_per_class: int | None = None) -> Row:
    """The engine's training step (``Trainer``: AMP on CUDA, clipping, AdamW) on one batch, repeated."""
    from part_distillation.engine.optim import build_adamw
    from part_distillation.stages.training import mask2former_loss, reference_criterion
    from part_distillation.engine.train_loop import Trainer
    from part_distillation.models.mask2former import FREEZE_NAME_KEYS

    model.freeze(FREEZE_NAME_KEYS, frozen_mode=TrainStageConfig.frozen_mode)
    model.to(s.device)
    classes = parts_per_class or 1
    batch = training_batch(s.batch, size, s.device, parts_per_class=parts_per_class, objects=s.objects)
    forward = None
    if parts_per_class:
        from part_distillation.stages.training import conditioned_forward

        forward = conditioned_forward(s.device)
    loss_fn = mask2former_loss(reference_criterion(classes, num_points=s.num_points).to(s.device), s.device, forward)
    trainer = Trainer(model, build_adamw(model, lr=TrainStageConfig.lr, weight_decay=TrainStageConfig.weight_decay),
                      lambda start: iter(lambda: batch, None), loss_fn, lambda it: TrainStageConfig.lr,
                      max_iter=1, global_batch=s.batch, clip_norm=TrainStageConfig.clip_grad_norm,
                      amp=TrainStageConfig.amp, device=s.device)

    def step():
        trainer.train(start_iter=0, max_iter=1)

    row = Row(section, model_name, s.batch, f"{size}x{size}")
    fill(row, timed_steps(step, s, seconds), s.batch, memory)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    row.extra = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "trainable_m": trainable / 1e6,
                 "amp": trainer.amp, "final_loss": float(trainer.metrics.get("total_loss", float("nan")))}
    row.note = ("AMP float16" if trainer.amp else "float32") + f", {row.extra['trainable_m']:.1f} M trainable"
    return row


def section_stage4(s: Settings, seconds: float) -> list[Row]:
    from part_distillation.models.checkpoint import build_model

    with PeakMemory(s.device) as memory:
        torch.manual_seed(0)
        model = build_model(s.spec, None, num_classes=1)
        return [_train_row("stage4", s.spec, model, s, seconds, memory, size=s.size)]


def section_stage6(s: Settings, seconds: float) -> list[Row]:
    from part_distillation.models.checkpoint import build_model

    with PeakMemory(s.device) as memory:
        torch.manual_seed(0)
        model = build_model(s.spec, None, num_classes=s.objects * s.parts, parts_per_class=s.parts)
        row = _train_row("stage6", f"{s.spec} {s.objects}x{s.parts}+1", model, s, seconds, memory, size=s.size,
                         parts_per_class=s.parts)
        return [row]


def section_detic(s: Settings, seconds: float) -> list[Row]:
    from part_distillation.data.frame import ImageFrame
    from part_distillation.models.detic import DeticConfig, build_detic
    from part_distillation.models.object_masks import DeticSource, SourceImage

    stage = DeticStageConfig
    with PeakMemory(s.device) as memory:
        torch.manual_seed(0)
        config = DeticConfig.for_labeling(s.detic, min_size_test=s.size, score_thresh=stage.score_threshold,
                                          nms_thresh=stage.nms_threshold, detections_per_image=stage.max_detections)
        vocabulary = torch.nn.functional.normalize(torch.randn(s.objects, config.text_embed_dim), dim=1)
        model = build_detic(None, config, vocabulary=vocabulary, device=s.device)
        source = DeticSource(model, [f"class{i}" for i in range(s.objects)], stage.keep_top, stage.own_class_filter)
        images = [SourceImage(f"image{i}", image, ImageFrame(image.shape[:2], image.shape[:2]), i % s.objects)
                  for i, image in enumerate(fitted_images(stage.batch_size if s.stage_batch else 1, s.size))]
        kept = []

        def step():
            kept[:] = [len(masks) for masks in source(images)]

        row = Row("detic", f"detic {s.detic}", len(images), f"{images[0].image.shape[0]}x{s.size}")
        fill(row, timed_steps(step, s, seconds), len(images), memory)
        row.note = f"random weights, {s.objects} classes, masks kept per image {kept}"
        return [row]


def section_grouping(s: Settings, seconds: float) -> list[Row]:
    from part_distillation.data.batching import preprocess_images
    from part_distillation.models.grouping import ObjectToGroup, build_feature_source, group_pixels

    stage = PixelGroupingStageConfig
    levels = ("res3", "res4")
    with PeakMemory(s.device) as memory:
        torch.manual_seed(0)
        source = build_feature_source("mask2former", levels, pretrained=False, mask2former_spec=s.spec).to(s.device)
        images = fitted_images(stage.batch_size if s.stage_batch else 1, s.size)
        obj = torch.from_numpy(ellipse(*images[0].shape[:2]))
        timings = {"features": 0.0, "grouping": 0.0}

        def step():
            t0 = time.perf_counter()
            pixels = preprocess_images(images, device=s.device).pixel_values
            features = source(pixels)
            _sync(s.device)
            t1 = time.perf_counter()
            padded = tuple(pixels.shape[-2:])
            objects = []
            for i, image in enumerate(images):
                mask = torch.zeros(padded, dtype=torch.bool)
                mask[: image.shape[0], : image.shape[1]] = obj
                objects.append(ObjectToGroup(i, mask, tuple(image.shape[:2]), i))
            labels = group_pixels(features, objects, stage.num_parts, assignment=stage.assignment,
                                  normalize=stage.normalize_features, n_init=stage.kmeans_restarts)
            for label in labels:  # the stage writes them from the host
                if label is not None:
                    label.cpu().numpy()
            timings["features"] += t1 - t0
            timings["grouping"] += time.perf_counter() - t1

        row = Row("grouping", f"{s.spec} {'+'.join(levels)}", len(images), f"{images[0].shape[0]}x{s.size}")
        times = timed_steps(step, s, seconds)
        fill(row, times, len(images), memory)
        share = timings["grouping"] / max(timings["features"] + timings["grouping"], 1e-12)
        row.extra = {"grouping_share": share}
        row.note = f"K={stage.num_parts}, {stage.kmeans_restarts} restarts, k-means+labels {share:.0%} of the time"
        return [row]


def cpu_model_size(name: str) -> str:
    """The ``model.size`` of ``configs/model/<name>.yaml`` when there is one, else ``name`` itself."""
    path = ROOT / "configs" / "model" / f"{name}.yaml"
    if path.is_file():
        import yaml

        return str((yaml.safe_load(path.read_text()) or {}).get("size", name))
    return name


def build_cpu_model(name: str):
    """(size, model) of the CPU model, or (size, None) when this version knows no such model."""
    from part_distillation.models.checkpoint import build_model

    size = cpu_model_size(name)
    try:
        return size, build_model(size, None, num_classes=1)
    except KeyError:
        return size, None


def section_cpu_model(s: Settings, seconds: float) -> list[Row]:
    shape = f"{s.cpu_model_size}x{s.cpu_model_size}"
    with PeakMemory(s.device) as memory:
        torch.manual_seed(0)
        size, model = build_cpu_model(s.cpu_model)
        if model is None:
            note = f"{NOT_AVAILABLE} (model {s.cpu_model!r})"
            return [Row("cpu_model train", s.cpu_model, s.batch, shape, note=note),
                    Row("cpu_model infer", s.cpu_model, s.batch, shape, note=note)]
        train = _train_row("cpu_model train", size, model, s, seconds / 2, memory, size=s.cpu_model_size)
    model.zero_grad(set_to_none=True)  # the training step's gradients are not the inference's memory
    with PeakMemory(s.device) as memory:
        model.eval()
        pixels = training_batch(s.batch, s.cpu_model_size, s.device)["pixel_values"]

        def step():
            with torch.no_grad():
                model(pixels)

        infer = Row("cpu_model infer", size, s.batch, shape, note="float32, no gradients")
        fill(infer, timed_steps(step, s, seconds / 2), s.batch, memory)
        infer.extra = {"params_m": train.extra["params_m"]}
    return [train, infer]


RUNNERS = {"stage4": section_stage4, "stage6": section_stage6, "detic": section_detic,
           "grouping": section_grouping, "cpu_model": section_cpu_model}


# --------------------------------------------------------------------------- report


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(rows: list[Row], label: str) -> None:
    print(f"GPU throughput, {label}")
    header = f"{'section':<16} {'model':<36} {'batch':>5} {'size':>9} {'images/s':>9} {'peak GB':>8} " \
             f"{'reserved':>8} {'step ms':>8} {'steps':>5}  note"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.section:<16} {r.model[:36]:<36} {r.batch:>5} {r.size:>9} {_fmt(r.images_per_s):>9} "
              f"{_fmt(r.peak_gb):>8} {_fmt(r.reserved_gb):>8} {_fmt(r.step_ms, 0):>8} {r.steps:>5}  {r.note}",
              flush=True)


def summary_line(rows: list[Row], mode: str) -> str:
    by = {r.section.replace(" ", "_"): r for r in rows}
    fields = [f"mode={mode}"]
    for key in ("stage4", "stage6", "detic", "grouping", "cpu_model_train", "cpu_model_infer"):
        r = by.get(key)
        fields.append(f"{key}_images_per_s={_fmt(r.images_per_s) if r and r.images_per_s is not None else 'na'}")
        if key in ("stage4", "stage6", "cpu_model_train"):
            fields.append(f"{key}_peak_gb={_fmt(r.peak_gb) if r and r.peak_gb is not None else 'na'}")
    return "GPU " + " ".join(fields)


def settings_from_args(args) -> Settings:
    if args.dry_run:
        s = Settings(label="dry-run (CPU, tiny)", device=torch.device("cpu"), spec="demo_cpu", detic="tiny",
                     size=128, batch=1, stage_batch=False, objects=3, warmup=1, steps=args.steps or 2,
                     section_s=30.0, budget_s=args.budget_s,
                     num_points=1024, cpu_model=args.cpu_model, cpu_model_size=128)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_throughput: no CUDA device here; run it on a GPU node, or add --dry-run "
                             "for the CPU check of the code paths")
        s = Settings(label=f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}", device=torch.device("cuda"),
                     spec="swin_l_coco_instance", detic="swinb", size=args.size, batch=args.batch,
                     objects=args.objects, warmup=args.warmup, steps=args.steps or 20, section_s=args.section_s,
                     budget_s=args.budget_s, cpu_model=args.cpu_model, cpu_model_size=args.cpu_model_size)
    return s


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: prove the code paths run")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {list(SECTIONS)}")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    parser.add_argument("--batch", type=int, default=TrainStageConfig.per_device_batch, help="training images per GPU")
    parser.add_argument("--size", type=int, default=TrainStageConfig.image_size)
    parser.add_argument("--objects", type=int, default=1000, help="object classes (stage 6 head, Detic vocabulary)")
    parser.add_argument("--cpu-model", default="mask2former_effnet",
                        help="the CPU model: a configs/model name, a model.size or a spec name")
    parser.add_argument("--cpu-model-size", type=int, default=TrainStageConfig.image_size)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per section at most (20; dry run 2)")
    parser.add_argument("--section-s", type=float, default=40.0, help="timed seconds per section at most")
    parser.add_argument("--budget-s", type=float, default=480.0, help="sections starting later are skipped")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (read at start-up)")
    args = parser.parse_args(argv)
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {list(SECTIONS)}")
    s = settings_from_args(args)
    start = time.perf_counter()
    rows: list[Row] = []
    for name in sections:
        left = s.budget_s - (time.perf_counter() - start)
        if left <= 0:
            rows.append(Row(name, "-", 0, "-", note=f"skipped: --budget-s {s.budget_s:.0f} s spent"))
            continue
        try:
            rows.extend(RUNNERS[name](s, min(s.section_s, left)))
        except Exception as err:  # one failing section (out of memory, say) must not lose the others
            traceback.print_exc(file=sys.stderr)
            rows.append(Row(name, "-", 0, "-", note=f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"))
        gc.collect()
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(rows, s.label)
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.out:
        args.out.write_text(json.dumps({"label": s.label, "mode": "dry-run" if args.dry_run else "gpu",
                                        "settings": {k: str(v) for k, v in asdict(s).items()},
                                        "rows": [asdict(r) for r in rows]}, indent=2))
    print(summary_line(rows, "dry-run" if args.dry_run else "gpu"))
    return rows


if __name__ == "__main__":
    main()
