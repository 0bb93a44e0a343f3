"""Post-processing: upstream instance inference on the fixture, and the shared mask helpers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

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
    part_inference,
    proposal_inference,
    resize_mask_logits,
    restrict_to_object,
    topk_class_scores,
    topk_pairs,
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


def np_bilinear(x, out_h, out_w):
    """Brute-force bilinear resize (half-pixel centres, edge clamp: ``align_corners=False``)."""
    x = np.asarray(x, dtype=np.float64)
    n, in_h, in_w = x.shape
    out = np.zeros((n, out_h, out_w))

    def source(dst, n_in, n_out):
        src = max((dst + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n_in - 1)
        return i0, min(i0 + 1, n_in - 1), src - i0

    for i in range(out_h):
        y0, y1, ly = source(i, in_h, out_h)
        for j in range(out_w):
            x0, x1, lx = source(j, in_w, out_w)
            out[:, i, j] = ((1 - ly) * ((1 - lx) * x[:, y0, x0] + lx * x[:, y0, x1])
                            + ly * ((1 - lx) * x[:, y1, x0] + lx * x[:, y1, x1]))
    return out


def np_to_image(mask_logits, padded, image, output=None):
    """Upsample to the padded input, crop to the image, resize to the output size."""
    full = np_bilinear(mask_logits, *padded)[:, :image[0], :image[1]]
    return full if output is None or tuple(output) == tuple(image) else np_bilinear(full, *output)


def test_np_bilinear_on_a_hand_worked_case():
    # 2 -> 4 pixels: output centres sit at source -0.25 (clamped to 0), 0.25, 0.75, 1.25 (-> 1)
    got = np_bilinear(np.array([[[0.0, 4.0]]]), 1, 4)
    np.testing.assert_allclose(got[0, 0], [0.0, 1.0, 3.0, 4.0])


def test_topk_is_over_query_class_pairs_without_no_object():
    # rows are log-probabilities, so the softmax is known by hand
    probs = np.array([[0.05, 0.05, 0.9], [0.1, 0.7, 0.2], [0.4, 0.35, 0.25]])  # Q=3, C=2 (+ no-object)
    scores, classes, queries = topk_class_scores(torch.tensor(np.log(probs)), topk=3)
    order = torch.argsort(scores, descending=True)
    assert [(int(q), int(c)) for q, c in zip(queries[order], classes[order])] == [(1, 1), (2, 0), (2, 1)]
    np.testing.assert_allclose(scores[order].numpy(), [0.7, 0.4, 0.35], rtol=1e-6)
    assert len(topk_class_scores(torch.tensor(np.log(probs)), topk=100)[0]) == 6  # capped at Q x C
    s, c, q = topk_pairs(torch.tensor([[0.2, 0.9], [0.5, 0.1]]), 2, sorted=True)
    assert s.tolist() == pytest.approx([0.9, 0.5]) and c.tolist() == [1, 0] and q.tolist() == [0, 1]


def test_resize_crops_padding_before_resizing():
    torch.manual_seed(0)
    logits = torch.randn(2, 8, 8)  # a 24x16 image padded to a 32x32 input, masks at 1/4
    out = resize_mask_logits(logits, padded_size=(32, 32), image_size=(24, 16), output_size=(48, 20))
    assert out.shape == (2, 48, 20)
    np.testing.assert_allclose(out.numpy(), np_to_image(logits.numpy(), (32, 32), (24, 16), (48, 20)),
                               atol=1e-5)
    # a hand-worked row: a step between 1/4-resolution cells ramps over the middle 4 pixels
    step = torch.zeros(1, 1, 2)
    step[0, 0, 1] = 4.0
    ramp = resize_mask_logits(step, padded_size=(4, 8), image_size=(4, 8))
    assert ramp[0, 0].tolist() == pytest.approx([0, 0, 0.5, 1.5, 2.5, 3.5, 4, 4])
    assert resize_mask_logits(logits, (32, 32), (24, 16)).shape == (2, 24, 16)
    with pytest.raises(ValueError):
        resize_mask_logits(logits, (32, 32), (40, 16))


def test_instance_scores_are_class_score_times_mean_mask_probability():
    torch.manual_seed(0)
    class_logits, mask_logits = torch.randn(4, 3), torch.randn(4, 8, 8) * 3
    inst = instance_inference(class_logits, mask_logits, padded_size=(32, 32), image_size=(32, 32), topk=5)
    class_logits_np = class_logits.numpy().astype(np.float64)
    probs = np.exp(class_logits_np) / np.exp(class_logits_np).sum(1, keepdims=True)
    full = np_bilinear(mask_logits.numpy(), 32, 32)
    for i in range(len(inst)):
        q, c = int(inst.query_indices[i]), int(inst.classes[i])
        binary = full[q] > 0
        assert (inst.masks[i].numpy() != binary).sum() <= 2  # float rounding at logit ~0 only
        sigmoid = 1 / (1 + np.exp(-full[q]))
        expected = probs[q, c] * sigmoid[binary].sum() / (binary.sum() + 1e-6)
        assert float(inst.scores[i]) == pytest.approx(expected, rel=1e-4)
    half = torch.tensor([[[0.0, 10.0], [-10.0, 10.0]]])
    assert float(mean_mask_probability(half, half > 0)) == pytest.approx(1 / (1 + np.exp(-10)), rel=1e-5)
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
    masks = one_label_per_pixel(logits, scores)
    assert masks.shape == (3, 2, 3)
    assert masks[0].tolist() == [[True, False, False]] * 2     # the overlap goes to the higher score
    assert masks[1].tolist() == [[False, True, True]] * 2
    assert not masks[2].any()
    region = torch.tensor([[True, True, True], [False, False, False]])
    masks = one_label_per_pixel(logits, scores, region)
    assert masks.sum().item() == 3 and not masks[:, 1].any()
    assert one_label_per_pixel(torch.zeros(0, 2, 3), torch.zeros(0)).shape == (0, 2, 3)


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
    merged, ids, best, member = merge_by_class(masks, classes, scores)
    assert ids.tolist() == [2, 5, 7]
    torch.testing.assert_close(best, torch.tensor([0.4, 0.8, 0.3]))
    assert member.tolist() == [1, 2, 3]
    assert merged[1].tolist() == [[True, False], [True, False]]
    assert merged.sum().item() == 4
