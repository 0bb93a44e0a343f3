"""Trained models as part predictors: loading by run folder and by file, masks at the image's size,
the object class selecting the PartDistillation head rows."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from part_distillation import postprocess
from part_distillation.config import ConfigError
from part_distillation.data.frame import ImageFrame
from part_distillation.engine import checkpoint as ckpt
from part_distillation.inference import TrainedModel, resolve_checkpoint
from part_distillation.models.mask2former import preprocess_images

from tests.model_runs import write_run

WNIDS = ("n90000001", "n90000002", "n90000003")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    torch.set_num_threads(1)
    return {"proposal": write_run(root / "proposal", "proposal", data_root=root, iterations=(5, 10)),
            "part_distillation": write_run(root / "pd", "part_distillation", data_root=root, wnids=WNIDS,
                                           parts_per_class=3, iterations=(7,))}


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (50, 90, 3), dtype=np.uint8)
    obj = np.zeros((50, 90), dtype=bool)
    obj[8:44, 15:80] = True
    return img, obj


def test_loads_by_run_folder_and_by_file(runs):
    newest = TrainedModel.load(runs["proposal"])
    assert newest.kind == "proposal" and newest.image_size == 64 and newest.parts_per_class is None
    assert newest.checkpoint == ckpt.checkpoint_path(runs["proposal"], 10)
    older = TrainedModel.load(runs["proposal"], iteration=5)
    assert older.checkpoint == ckpt.checkpoint_path(runs["proposal"], 5)
    by_file = TrainedModel.load(ckpt.checkpoint_path(runs["proposal"], 5))
    for a, b in zip(older.model.state_dict().values(), by_file.model.state_dict().values()):
        assert torch.equal(a, b)
    assert not torch.equal(older.model.class_predictor.weight, newest.model.class_predictor.weight)
    pd = TrainedModel.load(runs["part_distillation"])
    assert pd.kind == "part_distillation" and pd.parts_per_class == 3 and pd.num_object_classes == 3
    assert pd.class_wnids == WNIDS and pd.class_index("n90000002") == 1 and pd.class_index("n1") is None


def test_bare_checkpoint_file_and_errors(runs, tmp_path):
    state = torch.load(ckpt.checkpoint_path(runs["part_distillation"], 7), weights_only=True)
    bare = tmp_path / "pd.pth"
    torch.save(state, bare)
    with pytest.raises(ValueError, match="parts_per_class"):
        TrainedModel.load(bare)   # no run folder: K cannot be known
    model = TrainedModel.load(bare, parts_per_class=3)
    assert model.kind == "part_distillation" and model.image_size == 640 and model.class_wnids is None
    torch.save(torch.load(ckpt.checkpoint_path(runs["proposal"], 5), weights_only=True), tmp_path / "p.pth")
    assert TrainedModel.load(tmp_path / "p.pth").kind == "proposal"   # 2 class outputs, spec recognised
    with pytest.raises(ConfigError, match="iteration=3"):
        resolve_checkpoint(runs["proposal"], 3)
    with pytest.raises(ConfigError, match="no checkpoint under"):
        resolve_checkpoint(tmp_path / "nothing")


def test_proposals_at_the_original_size_inside_the_object(runs, image):
    img, obj = image
    model = TrainedModel.load(runs["proposal"])
    got = model.predict(img, obj)
    n = len(got.scores)
    assert n >= 1 and got.masks.shape == (n, 50, 90) and got.masks.dtype == bool
    assert got.clusters.tolist() == list(range(n)) and got.clusters.dtype == np.int64
    assert np.all(np.diff(got.scores) <= 0)                         # best first
    assert not (got.masks & ~obj).any()                             # restricted to the object
    assert got.masks.sum(0).max() <= 1                              # one label per pixel
    # the same masks as the steps done by hand: fitted frame (no grey canvas), normalised and
    # padded to a multiple of 32 with 0 (the reference's stage-4 test input), network, back to 50 x 90
    frame = ImageFrame.fit((50, 90), size=64)
    assert model.frame((50, 90)) == frame and frame.fitted == (36, 64)
    batch = preprocess_images([frame.fit_image(img)])
    assert batch.padded_size == (64, 64) and (batch.pixel_values[..., 36:, :] == 0).all()
    grey = preprocess_images([ImageFrame.fit((50, 90), size=64, canvas=64).pad_image(frame.fit_image(img))])
    assert (grey.pixel_values[..., 36:, :] != 0).any()  # a grey square would be another input
    with torch.no_grad():
        out = model.model(batch.pixel_values)
    fitted = postprocess.proposal_inference(out["pred_logits"][0], out["pred_masks"][0], padded_size=(64, 64),
                                            image_size=frame.fitted,
                                            object_mask=torch.from_numpy(frame.masks_to_fitted(obj[None])[0]))
    np.testing.assert_array_equal(got.masks, frame.masks_to_original(fitted.masks.numpy()))
    # overlapping proposals when asked; no object: the whole image is the region
    overlapping = TrainedModel.load(runs["proposal"], one_label=False).predict(img, obj)
    assert len(overlapping.scores) >= n
    # both settings from one forward pass: the one-label set as above, the overlapping one as its own call
    both = model.predict(img, obj, with_overlapping=True)
    np.testing.assert_array_equal(both.masks, got.masks)
    np.testing.assert_array_equal(both.overlapping.masks, overlapping.masks)
    np.testing.assert_allclose(both.overlapping.scores, overlapping.scores)
    assert got.overlapping is None and overlapping.overlapping is None
    free = model.predict(img, None)
    assert free.masks.shape[1:] == (50, 90) and free.masks[:, ~obj].any()


def test_part_distillation_selects_its_object_class_rows(runs, image):
    img, obj = image
    model = TrainedModel.load(runs["part_distillation"])
    predictions = [model.predict(img, obj, object_class=c) for c in range(3)]
    for p in predictions:
        assert p.masks.shape[1:] == (50, 90) and not (p.masks & ~obj).any()
        assert set(p.clusters.tolist()) <= {0, 1, 2} and len(set(p.clusters.tolist())) == len(p.clusters)
    assert not np.array_equal(predictions[0].scores, predictions[1].scores)
    # the reference's test resolution: shortest side 64 (the training canvas), longer side <= 64 x 1333 / 640
    frame = model.frame((50, 90))
    assert model.max_size == 133 and frame.fitted == (64, 115) and frame.canvas is None
    assert TrainedModel.load(runs["proposal"]).frame((50, 90)).fitted == (36, 64)   # proposals: longer side 64
    # class 1's scores are the softmax of head rows 3..5 and the last one, computed from the full head
    batch = preprocess_images([frame.fit_image(img)])
    assert batch.padded_size == (64, 128)
    with torch.no_grad():
        out = model.model(batch.pixel_values, object_class=torch.tensor([1]))
        full = model.model.class_predictor(out["query_embeddings"][0])   # (Q, 3 * 3 + 1)
    rows = torch.cat([full[:, 3:6], full[:, -1:]], dim=1)
    torch.testing.assert_close(out["pred_logits"][0], rows)
    probs = rows.softmax(-1)[:, :-1]
    assert predictions[1].scores.max() == pytest.approx(float(probs.max()), rel=1e-5)
    with pytest.raises(ValueError, match="object class"):
        model.predict(img, obj)
    with pytest.raises(ValueError, match="outside"):
        model.predict(img, obj, object_class=3)


def test_batch_equals_single_images(runs, image):
    img, obj = image
    model = TrainedModel.load(runs["part_distillation"])
    other = np.ascontiguousarray(img[:40, :30])
    other_obj = obj[:40, :30]
    batch = model.predict_batch([img, other], [obj, other_obj], [2, 0])
    for got, want in zip(batch, [model.predict(img, obj, 2), model.predict(other, other_obj, 0)]):
        assert got.masks.shape == want.masks.shape
        np.testing.assert_array_equal(got.masks, want.masks)
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-4, atol=1e-6)


def test_predict_leaves_a_training_model_in_training(runs, image):
    img, obj = image
    model = TrainedModel.load(runs["proposal"])
    model.model.train()
    model.predict(img, obj)
    assert model.model.training


def test_semantic_baseline_predicts_its_dataset_part_classes(tmp_path, image):
    """A supervised_learning run (variant semantic) loads as kind ``semantic``: clusters are its
    head's part classes, masks inside the object at the image's size."""
    from part_distillation.evaluation.predictors import ModelPredictor

    run = write_run(tmp_path / "semantic", "semantic", data_root=tmp_path, parts_per_class=5)
    model = TrainedModel.load(run)
    assert model.kind == "semantic" and model.parts_per_class is None and model.model.num_classes == 5
    img, obj = image
    got = model.predict(img, obj)
    assert got.masks.shape[1:] == (50, 90) and not (got.masks & ~obj).any()
    assert set(got.clusters.tolist()) <= set(range(5)) and len(set(got.clusters.tolist())) == len(got.clusters)
    assert ModelPredictor(model, "semantic").num_clusters == 5


def test_masks_at_the_test_resolution_on_request(runs, image):
    # the evaluation scores PartImageNet at the test resolution: masks straight from the
    # fitted frame, the same masks the original-size ones are resized from
    img, obj = image
    for kind in ("part_distillation", "proposal"):
        model = TrainedModel.load(runs[kind])
        frame = model.frame((50, 90))
        c = 1 if kind == "part_distillation" else None
        fitted = model.predict(img, obj, object_class=c, to_original=False)
        original = model.predict(img, obj, object_class=c)
        assert fitted.masks.shape[1:] == frame.fitted
        np.testing.assert_array_equal(frame.masks_to_original(fitted.masks), original.masks)
        np.testing.assert_allclose(fitted.scores, original.scores)
    # a proposal model's overlapping set comes in the same frame as its one-label set
    model = TrainedModel.load(runs["proposal"])
    frame = model.frame((50, 90))
    fitted = model.predict(img, obj, with_overlapping=True, to_original=False)
    original = model.predict(img, obj, with_overlapping=True)
    assert fitted.overlapping.masks.shape[1:] == frame.fitted and len(fitted.overlapping.masks)
    np.testing.assert_array_equal(frame.masks_to_original(fitted.overlapping.masks), original.overlapping.masks)


def test_a_checkpoint_file_is_read_once(runs, monkeypatch):
    reads = []
    real_load = torch.load

    def counting_load(path, *args, **kwargs):
        reads.append(str(path))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    model = TrainedModel.load(runs["proposal"], iteration=5)
    assert reads == [str(ckpt.checkpoint_path(runs["proposal"], 5))]
    assert model.kind == "proposal"
