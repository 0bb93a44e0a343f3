"""Stage ``synthetic_data``: write the synthetic part dataset into ``data.root``.

Idempotent: when the dataset is already there with the same settings it is left as
is; with other settings it is refused (``overwrite_config=true`` regenerates it).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from part_distillation.config import RunConfig
from part_distillation.data.synthetic import make_synthetic_dataset
from part_distillation.context import JobContext
from part_distillation.progress import StageSummary

log = logging.getLogger("part_distillation")


def run(cfg: RunConfig, context: JobContext) -> StageSummary:
    summary = StageSummary(cfg.stage.name, output=cfg.data.root)
    st = cfg.stage
    split = cfg.data.split or "train"
    settings = {"classes": st.classes, "images_per_class": st.images_per_class,
                "parts_per_class": st.parts_per_class, "size": st.size, "seed": st.seed, "split": split}
    marker = Path(cfg.data.root) / f".synthetic_{split}.json"
    if marker.is_file():
        made = json.loads(marker.read_text())
        if made == settings:
            log.info("synthetic dataset already at %s (%s)", cfg.data.root, settings)
            summary.already_done = st.classes * st.images_per_class
            return summary.finish()
        if not cfg.overwrite_config:
            raise FileExistsError(
                f"{cfg.data.root} holds a synthetic dataset made with {made}, not {settings}; "
                f"choose another data.root or set overwrite_config=true to regenerate it")
    if context.is_main:
        made = make_synthetic_dataset(cfg.data.root, num_classes=st.classes,
                                      images_per_class=st.images_per_class, size=st.size, seed=st.seed,
                                      parts_per_class=st.parts_per_class, split=split,
                                      overwrite=marker.is_file() or cfg.overwrite_config)
        marker.write_text(json.dumps(settings))
        summary.written = made.num_images
        summary.extra["part_annotations"] = made.num_part_annotations
    return summary.finish()
