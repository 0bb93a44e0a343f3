"""What the evaluation scores: anything that turns a dataset sample into a :class:`Prediction`.

A predictor is called with a :class:`~part_distillation.data.part_sample.PartSample` and
sees only what the strict protocol allows: the image and its object mask (plus the object
class, mapped to the model's training class index). Four kinds:

* :class:`RecordsPredictor`: a stage's stored part records (pixel grouping, dense CRF,
  part ranking), matched to the sample by image path;
* :class:`ModelPredictor`: a trained stage-4/6 model (``inference.TrainedModel``, from a
  checkpoint or a model still in training);
* :class:`StripsPredictor`: the trivial baseline, the object's box cut into K strips;
* :class:`ColourKMeansPredictor`: the colour baseline, k-means of colour + position of
  the object's pixels (K clusters).

Each has a ``label`` (its folder and row name) and ``num_clusters`` (the cluster ids its
predictions use: 0..num_clusters-1). A cluster id of -1 marks a mask that counts for
proposal recall only, not for the part segmentation (a proposal model's masks beyond its
top ``num_clusters``). A predictor that cannot predict a sample returns ``None`` with
:attr:`last_skip` saying why; the sample then counts as finding nothing.

Proposal-type predictors (a proposal model, stage records, strips, colour k-means) are
scored for AR in both settings (``ar_settings``: ``overlapping`` and ``one-label``; a
proposal model gives both sets from one forward pass, records and the baselines do not
overlap, so both are their masks) and, for an image of several objects, predict once more
on the union of the object masks (:meth:`Predictor.image_prediction`, per-image AR as the
reference).

Predictions are at the sample's original size, or, given ``frame`` (an
``ImageFrame``), at ``frame.fitted``: PartImageNet is scored at the test resolution
(docs/evaluation.md#protocols), each predictor's own (:meth:`Predictor.score_frame`: a
model's test frame; a stage record's own frame; else longer side 640), and a predictor
gives its masks there directly rather than through the original size.
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np

from part_distillation.data.frame import ImageFrame
from part_distillation.data.images import load_rgb
from part_distillation.data.part_sample import PartSample
from part_distillation.evaluation.class_map import ModelClassRule
from part_distillation.evaluation.evaluator import AR_SETTINGS, DEFAULT_AR_SETTINGS, Prediction, union_sample
from part_distillation.masks import decode_rles, label_map_to_masks
from part_distillation.models.baselines import strip_labels
from part_distillation.store import RecordStore


def empty_prediction(shape: tuple[int, int], with_clusters: bool = True) -> Prediction:
    """A model that found nothing, at an image of ``shape``."""
    return Prediction(masks=np.zeros((0, *shape), dtype=bool), scores=np.zeros(0),
                      clusters=np.zeros(0, dtype=np.int64) if with_clusters else None)


#: The test resolution of what is not a model (stage records, the baselines): longer side 640, as
#: the proposal models' (shortest side 640 with the longer side capped at 640).
TEST_SIZE = 640


def prediction_from_record(record: dict, sample: PartSample, frame: ImageFrame | None = None) -> Prediction:
    """A stage record's part masks at the sample's original size (or at ``frame.fitted``),
    with their clusters.

    ``part_labels`` records (part ranking) carry ``cluster_ids`` (consistent within an
    object class) and scores; ``part_segments`` records (pixel grouping, dense CRF) carry
    ``part_ids`` 1..K, each image its own numbering (clusters = ids - 1, scores 1).
    """
    written = ImageFrame.from_record(record)
    if tuple(written.original) != tuple(sample.object_mask.shape):
        raise ValueError(f"record {record['key']!r} is of an image of size {written.original}, but the dataset's "
                         f"{sample.path} is {tuple(sample.object_mask.shape)}")
    masks = decode_rles(record["part_masks"], size=written.fitted)
    if frame is None:
        masks = written.masks_to_original(masks)
    elif tuple(frame.fitted) != tuple(written.fitted):  # another scale: through the original frame
        masks = frame.masks_to_fitted(written.masks_to_original(masks))
    if "cluster_ids" in record:
        clusters, scores = np.asarray(record["cluster_ids"]), np.asarray(record["scores"], dtype=np.float64)
    else:
        clusters, scores = np.asarray(record["part_ids"]) - 1, np.ones(len(masks))
    return Prediction(masks=masks, scores=scores, clusters=clusters.astype(np.int64))


def label_map_prediction(labels: np.ndarray, num_clusters: int) -> Prediction:
    """An (H, W) label map (0: none, k: cluster k - 1) as one mask per label present, score 1 each."""
    masks, ids = label_map_to_masks(labels, range(1, num_clusters + 1))
    return Prediction(masks=masks, scores=np.ones(len(ids)), clusters=ids - 1)


class Predictor:
    """Base: ``predictor(sample, frame=None) -> Prediction | None`` (None: see :attr:`last_skip`)."""

    label: str = "predictor"
    num_clusters: int = 1
    last_skip: str | None = None
    #: the AR settings its predictions are scored in (proposal-type: both)
    ar_settings: tuple[str, ...] = DEFAULT_AR_SETTINGS

    def __call__(self, sample: PartSample, frame: ImageFrame | None = None) -> Prediction | None:
        raise NotImplementedError

    @property
    def proposal_type(self) -> bool:
        return "overlapping" in self.ar_settings

    def image_prediction(self, samples: list[PartSample], predictions: list[Prediction],
                         frame: ImageFrame | None = None) -> Prediction | None:
        """What per-image AR scores for an image of several objects: a proposal-type predictor's
        prediction on the union of their masks (None: it predicted nothing); a class-conditioned
        one's are its per-object predictions pooled (returns None; the evaluator pools them).
        ``frame``: as for :meth:`__call__`."""
        if len(samples) == 1 or not self.proposal_type:
            return None
        return self(union_sample(samples), frame)

    def score_frame(self, sample: PartSample) -> ImageFrame:
        """The test resolution of the sample's image for this predictor (no canvas)."""
        return ImageFrame.fit(sample.object_mask.shape, size=TEST_SIZE)


class RecordsPredictor(Predictor):
    """A stage's records, found by the sample's image path (real path)."""

    ar_settings = AR_SETTINGS

    def __init__(self, records: dict[str, dict], label: str, num_clusters: int):
        self.records, self.label, self.num_clusters = records, label, int(num_clusters)

    def image_prediction(self, samples: list[PartSample], predictions: list[Prediction],
                         frame: ImageFrame | None = None) -> Prediction | None:
        """A record is of the whole image: every object of it got that same prediction."""
        return predictions[0] if len(samples) > 1 else None

    @classmethod
    def from_store(cls, path: str | os.PathLike, label: str, num_clusters: int) -> "RecordsPredictor":
        records = {os.path.realpath(r["path"]): r for r in RecordStore(path).iter_records()}
        return cls(records, label, num_clusters)

    def score_frame(self, sample: PartSample) -> ImageFrame:
        """The frame the sample's record was written in (its masks as they are), else longer side 640."""
        record = self.records.get(os.path.realpath(sample.path))
        if record is not None and tuple(record.get("original_size", ())) == tuple(sample.object_mask.shape):
            return ImageFrame.from_record(record)
        return super().score_frame(sample)

    def __call__(self, sample: PartSample, frame: ImageFrame | None = None) -> Prediction | None:
        record = self.records.get(os.path.realpath(sample.path))
        if record is None:
            self.last_skip = "no_prediction"
            return None
        prediction = prediction_from_record(record, sample, frame)
        if len(prediction.clusters) and prediction.clusters.max() >= self.num_clusters:
            raise ValueError(f"{self.label}: record {record['key']!r} has cluster {prediction.clusters.max()} but "
                             f"stage.num_clusters={self.num_clusters}: set it to the records' number of parts")
        return prediction


class ModelPredictor(Predictor):
    """A trained model on the sample's image, restricted to its object mask.

    ``load_image(path) -> (H, W, 3) uint8`` (default ``data.images.load_rgb``). A
    PartDistillation model gets the sample's object class as a training class index by
    ``class_rule`` (``evaluation.class_map.ModelClassRule``: a mapping file, the synset
    itself, or the model's first class under it in WordNet; default: the synset itself);
    a sample no class of the model stands for is skipped (``object_class_not_in_model``).
    Proposals: clusters are the per-image rank, the top ``num_clusters`` kept for the
    segmentation (the rest -1, recall only).
    """

    def __init__(self, model, label: str, num_clusters: int | None = None,
                 load_image: Callable[[str], np.ndarray] | None = None, class_rule=None):
        self.model, self.label = model, label
        if model.kind == "proposal":
            if not model.one_label:
                raise ValueError(f"{label}: a proposal model is scored with one label per pixel and, from the "
                                 f"same forward pass, overlapping: load it with one_label=True")
            self.ar_settings = AR_SETTINGS
        self.class_rule = class_rule if class_rule is not None else ModelClassRule(
            getattr(model, "class_wnids", None))
        if model.kind == "part_distillation":
            self.num_clusters = int(model.parts_per_class)
        elif model.kind == "semantic":  # clusters are the head's part classes
            self.num_clusters = int(model.model.num_classes)
        else:
            self.num_clusters = int(num_clusters or 8)
        self.load_image = load_image or load_rgb

    def score_frame(self, sample: PartSample) -> ImageFrame:
        """The model's own test resolution (``TrainedModel.frame``, without its canvas)."""
        return self.model.frame(tuple(sample.object_mask.shape)).with_canvas(None)

    def __call__(self, sample: PartSample, frame: ImageFrame | None = None) -> Prediction | None:
        object_class = None
        if self.model.kind == "part_distillation":
            object_class = self.class_rule.index(sample.object_class, sample.wnid)
            if object_class is None:
                self.last_skip = "object_class_not_in_model"
                return None
        image = self.load_image(sample.path)
        if tuple(image.shape[:2]) != tuple(sample.object_mask.shape):
            raise ValueError(f"{sample.path}: image of size {tuple(image.shape[:2])}, its annotation "
                             f"{tuple(sample.object_mask.shape)}")
        if frame is not None and tuple(frame.fitted) != tuple(self.score_frame(sample).fitted):
            raise ValueError(f"{self.label}: asked for masks at {frame.fitted}, not this model's test resolution")
        proposal = self.model.kind == "proposal"
        prediction = self.model.predict(image, sample.object_mask, object_class, with_overlapping=proposal,
                                        to_original=frame is None)
        if proposal:
            clusters = np.where(prediction.clusters < self.num_clusters, prediction.clusters, -1)
            prediction = Prediction(masks=prediction.masks, scores=prediction.scores, clusters=clusters,
                                    overlapping=prediction.overlapping)
        return prediction


class StripsPredictor(Predictor):
    """The object's box cut into ``num_clusters`` equal strips along its longer side
    (``models.baselines.strip_labels``); cluster k = the k-th strip from the top/left,
    score 1 each. Needs nothing but the object mask."""

    ar_settings = AR_SETTINGS

    def __init__(self, num_clusters: int, label: str = "strips"):
        self.num_clusters, self.label = int(num_clusters), label

    def __call__(self, sample: PartSample, frame: ImageFrame | None = None) -> Prediction:
        object_mask = sample.object_mask if frame is None else frame.masks_to_fitted(sample.object_mask[None])[0]
        return label_map_prediction(strip_labels(object_mask, self.num_clusters), self.num_clusters)


class ColourKMeansPredictor(Predictor):
    """k-means (K = ``num_clusters``) of RGB + xy of the object's pixels
    (``models.baselines.color_position_labels``): what colour alone finds, the bar a part
    learner must clear where parts differ in colour. Cluster k = k-means cluster k of the
    image (each image its own numbering, as pixel grouping's), score 1 each. Proposal-type
    as strips (one label per pixel: both AR settings score the same masks; an image of
    several objects is clustered once more on the union of their masks)."""

    ar_settings = AR_SETTINGS

    def __init__(self, num_clusters: int, label: str = "colour_kmeans",
                 load_image: Callable[[str], np.ndarray] | None = None, seed: int = 0):
        from part_distillation.data.images import load_rgb

        self.num_clusters, self.label, self.seed = int(num_clusters), label, int(seed)
        self.load_image = load_image or load_rgb

    def __call__(self, sample: PartSample, frame: ImageFrame | None = None) -> Prediction:
        from part_distillation.models.baselines import color_position_labels

        image = self.load_image(sample.path)
        if tuple(image.shape[:2]) != tuple(sample.object_mask.shape):
            raise ValueError(f"{sample.path}: image of size {tuple(image.shape[:2])}, its annotation "
                             f"{tuple(sample.object_mask.shape)}")
        object_mask = sample.object_mask
        if frame is not None:  # clustered at the test resolution: the image and the object mask there
            image, object_mask = frame.fit_image(image), frame.masks_to_fitted(object_mask[None])[0]
        labels = color_position_labels(image, object_mask, self.num_clusters, seed=self.seed)
        return label_map_prediction(labels, self.num_clusters)


__all__ = ["ColourKMeansPredictor", "ModelPredictor", "Predictor", "RecordsPredictor", "StripsPredictor",
           "empty_prediction", "label_map_prediction", "prediction_from_record"]
