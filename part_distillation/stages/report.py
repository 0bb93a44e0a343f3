"""Stage ``report``: one Markdown page of what a run produced, ``stage.file``
(``${paths.root}/report.md``).

For each experiment of ``stage.experiments`` (default: this run's), the stages of its
pipeline are composed (as the pipeline composes them, with this run's overrides) to find
their outputs; the page then shows:

- the evaluation table: the evaluate stage's ``metrics.md`` as it is (a table is rendered
  from ``metrics.json`` when only that exists), and its PNGs (best/worst classes);
- the training curves: each training stage's periodic evaluation (``stage.eval_period``,
  read from its ``metrics.jsonl``), as a table and a plot (``<stage.output>/
  training_curves_<experiment>.png``);
- each stage's summary (records written, already done, skipped with reasons, time), read
  from the summaries the jobs saved next to their outputs (``summaries.record_summary``),
  summed over shards, so a run on SLURM reports like one in-process;
- the collages of the collage stage (``<collage output>/<stage>.png``).

Images are relative links, so the page reads in any Markdown viewer from where it lies.
Whatever is missing (a stage not run yet, no metrics, no collage) is said ("not run"),
never an error. The evaluation table is also logged, so a run ends with it.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping
from urllib.parse import quote

from part_distillation import stages as registry
from part_distillation.config import ReportStageConfig, RunConfig
from part_distillation.engine import read_metrics_log
from part_distillation.evaluation.tables import metric_cell, render_table
from part_distillation.launch.dag import compose_stage, own_overrides, stage_overrides
from part_distillation.progress import format_eta
from part_distillation.stages import SINGLE, TRAINING, StageSpec
from part_distillation.summaries import StageSummary, read_summaries

SPEC = StageSpec("report", ReportStageConfig, SINGLE, reported=False)

log = logging.getLogger("part_distillation")

@dataclass
class StageFolder:
    """One stage of an experiment's pipeline and the folder it writes."""

    name: str  #: the pipeline step (the stage, or <stage>@<tag>)
    output: str

    @property
    def stage(self) -> str:
        return registry.stage_of(self.name)


@dataclass
class ExperimentPlan:
    """What the report shows of one experiment: its stages in pipeline order."""

    experiment: str
    data: str
    stages: list[StageFolder] = field(default_factory=list)
    problem: str | None = None  #: why the stages could not be listed (said in the report)

    def output_of(self, stage: str) -> str | None:
        return next((s.output for s in self.stages if s.name == stage), None)


# --------------------------------------------------------------------------- planning

def plan_experiment(experiment: str, base: list[str]) -> ExperimentPlan:
    """The stages of ``experiment``'s pipeline with their outputs, composed from this run's
    overrides ``base`` (``paths.root=...`` and the like reach every stage, as in the pipeline)."""
    base = [o for o in base if not o.lstrip("+~").startswith("experiment")]
    if experiment not in (None, "default"):  # "default": no experiment= was given
        base.append(f"experiment={experiment}")
    try:
        pipeline = compose_stage(base + ["stage=pipeline"])
        names = [n for n in pipeline.stage.stages if registry.spec(registry.stage_of(n)).reported]
        per_stage = stage_overrides(pipeline.stage.overrides, pipeline.stage.stages)
        stages = []
        for n in names:
            stage = registry.stage_of(n)
            run = compose_stage(base + [f"stage={stage}"] + per_stage.get(n, []))
            stages.append(StageFolder(n, registry.spec(stage).output(run)))
    except Exception as err:  # a report never fails a run: it says what it could not read
        return ExperimentPlan(experiment, "?", problem=f"its stages could not be composed: {err}".splitlines()[0])
    return ExperimentPlan(experiment, pipeline.data.name, stages)


# --------------------------------------------------------------------------- summaries

@dataclass
class StageTotals:
    """A stage's saved summaries added up over its jobs (shards and ranks)."""

    jobs: int = 0
    job_count: int = 0  #: jobs the stage was run with (shard.count x world size)
    seen: int = 0
    written: int = 0
    already_done: int = 0
    skipped: dict = field(default_factory=dict)
    wall_s: float = 0.0  #: the longest job (jobs run side by side)
    cpu_s: float = 0.0  #: all jobs together
    finished: str = ""


def stage_totals(summaries: list[dict]) -> StageTotals | None:
    if not summaries:
        return None
    totals = StageTotals(jobs=len(summaries))
    for s in summaries:
        job = s.get("job") or {}
        totals.job_count = max(totals.job_count, int(job.get("shard_count", 1)) * int(job.get("world_size", 1)))
        totals.seen += int(s.get("seen", 0))
        totals.written += int(s.get("written", 0))
        totals.already_done += int(s.get("already_done", 0))
        for reason, n in (s.get("skipped") or {}).items():
            totals.skipped[reason] = totals.skipped.get(reason, 0) + int(n)
        totals.wall_s = max(totals.wall_s, float(s.get("wall_s", 0.0)))
        totals.cpu_s += float(s.get("cpu_s", 0.0))
        totals.finished = max(totals.finished, str(job.get("finished_utc", "")))
    return totals


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 60 else f"{value:.0f} s ({format_eta(value)})"


def stage_table(plan: ExperimentPlan, folder: Path) -> tuple[list[str], float]:
    """The Markdown rows of ``plan``'s stages and their total wall time (seconds)."""
    lines = ["| stage | jobs | records written | already done | skipped (reasons) | wall time | CPU time | output |",
             "|---|---|---|---|---|---|---|---|"]
    total = 0.0
    for stage in plan.stages:
        totals = stage_totals(read_summaries(stage.output, stage.stage))
        where = _link_text(stage.output, folder)
        if totals is None:
            lines.append(f"| {stage.name} | not run | | | | | | {where} |")
            continue
        total += totals.wall_s
        jobs = f"{totals.jobs}/{totals.job_count}" if totals.jobs != totals.job_count else str(totals.jobs)
        skipped = ", ".join(f"{reason}: {n}" for reason, n in sorted(totals.skipped.items())) or "none"
        lines.append(f"| {stage.name} | {jobs} | {totals.written} | {totals.already_done} | {skipped} | "
                     f"{_seconds(totals.wall_s)} | {_seconds(totals.cpu_s)} | {where} |")
    return lines, total


# --------------------------------------------------------------------------- evaluation

_AR = re.compile(r"^AR@(\d+)$")


def metrics_table(metrics: dict) -> str:
    """A Markdown table from ``metrics.json``: a row per dict holding AR@k / mIoU values
    (a protocol, or a predictor x protocol), labelled by its path in the file."""
    rows: list[tuple[str, dict]] = []

    def walk(node: dict, path: list[str]) -> None:
        if any(_AR.match(k) or k.endswith("mIoU") for k in node):
            rows.append((" / ".join(path) or "all", node))
        for key, value in node.items():  # and below: a protocol's AR settings (overlapping, one-label)
            if isinstance(value, dict):
                walk(value, path + [str(key)])

    walk(metrics, [])
    if not rows:
        return ""
    keys = {k for _, row in rows for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    columns = sorted((k for k in keys if _AR.match(k)), key=lambda k: int(_AR.match(k).group(1)))
    columns += [k for k in ("C-mIoU", "A-mIoU", "bestIoU") if k in keys]
    columns = columns or sorted(keys)

    return render_table(["predictions", *columns], ([label, *(metric_cell(row.get(c)) for c in columns)]
                                                     for label, row in rows))


def evaluation_table(evaluate_output: str | None, folder: Path) -> tuple[str | None, str]:
    """(the evaluation table in Markdown or None, where it came from or why there is none),
    paths as seen from ``folder``."""
    if evaluate_output is None:
        return None, "no evaluate stage in this experiment"
    where = Path(evaluate_output)
    md, js = where / "metrics.md", where / "metrics.json"
    try:
        if md.is_file():
            return md.read_text(encoding="utf-8").strip() + "\n", _link_text(md, folder)
        if js.is_file():
            table = metrics_table(json.loads(js.read_text(encoding="utf-8")))
            return (table, _link_text(js, folder)) if table else (None, f"{_link_text(js, folder)} holds no "
                                                                         f"AR or mIoU values")
    except (OSError, ValueError) as err:
        return None, f"the metrics in {_link_text(where, folder)} cannot be read: {err}"
    return None, f"not run (no metrics in {_link_text(where, folder)})"


# --------------------------------------------------------------------------- training curves

#: The curves drawn per training stage: a label and the ``metrics.jsonl`` keys it is read
#: from, the first one present (a proposal model has overlapping AR, a part model one-label AR).
CURVE_METRICS = (("bestIoU", ("eval/reference/bestIoU", "eval/strict/bestIoU")),
                 ("AR@10", ("eval/reference/overlapping/AR@10", "eval/reference/one-label/AR@10")))

Curves = dict[str, dict[str, list[tuple[int, float]]]]


def training_curves(plan: ExperimentPlan) -> Curves:
    """``{step: {"bestIoU": [(iteration, value), ...], "AR@10": [...]}}`` of the plan's training
    stages that evaluated while training (``stage.eval_period``); the others are left out."""
    out: Curves = {}
    for stage in plan.stages:
        if registry.spec(stage.stage).kind != TRAINING:
            continue
        lines = read_metrics_log(stage.output)
        curves = {}
        for label, keys in CURVE_METRICS:
            key = next((k for k in keys if any(k in line for line in lines)), None)
            if key is not None:
                curves[label] = [(int(line["iteration"]), float(line[key])) for line in lines if key in line]
        if curves:
            out[stage.name] = curves
    return out


def curves_table(curves: Curves) -> list[str]:
    """One row per stage and metric: its values by iteration."""
    rows = ([step, metric, ", ".join(f"{i}: {metric_cell(v)}" for i, v in points)]
            for step, by_metric in curves.items() for metric, points in by_metric.items())
    return render_table(["stage", "metric", "by iteration"], rows).rstrip("\n").splitlines()


def write_curves_png(curves: Curves, path: Path, experiment: str) -> Path:
    from part_distillation.viz import write_curves

    series = {f"{step} {metric}": points for step, by_metric in curves.items() for metric, points in by_metric.items()}
    return write_curves(path, series, f"{experiment}: periodic evaluation while training")


# --------------------------------------------------------------------------- links

def _link_text(path: str | os.PathLike, folder: Path) -> str:
    return f"`{_relative(path, folder)}`"


def _relative(path: str | os.PathLike, folder: Path) -> str:
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(folder))).as_posix()


def image_link(path: Path, folder: Path, title: str) -> str:
    """``![title](relative/path.png)``, the path URL-quoted so that any viewer finds it."""
    return f"![{title}]({quote(_relative(path, folder))})"


def _pngs(folder: str | None, order: list[str] = ()) -> list[Path]:
    """The PNGs of ``folder``: those named after ``order``'s stages first, in that order."""
    if folder is None or not Path(folder).is_dir():
        return []
    found = sorted(Path(folder).glob("*.png"))
    rank = {name: i for i, name in enumerate(order)}
    return sorted(found, key=lambda p: (rank.get(p.stem, len(rank)), p.name))


# --------------------------------------------------------------------------- the page

def build_report(plans: list[ExperimentPlan], folder: str | os.PathLike,
                 curves: Mapping[str, tuple[Curves, Path | None]] | None = None) -> tuple[str, list[tuple[str, str]]]:
    """The Markdown page for ``plans`` as seen from ``folder``, and the evaluation tables
    found ``[(experiment, table)]`` (for the log). ``curves``: per experiment, its training
    curves and their plot (:func:`training_curves`, :func:`write_curves_png`)."""
    folder = Path(folder)
    out = ["# PartDistillation run report", ""]
    names = ", ".join(f"`{p.experiment}` ({p.data})" for p in plans)
    out += [f"Experiments: {names}. Paths are relative to this file.", ""]
    tables = []

    out += ["## Evaluation", ""]
    for plan in plans:
        if plan.problem or plan.output_of("evaluate") is None:
            continue
        table, source = evaluation_table(plan.output_of("evaluate"), folder)
        out.append(f"### {plan.experiment} ({plan.data})")
        out.append("")
        if table is None:
            out += [f"Evaluation {source}.", ""]
        else:
            tables.append((plan.experiment, table))
            out += [f"From {source}:", "", table.rstrip("\n"), ""]
        for png in _pngs(plan.output_of("evaluate")):
            out += [f"**{png.stem}**", "", image_link(png, folder, f"{plan.experiment} evaluation {png.stem}"), ""]
    if not any(p.output_of("evaluate") for p in plans if not p.problem):
        out += ["No experiment here has an evaluate stage.", ""]

    out += ["## Training curves", "",
            "Each training stage's periodic evaluation (`stage.eval_period`; the demo scores its held-out "
            "images), from `<output>/metrics.jsonl`.", ""]
    for plan in plans:
        found, png = (curves or {}).get(plan.experiment, ({}, None))
        if plan.problem or not found:
            continue
        out += [f"### {plan.experiment} ({plan.data})", "", *curves_table(found), ""]
        if png is not None:
            out += [image_link(png, folder, f"{plan.experiment} training curves"), ""]
    if not any((curves or {}).get(p.experiment, ({}, None))[0] for p in plans if not p.problem):
        out += ["No training stage here evaluated while training.", ""]

    out += ["## Stages", "",
            "Summed over each stage's jobs, from the summaries they saved next to their outputs "
            "(`<output>/summaries/`). Wall time: the longest job; CPU time: all jobs, all threads.", ""]
    for plan in plans:
        out += [f"### {plan.experiment} ({plan.data})", ""]
        if plan.problem:
            out += [f"Not reported: {plan.problem}.", ""]
            continue
        lines, total = stage_table(plan, folder)
        out += lines + ["", f"Total wall time of the stages: {_seconds(total)}.", ""]

    out += ["## Collages", ""]
    for plan in plans:
        if plan.problem:
            continue
        collage = plan.output_of("collage")
        out += [f"### {plan.experiment} ({plan.data})", ""]
        pngs = _pngs(collage, [s.name for s in plan.stages])
        if collage is None:
            out += ["No collage stage in this experiment.", ""]
        elif not pngs:
            out += [f"Not run (no collages in {_link_text(collage, folder)}).", ""]
        for png in pngs:
            out += [f"**{png.stem}**", "", image_link(png, folder, f"{plan.experiment} {png.stem}"), ""]
    return "\n".join(out).rstrip("\n") + "\n", tables


def run(cfg: RunConfig, context) -> StageSummary:
    from part_distillation.store.files import atomic_write_bytes

    st = cfg.stage
    summary = StageSummary(st.name, output=st.output)
    if not context.is_main:
        return summary.finish()
    base = own_overrides()
    plans = [plan_experiment(name, base) for name in (st.experiments or [cfg.experiment])]
    path = Path(st.file)
    curves = {}
    for plan in plans:
        found, png = ({} if plan.problem else training_curves(plan)), None
        if found:
            try:
                png = write_curves_png(found, Path(st.output) / f"training_curves_{plan.experiment}.png",
                                       plan.experiment)
            except (ImportError, OSError) as err:  # a report never fails a run: the table stays
                log.warning("report: the training curves of %s were not plotted: %s", plan.experiment, err)
        curves[plan.experiment] = (found, png)
    text, tables = build_report(plans, path.parent, curves)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode("utf-8"))
    summary.seen = len(plans)
    summary.written = 1
    for plan in plans:
        if plan.problem:
            log.warning("report: experiment %s not reported: %s", plan.experiment, plan.problem)
            summary.skip("not_composed")
    for experiment, table in tables:
        log.info("evaluation of %s:\n%s", experiment, table.rstrip("\n"))
    log.info("report: %s", path)
    summary.extra["report"] = str(path)
    return summary.finish()
