"""Stage ``synthetic_data``: write the synthetic part dataset into ``data.root``.

Idempotent: when the dataset is already there with the same settings it is left as
is; with other settings it is refused (``overwrite_config=true`` regenerates it).

Also writes two disjoint halves of the split as PartImageNet jsons
(``annotations/<split>_match.json``, ``annotations/<split>_eval.json``, every class in
both; ``data.synthetic.write_split_halves``) when they are missing, so the evaluate
stage's strict protocol can match on one half and evaluate on the other.

A held-out split is the same stage with another ``data.split`` (e.g. ``heldout``): the
same object classes (templates depend on ``stage.seed`` only), but every image drawn
from its own random stream (seeded by the split's name), so no image is shared with
``train``. ``stage.appearance=shared`` gives every part of an object one appearance.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from part_distillation.config import RunConfig
from part_distillation.data.synthetic import make_synthetic_dataset, write_split_halves
from part_distillation.context import JobContext
from part_distillation.store.files import atomic_write_json
from part_distillation.summaries import StageSummary

from part_distillation.config import SyntheticDataStageConfig
from part_distillation.stages import SINGLE, StageSpec

SPEC = StageSpec("synthetic_data", SyntheticDataStageConfig, SINGLE)

log = logging.getLogger("part_distillation")


def run(cfg: RunConfig, context: JobContext) -> StageSummary:
    summary = StageSummary(cfg.stage.name, output=cfg.data.root)
    st = cfg.stage
    split = cfg.data.split or "train"
    settings = {"classes": st.classes, "images_per_class": st.images_per_class,
                "parts_per_class": st.parts_per_class, "size": st.size, "seed": st.seed, "split": split}
    if st.appearance != "distinct":  # only then: datasets made before the setting existed stay valid
        settings["appearance"] = st.appearance
    marker = Path(cfg.data.root) / f".synthetic_{split}.json"
    if marker.is_file():
        made = json.loads(marker.read_text())
        if made == settings:
            log.info("synthetic dataset already at %s (%s)", cfg.data.root, settings)
            summary.already_done = st.classes * st.images_per_class
            _write_halves(cfg, split, context, summary, only_if_missing=True)
            return summary.finish()
        if not cfg.overwrite_config:
            raise FileExistsError(
                f"{cfg.data.root} holds a synthetic dataset made with {made}, not {settings}; "
                f"choose another data.root or set overwrite_config=true to regenerate it")
    if context.is_main:
        # a run killed midway left the split half written: its "started" marker (same settings)
        # says the files are this stage's own, so they are regenerated rather than refused
        started = marker.with_name(f".synthetic_{split}.started.json")
        interrupted = started.is_file() and json.loads(started.read_text()) == settings
        if interrupted:
            log.info("synthetic dataset at %s: an interrupted run of the same settings is redone", cfg.data.root)
        Path(cfg.data.root).mkdir(parents=True, exist_ok=True)
        atomic_write_json(started, settings)
        made = make_synthetic_dataset(cfg.data.root, num_classes=st.classes,
                                      images_per_class=st.images_per_class, size=st.size, seed=st.seed,
                                      parts_per_class=st.parts_per_class, split=split,
                                      shared_appearance=st.appearance == "shared",
                                      overwrite=marker.is_file() or interrupted or cfg.overwrite_config)
        summary.written = made.num_images
        summary.extra["part_annotations"] = made.num_part_annotations
        _write_halves(cfg, split, context, summary, only_if_missing=False)
        atomic_write_json(marker, settings)
        started.unlink()
    return summary.finish()


def _write_halves(cfg: RunConfig, split: str, context: JobContext, summary: StageSummary,
                  only_if_missing: bool) -> None:
    root = Path(cfg.data.root)
    wanted = [root / "annotations" / f"{split}_{half}.json" for half in ("match", "eval")]
    if not context.is_main or (only_if_missing and all(p.is_file() for p in wanted)):
        return
    if cfg.stage.images_per_class < 2:
        log.warning("synthetic dataset: images_per_class=%d < 2, no disjoint halves of %s for the strict "
                    "protocol", cfg.stage.images_per_class, split)
        return
    match, evaluation = write_split_halves(root, split)
    summary.extra["halves"] = [str(match), str(evaluation)]
