"""Post-processing: upstream instance inference on the fixture, and the shared mask helpers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from part_distillation.postprocess import (
    InstancePredictions,
    area_ratio,
    foreground,
    instance_inference,
    keep_by_area_ratio,
    keep_by_score,
    mean_mask_probability,
    merge_by_class,
    one_label_per_pixel,
    resize_mask_logits,
    restrict_to_object,
    topk_class_scores,
)

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def reference(reference_models):
    return dict(np.load(reference_models / "m2f_tiny_outputs.npz"))


@pytest.mark.parametrize("prefix", ["", "pad_"])
def test_instance_inference_reproduces_upstream_from_the_fixture_logits(reference, prefix):
    logits = torch.from_numpy(reference[prefix + "pred_logits"][0])
    masks = torch.from_numpy(reference[prefix + "pred_masks"][0])
    padded = reference[prefix + "input_padded"].shape[-2:]
    image_hw = tuple(int(v) for v in reference[prefix + "image_hw"])
    inst = instance_inference(logits, masks, padded_size=padded, image_size=image_hw, topk=10)
    assert len(inst) == 10 and inst.masks.shape == (10, *image_hw) and inst.masks.dtype == torch.bool
    inst = inst.sorted_by_score()
    order = np.argsort(-reference[prefix + "inst_scores"], kind="stable")
    # same inputs, same arithmetic: the set of instances is identical, scores to float precision
    np.testing.assert_allclose(inst.scores.numpy(), reference[prefix + "inst_scores"][order], atol=1e-7, rtol=0)
    np.testing.assert_array_equal(inst.classes.numpy(), reference[prefix + "inst_pred_classes"][order])
    np.testing.assert_array_equal(inst.masks.numpy(), reference[prefix + "inst_pred_masks"][order])


def test_topk_is_over_query_class_pairs_without_no_object():
    logits = torch.tensor([[5.0, 0.0, 9.0], [0.0, 4.0, -9.0], [1.0, 0.5, 1.0]])  # Q=3, C=2 (+ no-object)
    scores, classes, queries = topk_class_scores(logits, topk=3)
    probs = logits.softmax(-1)[:, :-1]
    order = torch.argsort(scores, descending=True)
    assert [(int(q), int(c)) for q, c in zip(queries[order], classes[order])] == [(1, 1), (2, 0), (2, 1)]
    torch.testing.assert_close(scores, probs[queries, classes])
    assert len(topk_class_scores(logits, topk=100)[0]) == 6  # capped at Q x C


def test_resize_crops_padding_before_resizing():
    logits = torch.zeros(1, 8, 8)
    logits[0, :6, :4] = 1.0  # the image occupies the top-left 24x16 of a 32x32 padded input
    out = resize_mask_logits(logits, padded_size=(32, 32), image_size=(24, 16), output_size=(48, 32))
    assert out.shape == (1, 48, 32)
    expected = F.interpolate(F.interpolate(logits[None], size=(32, 32), mode="bilinear")[:, :, :24, :16],
                             size=(48, 32), mode="bilinear")[0]
    torch.testing.assert_close(out, expected)
    assert resize_mask_logits(logits, (32, 32), (24, 16)).shape == (1, 24, 16)
    with pytest.raises(ValueError):
        resize_mask_logits(logits, (32, 32), (40, 16))


def test_instance_scores_are_class_score_times_mean_mask_probability():
    torch.manual_seed(0)
    class_logits, mask_logits = torch.randn(4, 3), torch.randn(4, 8, 8) * 3
    inst = instance_inference(class_logits, mask_logits, padded_size=(32, 32), image_size=(32, 32), topk=5)
    probs = class_logits.softmax(-1)[:, :-1]
    full = F.interpolate(mask_logits[None], size=(32, 32), mode="bilinear", align_corners=False)[0]
    for i in range(len(inst)):
        q, c = int(inst.query_indices[i]), int(inst.classes[i])
        binary = full[q] > 0
        assert torch.equal(inst.masks[i], binary)
        expected = probs[q, c] * full[q].sigmoid()[binary].sum() / (binary.sum() + 1e-6)
        torch.testing.assert_close(inst.scores[i], expected)
    torch.testing.assert_close(mean_mask_probability(full[:1], full[:1] > 0),
                               full[0].sigmoid()[full[0] > 0].mean()[None], rtol=1e-5, atol=1e-6)
    subset = inst.select(inst.scores > inst.scores.median())
    assert isinstance(subset, InstancePredictions) and len(subset) < len(inst)


def test_restrict_to_object_zeroes_logits_and_intersects_masks():
    logits = torch.tensor([[[2.0, -1.0], [3.0, 4.0]]])
    obj = np.array([[True, True], [False, True]])
    out = restrict_to_object(logits, obj)
    assert torch.equal(out, torch.tensor([[[2.0, -1.0], [0.0, 4.0]]]))
    assert torch.equal(foreground(out), torch.tensor([[True, False], [False, True]]))
    assert torch.equal(restrict_to_object(logits > 0, obj), torch.tensor([[[True, False], [False, True]]]))
    with pytest.raises(ValueError):
        restrict_to_object(logits, np.ones((3, 3), bool))


def test_one_label_per_pixel_gives_each_pixel_to_the_best_scored_prediction():
    big = 8.0
    logits = torch.full((3, 2, 3), -big)
    logits[0, :, :2] = big          # prediction 0 claims the left two columns
    logits[1, :, 1:] = big          # prediction 1 claims the right two (overlap in column 1)
    logits[2] = -big                # prediction 2 claims nothing
    scores = torch.tensor([0.5, 0.9, 0.99])
    masks, owners = one_label_per_pixel(logits, scores)
    assert owners.tolist() == [0, 1]
    assert masks[0].tolist() == [[True, False, False]] * 2     # the overlap goes to the higher score
    assert masks[1].tolist() == [[False, True, True]] * 2
    assert not (masks[0] & masks[1]).any()
    region = torch.tensor([[True, True, True], [False, False, False]])
    masks, owners = one_label_per_pixel(logits, scores, region)
    assert masks.sum().item() == 3 and not masks[:, 1].any()
    empty_masks, empty_owners = one_label_per_pixel(torch.zeros(0, 2, 3), torch.zeros(0))
    assert empty_masks.shape == (0, 2, 3) and empty_owners.numel() == 0


def test_area_and_score_filters():
    ref = torch.zeros(10, 10, dtype=torch.bool)
    ref[:, :5] = True  # 50 pixels
    masks = torch.zeros(3, 10, 10, dtype=torch.bool)
    masks[0, :1, :2] = True   # 2 px = 4 %
    masks[1, :1, :3] = True   # 3 px = 6 %
    masks[2, :5, :5] = True   # 25 px = 50 %
    torch.testing.assert_close(area_ratio(masks, ref), torch.tensor([0.04, 0.06, 0.5]))
    assert keep_by_area_ratio(masks, ref, 0.05).tolist() == [False, True, True]
    assert keep_by_area_ratio(masks, ref, 0.9).tolist() == [False, False, False]
    assert keep_by_area_ratio(masks, ref, 0.9, fallback_to_all=True).tolist() == [True, True, True]
    scores = np.array([0.2, 0.3, 0.31])
    assert keep_by_score(scores, 0.3).tolist() == [False, False, True]  # strictly above, as the reference
    assert keep_by_score(scores, 0.5, fallback_to_all=True).tolist() == [True, True, True]
    assert area_ratio(masks, torch.zeros(10, 10, dtype=torch.bool)).tolist() == [0.0, 0.0, 0.0]


def test_merge_by_class_unions_masks_and_keeps_the_best_score():
    masks = torch.zeros(4, 2, 2, dtype=torch.bool)
    masks[0, 0, 0] = masks[1, 0, 1] = masks[2, 1, 0] = masks[3, 1, 1] = True
    classes = torch.tensor([5, 2, 5, 7])
    scores = torch.tensor([0.1, 0.4, 0.8, 0.3])
    merged, ids, best = merge_by_class(masks, classes, scores)
    assert ids.tolist() == [2, 5, 7]
    torch.testing.assert_close(best, torch.tensor([0.4, 0.8, 0.3]))
    assert merged[1].tolist() == [[True, False], [True, False]]
    assert merged.sum().item() == 4
