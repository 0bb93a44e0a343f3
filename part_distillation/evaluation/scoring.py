"""Scoring predictions against a part dataset, one image at a time: the states the evaluate stage
stores and merges, and the in-memory evaluation a training run makes (``during_training.py``).

An image of several objects is scored as the reference scores Pascal-Part and Cityscapes-Part
(AR on the prediction on the union of their masks, top-k per image; mIoU per object).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping, Sequence

import numpy as np

from part_distillation.data.part_sample import PartSample
from part_distillation.evaluation import proposals
from part_distillation.evaluation.evaluator import (AR_SETTINGS, PROTOCOLS, PartEvaluator, image_groups, image_key,
                                                    metrics)
from part_distillation.evaluation.predictors import Predictor, empty_prediction


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


def new_evaluator(predictor: Predictor, num_parts: int, top_k: Sequence[int]) -> PartEvaluator:
    return PartEvaluator(num_parts=num_parts, num_clusters=predictor.num_clusters, top_k=tuple(top_k),
                         ar_settings=predictor.ar_settings)


def evaluate_in_memory(predictor: Predictor, samples: Mapping[str, Iterable[PartSample]], split: str,
                       match_split: str | None, num_parts: int, top_k: Sequence[int] = proposals.TOP_K,
                       mapping: str = "majority", at_test_size: bool = False) -> dict:
    """Both protocols' metrics of ``predictor`` over ``samples`` (split -> samples), no files."""
    evaluator = new_evaluator(predictor, num_parts, top_k)
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
    result["objects"] = count_objects(states.get(split, []))
    return result


def count_objects(states: Iterable[Mapping]) -> int:
    """The samples (objects) among states: an image's AR-only state is none."""
    return sum(1 for s in states if "object_class" in s)


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
