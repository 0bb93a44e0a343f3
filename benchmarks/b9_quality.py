"""B9: does the pipeline learn parts? Held-out quality of its pseudo-labels, its trained models
and two baselines, on the synthetic part dataset in both appearance variants.

Per variant (``--variants``; ``distinct``: each part its own colour; ``shared``: all parts of
an object share one appearance, so colour cannot find them) the synthetic generator writes a
training split (``train``, with its disjoint halves ``train_match`` / ``train_eval``) and a
held-out split (``heldout``: the same classes, other images). The project's stages run
in-process through ``launch.compose_config`` / ``launch.run_job`` with the ``demo``
experiment's settings (``configs/stage_tuning/demo_*.yaml``), as the demo runs them:

- stages 1-3 (index, object masks from the annotations, pixel grouping, dense CRF) on
  ``train`` and on ``heldout``, so the pseudo-labels can be scored on held-out images;
- stage 4 (proposal learning), stage 5 (part ranking) and stage 6 (PartDistillation) on
  ``train`` only, a checkpoint every ``--curve-every`` iterations (all kept);
- stage 5's label pass on ``heldout`` with the training run's stage-4 model and part classes
  (``stage.part_classes``): the part-ranking labels of held-out images, what stage 6 learns from.

Then on ``heldout`` (``evaluation.scoring.evaluate_in_memory``, the evaluate stage's per-image code)
it scores pixel grouping's, dense CRF's and part ranking's records, the final stage-4 and stage-6 models,
box strips and k-means of colour + position (K = ``--k``, default the parts per object): mean best-match
IoU (each true part to its best segment; proposals: the top K one-label masks, those with
a cluster), AR@1/AR@10 in the ``overlapping`` setting (no filter; a PartDistillation model's
masks are its only set, its ``one-label`` AR) and C-mIoU / A-mIoU under the strict
protocol, clusters matched to parts on ``train_match`` (training images, never held-out
ones). Every predictor is scored at the images' own size (as ``stage.score_size=original``),
so all rows are measured on the same pixels. The training
curve is the held-out best-match IoU (and AR@10) of every saved stage-4 and stage-6
checkpoint.

A model stage that fails at a small size (part ranking finds no part classes among the few
proposals of a barely trained stage-4 model) does not end the run: that model's row has no
figures and the reason is printed under the table. Prints a Markdown table per variant and
the curves; writes ``b9_quality.json`` (tables, curves, margins, settings),
``b9_quality.md`` and the curves' plots ``b9_curves_<variant>.png`` in ``--out`` (default ``benchmarks_output/b9``, git-ignored); the last
line gives each model's margin over each baseline (percentage points):
``B9 distinct: s4-vs-crf bestIoU +5.0 AR10 +3.1 C-mIoU ... | ...; shared: ...``. All figures are percentages.

    .venv/bin/python benchmarks/b9_quality.py        # the demo's model and recipe: 4 classes x 12 images, 400 it.
    .venv/bin/python benchmarks/b9_quality.py --set proposal_learning:stage.lr=3e-4 --out benchmarks_output/b9_lr
    .venv/bin/python benchmarks/b9_quality.py --variants shared --images 6 --iters 20 --curve-every 10
    .venv/bin/python benchmarks/b9_quality.py --tune --k 6 --out benchmarks_output/b9_k6   # over-clustering: K > parts
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from _common import limit_threads, threads_from_argv  # noqa: E402

limit_threads(threads_from_argv())

#: The rows of each table: label -> what it is.
ROWS = {
    "pixel_grouping": "pixel grouping records (stage 2)",
    "dense_crf": "dense-CRF records (stage 3)",
    "part_ranking": "part-ranking labels (stage 5)",
    "proposal": "stage-4 proposal model (top K)",
    "part_distillation": "stage-6 PartDistillation model",
    "strips": "box strips (K along the longer side)",
    "colour_kmeans": "k-means of colour + position",
}
MODELS = {"s4": "proposal", "s6": "part_distillation"}
BASELINES = {"grouping": "pixel_grouping", "crf": "dense_crf", "rank": "part_ranking", "strips": "strips",
             "kmeans": "colour_kmeans"}
COLUMNS = ("bestIoU", "AR@1", "AR@10", "C-mIoU", "A-mIoU")
#: The AR setting of the table (the published stage-one AR), where a predictor has it.
AR_SETTING = "overlapping"
TOP_K = (1, 10)
HELDOUT, MATCH = "heldout", "train_match"
TRAIN_STAGES = ("synthetic_data", "index", "detic_labeling", "pixel_grouping", "dense_crf",
                "proposal_learning", "part_ranking", "part_distillation")
HELDOUT_STAGES = ("synthetic_data", "index", "detic_labeling", "pixel_grouping", "dense_crf")
#: Run on ``heldout`` after training: with the training run's stage-4 model.
HELDOUT_MODEL_STAGES = ("part_ranking",)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mask2former_effnet",
                        help="the Mask2Former of stages 4-6 (a configs/model name; default: the demo's)")
    parser.add_argument("--variants", default="distinct,shared", help="comma-separated: distinct, shared")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--images", type=int, default=12, help="training images per class (the demo's 12)")
    parser.add_argument("--heldout-images", type=int, default=12, help="held-out images per class")
    parser.add_argument("--tune", action="store_true",
                        help="choosing a recipe: score on the split 'tune' (other images of the same generator, "
                             "apart from train and heldout) instead of the held-out split, which stays unseen")
    parser.add_argument("--parts", type=int, default=4, help="parts per object of the synthetic images")
    parser.add_argument("--k", type=int, default=None,
                        help="K of every predictor: stage-2 parts per object, stage-5 part classes per object "
                             "class, segments of the baselines (default: --parts)")
    parser.add_argument("--iters", type=int, default=400, help="stage-4 and stage-6 iterations (the demo's 400)")
    parser.add_argument("--curve-every", type=int, default=100, help="a checkpoint (curve point) every N iterations")
    parser.add_argument("--set", action="append", default=[], metavar="STAGE:KEY=VALUE",
                        help="an extra override of one stage, e.g. proposal_learning:stage.lr=3e-4 (repeatable)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks_output" / "b9"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reuse", action="store_true",
                        help="keep the outputs already in --out (stages made with the same settings are skipped); "
                             "default: start afresh")
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    args.scored = "tune" if args.tune else HELDOUT
    bad = [v for v in args.variants if v not in ("distinct", "shared")]
    if bad or not args.variants:
        parser.error(f"--variants: expected distinct and/or shared, got {args.variants}")
    if args.images < 2:
        parser.error("--images must be >= 2 (the strict protocol matches on half of the training images)")
    args.k = args.parts if args.k is None else args.k
    if min(args.iters, args.curve_every, args.heldout_images, args.classes) < 1 or min(args.parts, args.k) < 2:
        parser.error("--iters, --curve-every, --heldout-images, --classes must be >= 1 and --parts, --k >= 2")
    for entry in args.set:
        if entry.partition(":")[0] not in TRAIN_STAGES or "=" not in entry:
            parser.error(f"--set {entry!r}: expected STAGE:KEY=VALUE with STAGE one of {list(TRAIN_STAGES)}")
    return args


# --------------------------------------------------------------------------- running the stages

def stage_overrides(args, root: Path, variant: str, split: str, names: tuple[str, ...] | None = None
                    ) -> dict[str, list[str]]:
    """Each stage's command-line overrides (on top of ``experiment=demo``) for one split
    (``names``: those stages; default: the split's stages 1-6 or 1-3)."""
    steps = f"[{max(1, int(0.8 * args.iters))}]"
    train = [f"stage.max_iter={args.iters}", f"stage.steps={steps}", f"stage.checkpoint_period={args.curve_every}",
             "stage.keep_last=100000", f"stage.preview_period={args.iters}"]
    per_stage = {
        "synthetic_data": [f"stage.classes={args.classes}", f"stage.parts_per_class={args.parts}",
                           f"stage.images_per_class={args.images if split == 'train' else args.heldout_images}",
                           f"stage.appearance={variant}"],
        "pixel_grouping": [f"stage.num_parts={args.k}"],
        "proposal_learning": train,
        "part_ranking": [f"stage.num_clusters={args.k}"] + ([   # held-out: the training run's model and classes
            f"stage.proposal_run={root / 'outputs' / 'proposal_learning' / 'synthetic_train'}",
            f"stage.part_classes={root / 'pseudo_labels' / 'part_labels' / 'part_ranking' / 'synthetic_train'}"]
            if split != "train" else []),
        "part_distillation": [*train, f"stage.parts_per_class={args.k}"],
    }
    for entry in args.set:
        name, _, override = entry.partition(":")
        per_stage.setdefault(name, []).append(override)
    common = ["experiment=demo", f"paths.root={root}", f"model={args.model}", f"data.split={split}",
              f"data.name=synthetic_{split}"]
    names = names or (TRAIN_STAGES if split == "train" else HELDOUT_STAGES)
    return {name: common + per_stage.get(name, []) for name in names}


#: Stages whose failure leaves the benchmark running: a model that could not be trained at a
#: small size (e.g. part ranking finds too few proposals of a barely trained stage-4 model for K
#: part classes) is a row without figures, and the reason is reported.
MODEL_STAGES = ("proposal_learning", "part_ranking", "part_distillation")


def run_stages(overrides: dict[str, list[str]], what: str, failures: dict[str, str]) -> dict[str, float]:
    """Run the stages in order in this process; their wall seconds. A model stage that fails
    (``launch.JobFailed``) goes into ``failures`` with its message and the later stages are skipped."""
    from part_distillation import launch

    seconds = {}
    for name, args in overrides.items():
        if failures:
            failures.setdefault(name, f"not run: {next(iter(failures))} failed")
            continue
        start = time.perf_counter()
        try:
            launch.run_job(launch.compose_config([f"stage={name}", *args]))
        except launch.JobFailed as err:
            if name not in MODEL_STAGES:
                raise
            failures[name] = str(err)
            print(f"  {what}: {name} FAILED: {err}", flush=True)
            continue
        seconds[name] = time.perf_counter() - start
        print(f"  {what}: {name} {seconds[name]:.1f} s", flush=True)
    return seconds


# --------------------------------------------------------------------------- scoring

def records(folder: Path) -> dict[str, dict]:
    """A stage's records by real image path (as ``RecordsPredictor.from_store``)."""
    from part_distillation.store import RecordStore

    return {os.path.realpath(r["path"]): r for r in RecordStore(folder).iter_records()}


def score(predictor, samples: dict, num_parts: int, match: bool = True) -> dict:
    """The held-out row of one predictor: the strict protocol (matched on ``train_match``)."""
    from part_distillation.evaluation.scoring import evaluate_in_memory

    scored = next(s for s in samples if s != MATCH)
    splits = samples if match else {scored: samples[scored]}
    result = evaluate_in_memory(predictor, splits, scored, MATCH if match else None, num_parts, top_k=TOP_K,
                                at_test_size=False)
    strict = result["strict"]
    ar = strict.get(AR_SETTING) or strict["one-label"]   # a part segmentation's masks: its only set
    return {c: _number((ar if c.startswith("AR@") else strict).get(c)) for c in COLUMNS} | {"images": result["images"]}


def _number(value) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def evaluate_variant(args, root: Path) -> tuple[dict, dict]:
    """The table (label -> metrics) and the curves (model -> [{iteration, bestIoU, AR@10}])."""
    from part_distillation.data.part_datasets import open_part_dataset
    from part_distillation.engine.checkpoint import list_checkpoints
    from part_distillation.evaluation.predictors import (ColourKMeansPredictor, ModelPredictor, RecordsPredictor,
                                                         StripsPredictor)
    from part_distillation.inference import TrainedModel

    data = root / "datasets" / "synthetic"
    datasets = {args.scored: open_part_dataset("partimagenet", data, args.scored, data / args.scored),
                MATCH: open_part_dataset("partimagenet", data, MATCH, data / "train")}
    samples = {split: list(d.samples()) for split, d in datasets.items()}
    num_parts = max(d.num_parts for d in datasets.values())
    labels, outputs = root / "pseudo_labels" / "part_labels", root / "outputs"
    runs = {"proposal": outputs / "proposal_learning" / "synthetic_train",
            "part_distillation": outputs / "part_distillation" / "synthetic_train"}
    predictors = {}
    for label, folder in (("pixel_grouping", "proposal_generation"), ("dense_crf", "proposal_generation_dcrf"),
                          ("part_ranking", "part_ranking")):
        if not (labels / folder / f"synthetic_{args.scored}").is_dir():   # part ranking, when stage 4 failed
            continue
        found = {**records(labels / folder / "synthetic_train"), **records(labels / folder / f"synthetic_{args.scored}")}
        predictors[label] = RecordsPredictor(found, label, args.k)
    runs = {kind: run for kind, run in runs.items() if list_checkpoints(run)}   # the others failed to train
    for kind, run in runs.items():
        predictors[kind] = ModelPredictor(TrainedModel.load(run), kind, args.k)
    predictors["strips"] = StripsPredictor(args.k)
    predictors["colour_kmeans"] = ColourKMeansPredictor(args.k)
    table = {}
    for label in ROWS:
        if label not in predictors:
            table[label] = {c: None for c in COLUMNS} | {"images": 0}
            continue
        start = time.perf_counter()
        table[label] = score(predictors[label], samples, num_parts)
        print(f"  scored {label} on {table[label]['images']} {args.scored} images ({time.perf_counter() - start:.1f} s)",
              flush=True)
    curves = {kind: [] for kind in MODELS.values()}
    for kind, run in runs.items():
        for iteration, path in list_checkpoints(run):
            row = score(ModelPredictor(TrainedModel.load(path), kind, args.k), samples, num_parts, match=False)
            curves[kind].append({"iteration": iteration, "bestIoU": row["bestIoU"], "AR@10": row["AR@10"]})
    return table, curves


# --------------------------------------------------------------------------- reporting

def markdown(table: dict, scored: str = HELDOUT) -> str:
    header = [f"{c} ({AR_SETTING})" if c.startswith("AR@") else c for c in COLUMNS]
    lines = [f"| predictor ({scored}) | " + " | ".join(header) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for label, row in table.items():
        lines.append(f"| {ROWS[label]} | " + " | ".join(_fmt(row[c]) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def curves_text(curves: dict) -> str:
    return "\n".join(f"  {kind} held-out bestIoU by iteration: " + ", ".join(
        f"{p['iteration']}: {_fmt(p['bestIoU'])}" for p in points) for kind, points in curves.items())


def margins(table: dict) -> dict[str, dict[str, float | None]]:
    """``{"s4-vs-crf": {"bestIoU": +5.0, "AR@10": ..., "C-mIoU": ...}, ...}`` (model minus baseline)."""
    out = {}
    for short, model in MODELS.items():
        for base_short, base in BASELINES.items():
            out[f"{short}-vs-{base_short}"] = {
                c: (None if table[model][c] is None or table[base][c] is None else table[model][c] - table[base][c])
                for c in ("bestIoU", "AR@10", "C-mIoU")}
    return out


def b9_line(all_margins: dict[str, dict]) -> str:
    parts = []
    for variant, pairs in all_margins.items():
        cells = [f"{pair} bestIoU {_signed(m['bestIoU'])} AR10 {_signed(m['AR@10'])} C-mIoU {_signed(m['C-mIoU'])}"
                 for pair, m in pairs.items()]
        parts.append(f"{variant}: " + " | ".join(cells))
    return "B9 " + "; ".join(parts)


def write_curves_png(curves: dict, path: Path, title: str) -> None:
    from part_distillation.viz import write_curves

    write_curves(path, {kind: [(p["iteration"], p["bestIoU"]) for p in points if p["bestIoU"] is not None]
                        for kind, points in curves.items()}, title, ylabel="best-match IoU (%)")


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.1f}"


def _signed(value) -> str:
    return "n/a" if value is None else f"{value:+.1f}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log_file = out / "b9_quality.log"
    handler = logging.FileHandler(log_file, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("part_distillation").addHandler(handler)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "reuse")}
    print(f"B9 settings: {json.dumps(settings)}; stage logs in {log_file}", flush=True)
    results, all_margins, markdown_text = {}, {}, []
    for variant in args.variants:
        root = out / variant
        if root.exists() and not args.reuse:   # afresh: the stages would refuse outputs of other settings
            shutil.rmtree(root)
        print(f"[{variant}] root {root}", flush=True)
        start = time.perf_counter()
        failures: dict[str, str] = {}
        seconds = run_stages(stage_overrides(args, root, variant, args.scored), args.scored, failures)
        seconds.update({f"train/{k}": v for k, v in
                        run_stages(stage_overrides(args, root, variant, "train"), "train", failures).items()})
        if "part_ranking" not in failures:
            heldout_failures: dict[str, str] = {}
            seconds.update({f"heldout/{k}": v for k, v in run_stages(
                stage_overrides(args, root, variant, args.scored, HELDOUT_MODEL_STAGES), args.scored,
                heldout_failures).items()})
            failures.update({f"{k} (held-out)": v for k, v in heldout_failures.items()})
        table, curves = evaluate_variant(args, root)
        all_margins[variant] = margins(table)
        text = markdown(table, args.scored)
        header = (f"### {variant}: {args.classes} classes x {args.images} training / {args.heldout_images} {args.scored} "
                  f"images, K={args.k}, {args.iters} iterations, model={args.model} (strict protocol, "
                  f"matched on {MATCH})\n\n")
        notes = "".join(f"  {name}: {message}\n" for name, message in failures.items())
        markdown_text.append(header + text + "\n" + curves_text(curves) + "\n" + notes)
        print("\n" + header + text + curves_text(curves) + "\n" + notes, flush=True)
        write_curves_png(curves, out / f"b9_curves_{variant}.png", f"B9 {variant}: {args.scored} bestIoU while training")
        results[variant] = {"table": table, "curves": curves, "margins": all_margins[variant],
                            "failed_stages": failures, "stage_seconds": seconds,
                            "seconds": time.perf_counter() - start}
    payload = {"benchmark": "B9", "settings": settings, "columns": list(COLUMNS), "rows": ROWS, "variants": results}
    (out / "b9_quality.json").write_text(json.dumps(payload, indent=2))
    line = b9_line(all_margins)
    (out / "b9_quality.md").write_text("\n".join(markdown_text) + "\n" + line + "\n")
    logging.getLogger("part_distillation").removeHandler(handler)
    handler.close()
    print(f"written: {out / 'b9_quality.json'}, {out / 'b9_quality.md'}")
    print(line, flush=True)
    return payload


if __name__ == "__main__":
    main()
