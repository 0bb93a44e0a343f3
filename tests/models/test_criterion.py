"""Tests of the Mask2Former matcher and set criterion (point-sampled losses)."""
from __future__ import annotations

import math

import pytest
import torch

from part_distillation.models import criterion as crit
from part_distillation.models.criterion import (
    HungarianMatcher,
    SetCriterion,
    importance_points,
    pad_target_masks,
    point_sample,
    uniform_points,
)

torch.set_num_threads(2)

H = W = 32        # target (input) resolution
h = w = 8         # prediction resolution, 1/4 of the input
NUM_CLASSES = 3
BIG = 12.0


def rect(y0, y1, x0, x1, size=H):
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def make_targets():
    """Two images: three and two non-overlapping rectangles on a 4-pixel grid."""
    return [
        {"labels": torch.tensor([0, 2, 1]),
         "masks": torch.stack([rect(0, 12, 0, 16), rect(16, 32, 0, 8), rect(16, 28, 16, 32)])},
        {"labels": torch.tensor([1, 1]),
         "masks": torch.stack([rect(4, 20, 4, 20), rect(24, 32, 8, 32)])},
    ]


PERMS = [[3, 0, 4], [1, 5]]  # query holding target j in each image


def perfect_outputs(targets, num_queries=6, perms=PERMS):
    """Predictions equal to the targets (at 1/4 resolution), placed at queries ``perms``;
    the other queries predict no-object with empty masks."""
    logits = torch.full((len(targets), num_queries, NUM_CLASSES + 1), -BIG)
    logits[:, :, NUM_CLASSES] = BIG
    masks = torch.full((len(targets), num_queries, h, w), -BIG)
    for b, (target, perm) in enumerate(zip(targets, perms)):
        small = target["masks"].float().reshape(-1, h, H // h, w, W // w).mean((2, 4)) > 0.5
        for j, q in enumerate(perm):
            logits[b, q] = -BIG
            logits[b, q, target["labels"][j]] = BIG
            masks[b, q] = torch.where(small[j], BIG, -BIG)
    return {"pred_logits": logits, "pred_masks": masks}


def make_criterion(num_points=1024, importance=0.75, weights=None):
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=num_points)
    return SetCriterion(NUM_CLASSES, matcher, weights=weights, no_object_weight=0.1,
                        num_points=num_points, oversample_ratio=3.0, importance_sample_ratio=importance)


# --------------------------------------------------------------------------- points

def test_point_sample_reads_pixel_centres_and_interpolates():
    masks = torch.arange(16.0).reshape(1, 4, 4)
    centres = torch.tensor([[[0.125, 0.125], [0.375, 0.125], [0.125, 0.375], [0.875, 0.875]]])
    assert torch.allclose(point_sample(masks, centres), torch.tensor([[0.0, 1.0, 4.0, 15.0]]))
    midway = torch.tensor([[[0.25, 0.125]]])  # halfway between pixel (0,0) and (0,1)
    assert torch.allclose(point_sample(masks, midway), torch.tensor([[0.5]]))
    # channel form keeps the channel axis
    assert point_sample(masks[:, None].repeat(1, 2, 1, 1), centres).shape == (1, 2, 4)


def test_uniform_points_shape_and_range():
    points = uniform_points(5, 1000)
    assert points.shape == (5, 1000, 2)
    assert points.min() >= 0 and points.max() <= 1
    assert abs(points.mean().item() - 0.5) < 0.02


def test_importance_ratio_zero_is_uniform_sampling():
    logits = torch.randn(4, h, w) * 5
    got = importance_points(logits, 700, oversample_ratio=3.0, importance_sample_ratio=0.0,
                            generator=torch.Generator().manual_seed(7))
    want = uniform_points(4, 700, generator=torch.Generator().manual_seed(7))
    assert got.shape == want.shape == (4, 700, 2)
    assert torch.equal(got, want)


def test_importance_sampling_concentrates_on_uncertain_pixels():
    # logit is 0 on the vertical line x = 0.5 and grows to +-20 at the sides
    xs = (torch.arange(64) + 0.5) / 64
    logits = (40 * (xs - 0.5)).expand(64, 64)[None].repeat(3, 1, 1)
    points = importance_points(logits, 1000, oversample_ratio=3.0, importance_sample_ratio=0.75)
    assert points.shape == (3, 1000, 2)
    near_edge = ((points[..., 0] - 0.5).abs() < 0.1).float().mean().item()
    assert near_edge > 0.6  # uniform would give 0.2
    with pytest.raises(ValueError):
        importance_points(logits, 10, oversample_ratio=0.5)
    with pytest.raises(ValueError):
        importance_points(logits, 10, importance_sample_ratio=1.5)


# --------------------------------------------------------------------------- matcher

def test_matcher_recovers_permutation_of_perfect_predictions():
    torch.manual_seed(0)
    targets = make_targets()
    matcher = HungarianMatcher(2.0, 5.0, 5.0, num_points=500)
    indices = matcher(perfect_outputs(targets), targets)
    for (pred_idx, tgt_idx), perm in zip(indices, PERMS):
        assert pred_idx.dtype == tgt_idx.dtype == torch.int64
        assert dict(zip(tgt_idx.tolist(), pred_idx.tolist())) == dict(enumerate(perm))


def test_matcher_uses_masks_when_classes_agree():
    """All targets share one class: only the mask costs can find the permutation."""
    torch.manual_seed(1)
    targets = [{"labels": torch.zeros(3, dtype=torch.long), "masks": make_targets()[0]["masks"]}]
    outputs = perfect_outputs(targets, num_queries=4, perms=[[2, 3, 0]])
    outputs["pred_logits"][..., :] = 0.0
    indices = HungarianMatcher(1.0, 1.0, 1.0, num_points=400)(outputs, targets)
    assert dict(zip(indices[0][1].tolist(), indices[0][0].tolist())) == {0: 2, 1: 3, 2: 0}


def test_matcher_cost_matches_formula():
    """Logit 0 everywhere: BCE is log 2 at every point; with an empty target the dice
    cost is 1 - 1 / (P/2 + 1); the class cost is minus the softmax probability."""
    num_points = 100
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=3.0, num_points=num_points)
    logits = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    cost = matcher.cost_matrix(logits, torch.zeros(2, h, w), torch.tensor([1]), torch.zeros(1, H, W))
    prob = logits.softmax(-1)[:, 1]
    want = -2.0 * prob + 5.0 * math.log(2) + 3.0 * (1 - 1 / (num_points / 2 + 1))
    assert cost.shape == (2, 1)
    assert torch.allclose(cost[:, 0], want, atol=1e-5)


def test_matcher_with_fewer_queries_than_targets_and_empty_image():
    targets = make_targets()
    targets.append({"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, H, W)})
    outputs = {"pred_logits": torch.randn(3, 2, NUM_CLASSES + 1), "pred_masks": torch.randn(3, 2, h, w)}
    indices = HungarianMatcher(num_points=64)(outputs, targets)
    assert [len(i) for i, _ in indices] == [2, 2, 0]
    assert all(len(set(i.tolist())) == len(i) for i, _ in indices)
    assert all(len(set(j.tolist())) == len(j) for _, j in indices)


# --------------------------------------------------------------------------- criterion

@pytest.mark.parametrize("importance, mask_bound", [(0.0, 0.3), (0.75, 0.8)])
def test_perfect_predictions_have_near_zero_loss_and_wrong_ones_large(importance, mask_bound):
    torch.manual_seed(0)
    targets = make_targets()
    criterion = make_criterion(importance=importance)
    perfect = criterion(perfect_outputs(targets), targets)
    assert set(perfect) == {"loss_ce", "loss_mask", "loss_dice"}
    # wrong: every target's query predicts another class and another image's mask
    wrong_outputs = perfect_outputs(targets)
    wrong_outputs["pred_logits"] = wrong_outputs["pred_logits"].roll(1, dims=-1)
    wrong_outputs["pred_masks"] = wrong_outputs["pred_masks"].flip(-1, -2)
    wrong = criterion(wrong_outputs, targets)
    assert perfect["loss_ce"] < 1e-3
    # the 1/4-resolution masks are exact away from the rectangle edges, where bilinear
    # upsampling blurs them; importance sampling puts most points on those edges
    assert perfect["loss_mask"] < mask_bound and perfect["loss_dice"] < mask_bound
    assert wrong["loss_ce"] > 10
    assert wrong["loss_mask"] > 5 * perfect["loss_mask"]
    assert wrong["loss_dice"] > 5 * perfect["loss_dice"]
    assert SetCriterion.total_loss(wrong) > 20 * SetCriterion.total_loss(perfect)


def test_losses_are_weighted():
    targets = make_targets()
    outputs = perfect_outputs(targets)
    outputs["pred_masks"] = outputs["pred_masks"] * 0.1  # make mask losses clearly non-zero
    outputs["pred_logits"] = outputs["pred_logits"] * 0.1
    torch.manual_seed(3)
    unit = make_criterion(weights={"ce": 1, "mask": 1, "dice": 1})(outputs, targets)
    torch.manual_seed(3)
    weighted = make_criterion()(outputs, targets)
    assert torch.allclose(weighted["loss_ce"], 2 * unit["loss_ce"])
    assert torch.allclose(weighted["loss_mask"], 5 * unit["loss_mask"])
    assert torch.allclose(weighted["loss_dice"], 5 * unit["loss_dice"])
    with pytest.raises(ValueError):
        make_criterion(weights={"bce": 1})


def test_no_object_weight_in_cross_entropy():
    """With no targets every query is no-object: the weighted mean equals the plain mean."""
    criterion = make_criterion(weights={"ce": 1, "mask": 1, "dice": 1})
    logits = torch.randn(1, 5, NUM_CLASSES + 1)
    targets = [{"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, H, W)}]
    loss = criterion({"pred_logits": logits, "pred_masks": torch.randn(1, 5, h, w)}, targets)["loss_ce"]
    want = torch.nn.functional.cross_entropy(logits[0], torch.full((5,), NUM_CLASSES))
    assert torch.allclose(loss, want)
    # one matched query of class 0 at weight 1, four no-object queries at weight 0.1
    targets = [{"labels": torch.tensor([0]), "masks": rect(0, 16, 0, 16)[None]}]
    outputs = {"pred_logits": logits, "pred_masks": torch.randn(1, 5, h, w)}
    indices = criterion.matcher(outputs, targets)
    per_query = torch.nn.functional.cross_entropy(logits[0], torch.full((5,), NUM_CLASSES), reduction="none")
    q = indices[0][0].item()
    per_query[q] = torch.nn.functional.cross_entropy(logits[0, q:q + 1], torch.tensor([0]))
    weights = torch.full((5,), 0.1)
    weights[q] = 1.0
    got = criterion.loss_labels(logits, targets, indices)
    assert torch.allclose(got, (weights * per_query).sum() / weights.sum())


def test_gradients_flow_to_logits_and_matched_masks():
    torch.manual_seed(0)
    targets = make_targets()
    base = perfect_outputs(targets)
    logits = (base["pred_logits"] * 0.2).requires_grad_()
    masks = (base["pred_masks"] * 0.2).requires_grad_()
    losses = make_criterion()({"pred_logits": logits, "pred_masks": masks}, targets)
    SetCriterion.total_loss(losses).backward()
    assert logits.grad.abs().sum() > 0 and torch.isfinite(logits.grad).all()
    assert torch.isfinite(masks.grad).all()
    matched = torch.zeros(2, 6, dtype=torch.bool)
    for b, perm in enumerate(PERMS):
        matched[b, perm] = True
    per_query = masks.grad.abs().sum((-1, -2))
    assert (per_query[matched] > 0).all()
    assert (per_query[~matched] == 0).all()  # unmatched queries get no mask loss


def test_deep_supervision_keys_and_gradients():
    torch.manual_seed(0)
    targets = make_targets()
    num_aux = 9
    aux = [{"pred_logits": torch.randn(2, 6, NUM_CLASSES + 1, requires_grad=True),
            "pred_masks": torch.randn(2, 6, h, w, requires_grad=True)} for _ in range(num_aux)]
    outputs = {**perfect_outputs(targets), "aux_outputs": aux}
    losses = make_criterion(num_points=256)(outputs, targets)
    want = {f"loss_{n}" for n in ("ce", "mask", "dice")}
    want |= {f"loss_{n}_{i}" for n in ("ce", "mask", "dice") for i in range(num_aux)}
    assert set(losses) == want and len(losses) == 3 * (num_aux + 1)
    SetCriterion.total_loss(losses).backward()
    for layer in aux:
        assert layer["pred_logits"].grad.abs().sum() > 0
        assert layer["pred_masks"].grad.abs().sum() > 0


def test_images_without_targets():
    torch.manual_seed(0)
    criterion = make_criterion(num_points=256)
    empty = {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, H, W, dtype=torch.bool)}
    logits = torch.randn(2, 4, NUM_CLASSES + 1, requires_grad=True)
    masks = torch.randn(2, 4, h, w, requires_grad=True)

    def outputs():
        return {"pred_logits": logits, "pred_masks": masks,
                "aux_outputs": [{"pred_logits": logits * 1.0, "pred_masks": masks * 1.0}]}

    # the whole batch empty: mask losses are zero but part of the graph
    losses = criterion(outputs(), [empty, empty])
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"] == 0 and losses["loss_dice"] == 0 and losses["loss_ce"] > 0
    SetCriterion.total_loss(losses).backward()
    assert masks.grad is not None and (masks.grad == 0).all()
    assert logits.grad.abs().sum() > 0

    # one empty image next to one with targets
    logits.grad = masks.grad = None
    one = {"labels": torch.tensor([2]), "masks": rect(0, 8, 0, 8)[None]}
    losses = criterion(outputs(), [empty, one])
    assert losses["loss_mask"] > 0 and losses["loss_dice"] > 0
    SetCriterion.total_loss(losses).backward()
    assert (masks.grad[0] == 0).all() and masks.grad[1].abs().sum() > 0


def test_pad_target_masks_pads_bottom_right_to_the_padded_input():
    targets = [{"labels": torch.tensor([0]), "masks": torch.ones(1, 20, 32, dtype=torch.bool)},
               {"labels": torch.tensor([0, 1]), "masks": torch.ones(2, 32, 24)}]
    padded = pad_target_masks(targets, (64, 32))  # the canvas, not the largest target
    assert [t["masks"].shape for t in padded] == [(1, 64, 32), (2, 64, 32)]
    assert padded[0]["masks"][0, :20].all() and not padded[0]["masks"][0, 20:].any()
    assert padded[1]["masks"][:, :32, :24].all() and not padded[1]["masks"][:, 32:].any()
    assert not padded[1]["masks"][:, :, 24:].any()
    assert torch.equal(padded[1]["labels"], targets[1]["labels"])
    with pytest.raises(ValueError, match="larger than the padded input"):
        pad_target_masks(targets, (32, 16))


# ----------------------------------------------------- padded, non-square batches

LOGIT = 16.0  # mask logits of the perfect predictions (near the lowest loss floor, see below)


def padded_case(image_sizes, rects, canvas):
    """Targets in each image's frame and perfect 1/4-resolution predictions of them, made
    on the padded canvas by hand (query j of image b predicts target j)."""
    hp, wp = canvas
    targets, masks, logits = [], torch.full((len(rects), 4, hp // 4, wp // 4), -LOGIT), None
    logits = torch.full((len(rects), 4, NUM_CLASSES + 1), -LOGIT)
    logits[:, :, NUM_CLASSES] = LOGIT
    for b, ((ih, iw), boxes) in enumerate(zip(image_sizes, rects)):
        target = torch.zeros(len(boxes), ih, iw, dtype=torch.bool)
        for j, (y0, y1, x0, x1) in enumerate(boxes):  # multiples of 4: exact at 1/4 resolution
            target[j, y0:y1, x0:x1] = True
            masks[b, j, y0 // 4:y1 // 4, x0 // 4:x1 // 4] = LOGIT
            logits[b, j] = -LOGIT
            logits[b, j, j % NUM_CLASSES] = LOGIT
        targets.append({"labels": torch.arange(len(boxes)) % NUM_CLASSES, "masks": target})
    return {"pred_logits": logits, "pred_masks": masks}, targets


def test_perfect_prediction_on_a_padded_non_square_batch_scores_zero():
    # 472x600 and 452x592 images on a 480x608 canvas (both padded, none fills the
    # canvas, the canvas is not square)
    outputs, targets = padded_case(
        [(472, 600), (452, 592)],
        [[(0, 200, 0, 300), (240, 472, 400, 600)], [(100, 452, 320, 592), (0, 96, 0, 160), (200, 400, 0, 200)]],
        canvas=(480, 608))
    torch.manual_seed(0)
    losses = SetCriterion(NUM_CLASSES, HungarianMatcher())(outputs, targets, padded_size=(480, 608))
    # what remains is the edge band, where the 1/4-resolution logits ramp over 4 pixels
    # and the bilinear read of a binary target over 1 (about 0.01 at this size)
    assert losses["loss_mask"] < 0.02 and losses["loss_dice"] < 0.02 and losses["loss_ce"] < 1e-3
    # the same targets stretched over the canvas, as padding to the largest target did
    stretched = [{**t, "masks": torch.nn.functional.interpolate(t["masks"][None].float(), size=(480, 608))[0]}
                 for t in targets]
    torch.manual_seed(0)
    wrong = SetCriterion(NUM_CLASSES, HungarianMatcher())(outputs, stretched)
    assert wrong["loss_mask"] > 20 * losses["loss_mask"]


def test_one_landscape_image_padded_to_a_square_canvas_scores_zero():
    # the case of the issue: a 480x640 image in a 640x640 input
    outputs, targets = padded_case([(480, 640)], [[(40, 440, 100, 500), (0, 480, 0, 80)]], canvas=(640, 640))
    torch.manual_seed(0)
    criterion = SetCriterion(NUM_CLASSES, HungarianMatcher(num_points=4096), num_points=4096)
    losses = criterion(outputs, targets, padded_size=(640, 640))
    assert losses["loss_mask"] < 0.02 and losses["loss_dice"] < 0.02


def test_targets_that_do_not_match_the_padded_input_are_refused():
    outputs, targets = padded_case([(24, 32)], [[(0, 8, 0, 8)]], canvas=(32, 32))
    criterion = make_criterion(num_points=64)
    with pytest.raises(ValueError, match="target masks of image 0 are 24x32 but the model's padded input is 32x32"):
        criterion(outputs, targets)  # not padded and no padded_size: refused, never stretched
    with pytest.raises(ValueError, match="does not match the predictions"):
        criterion(outputs, targets, padded_size=(64, 32))
    with pytest.raises(ValueError, match="larger than the padded input"):
        criterion(outputs, [{"labels": torch.tensor([0]), "masks": torch.ones(1, 40, 32)}], padded_size=(32, 32))
    # a 16x16 target next to 32x32 ones is refused without the padded size
    one = {"labels": torch.tensor([2]), "masks": rect(0, 8, 0, 8, size=16)[None]}
    outputs = {"pred_logits": torch.randn(2, 4, NUM_CLASSES + 1), "pred_masks": torch.randn(2, 4, h, w)}
    with pytest.raises(ValueError, match="image 1 are 16x16"):
        criterion(outputs, [make_targets()[0], one])
    assert criterion(outputs, [make_targets()[0], one], padded_size=(H, W))["loss_mask"] > 0


def test_default_importance_ratio_is_the_reference_runs():
    criterion = SetCriterion(NUM_CLASSES, HungarianMatcher())
    assert criterion.importance_sample_ratio == 0.0 and criterion.num_points == 12544
    assert criterion.weights == {"ce": 2.0, "mask": 5.0, "dice": 5.0} and criterion.no_object_weight == 0.1


def test_num_masks_is_averaged_over_workers(monkeypatch):
    criterion = make_criterion()
    targets = make_targets()  # 5 masks here
    assert criterion.num_target_masks(targets, torch.device("cpu")) == 5
    assert criterion.num_target_masks([{"labels": torch.zeros(0)}], torch.device("cpu")) == 1

    def fake_all_reduce(tensor):  # another worker holds 7 masks
        tensor += 7
    monkeypatch.setattr(crit, "_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", fake_all_reduce)
    assert criterion.num_target_masks(targets, torch.device("cpu")) == 6


@pytest.mark.parametrize("importance", [0.75, 0.0])
def test_optimising_toy_predictions_reduces_loss(importance):
    torch.manual_seed(0)
    targets = make_targets()
    logits = torch.zeros(2, 6, NUM_CLASSES + 1, requires_grad=True)
    masks = (0.01 * torch.randn(2, 6, h, w)).requires_grad_()
    criterion = make_criterion(num_points=256, importance=importance)
    optimizer = torch.optim.Adam([logits, masks], lr=0.2)
    history = []
    for _ in range(40):
        loss = SetCriterion.total_loss(criterion({"pred_logits": logits, "pred_masks": masks}, targets))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < 0.3 * history[0]
    # the learnt masks now match the targets: the matcher pairs each target with a
    # query whose mask overlaps it well
    indices = criterion.matcher({"pred_logits": logits.detach(), "pred_masks": masks.detach()}, targets)
    for b, (src, tgt) in enumerate(indices):
        small = targets[b]["masks"].float().reshape(-1, h, 4, w, 4).mean((2, 4)) > 0.5
        pred = masks.detach()[b, src] > 0
        inter = (pred & small[tgt]).sum((-1, -2)).float()
        union = (pred | small[tgt]).sum((-1, -2)).float()
        assert (inter / union > 0.7).all()
