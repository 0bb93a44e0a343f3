"""Evaluation while a model trains (stages 4, 6 and the baselines, ``stage.eval_period``): the
model being trained is scored with the same per-image code as the evaluate stage
(``evaluation/scoring.py``), in memory, for ``engine.hooks.PeriodicEval``.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from part_distillation.config import ConfigError
from part_distillation.data.images import load_rgb
from part_distillation.data.part_datasets import open_part_dataset
from part_distillation.data.part_sample import PartSample
from part_distillation.engine import distributed as ddp_utils
from part_distillation.evaluation import proposals
from part_distillation.evaluation.predictors import ModelPredictor
from part_distillation.evaluation.scoring import evaluate_in_memory, flat_metrics, scores_at_test_size
from part_distillation.inference import TrainedModel, eval_max_size


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
    check_training_evaluation(stage)
    splits = [stage.eval_split] + ([stage.eval_match_split] if stage.eval_match_split else [])
    # opened now (json only), so a wrong dataset setting fails before training, not at the first evaluation
    try:
        datasets = {s: open_part_dataset(stage.eval_dataset, stage.eval_root, s, stage.eval_image_root, None)
                    for s in splits}
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
            cache["samples"] = {s: list(itertools.islice(d.samples(), limit)) for s, d in datasets.items()}
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
