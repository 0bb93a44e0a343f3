"""Pixel grouping on hand-made features where the right answer is known."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from part_distillation.models.grouping import (
    ObjectToGroup,
    concat_levels,
    first_argmax,
    group_pixels,
    masks_to_grid,
)

STRIDE = 8


def _quadrant_features(h: int = 8, w: int = 8) -> torch.Tensor:
    """(1, 4, h, w): one-hot of the quadrant each cell is in."""
    feats = torch.zeros(1, 4, h, w)
    feats[0, 0, : h // 2, : w // 2] = 1
    feats[0, 1, : h // 2, w // 2:] = 1
    feats[0, 2, h // 2:, : w // 2] = 1
    feats[0, 3, h // 2:, w // 2:] = 1
    return feats


def _whole(h: int, w: int, seed: int = 0, image: int = 0) -> ObjectToGroup:
    return ObjectToGroup(image, torch.ones(h, w, dtype=torch.bool), (h, w), seed)


def test_concat_levels_resizes_coarser_levels_bilinearly_to_the_finest_grid():
    fine, coarse = torch.randn(2, 3, 8, 12), torch.randn(2, 5, 4, 6)
    out = concat_levels({"res3": fine, "res4": coarse, "res5": torch.randn(2, 1, 2, 3)}, ["res3", "res4"])
    assert out.shape == (2, 8, 8, 12)
    assert torch.equal(out[:, :3], fine)
    # align_corners=False bilinear x2: an output pixel at the centre of an input cell pair
    # is the average of its two nearest inputs along each axis (interior rows/cols).
    expected = 0.75 * coarse[:, :, 1, 2] + 0.25 * coarse[:, :, 1, 3]
    assert torch.allclose(out[:, 3:, 3, 5], 0.75 * expected + 0.25 * (0.75 * coarse[:, :, 2, 2] + 0.25 * coarse[:, :, 2, 3]))
    with pytest.raises(KeyError, match="res2"):
        concat_levels({"res3": fine}, ["res2"])


def test_mask_to_grid_takes_the_top_left_pixel_of_each_cell():
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[0, 0, 0] = True          # top-left pixel of cell (0, 0)
    masks[1, 1:8, 1:8] = True      # the whole cell but its top-left pixel
    grid = masks_to_grid(masks, (2, 2))
    assert grid[0].tolist() == [[True, False], [False, False]]
    assert not grid[1].any()


def test_quadrants_are_found_and_every_object_pixel_labelled():
    feats = _quadrant_features()
    labels = group_pixels(feats, [_whole(64, 64)], 4, n_init=10)[0]
    assert labels.shape == (64, 64) and labels.min() >= 1
    quads = [labels[:28, :28], labels[:28, 36:], labels[36:, :28], labels[36:, 36:]]  # away from the seams
    ids = [int(q[0, 0]) for q in quads]
    assert all(bool((q == i).all()) for q, i in zip(quads, ids))
    assert sorted(ids) == [1, 2, 3, 4]


def test_only_object_pixels_get_labels_and_frame_is_the_fitted_size():
    feats = _quadrant_features()
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[:40, :60] = True
    labels = group_pixels(feats, [ObjectToGroup(0, mask, (40, 60), 0)], 4, n_init=3)[0]
    assert labels.shape == (40, 60)
    assert bool((labels[mask[:40, :60]] > 0).all())
    mask2 = mask.clone()
    mask2[:, 30:] = False
    labels2 = group_pixels(feats, [ObjectToGroup(0, mask2, (40, 60), 0)], 4, n_init=3)[0]
    assert bool((labels2[:, 30:] == 0).all()) and bool((labels2[:, :30] > 0).all())


def test_objects_with_at_most_k_feature_pixels_are_not_grouped():
    feats = torch.randn(1, 6, 8, 8)
    four = torch.zeros(64, 64, dtype=torch.bool)
    for r, c in ((0, 0), (0, 8), (8, 0), (8, 8)):
        four[r:r + 8, c:c + 8] = True           # 4 whole cells: 4 feature pixels
    five = four.clone()
    five[16, 16] = True                          # top-left pixel of a fifth cell
    fuzz = four.clone()
    fuzz[17:24, 17:24] = True                    # many pixels, but no top-left pixel
    out = group_pixels(feats, [ObjectToGroup(0, m, (64, 64), 0) for m in (four, five, fuzz)], 4, n_init=2)
    assert out[0] is None and out[2] is None
    assert out[1] is not None and bool((out[1][five] > 0).all())


def test_dot_prefers_large_centroids_l2_the_nearest():
    # 1-D features: left half 1, right half 10. Centroids 1 and 10. For x = 1,
    # dot gives 1*1 = 1 < 1*10 = 10 (all pixels go to the 10-cluster); l2 gives
    # 2*1*1 - 1 = 1 > 2*1*10 - 100 = -80 (left stays with the 1-cluster).
    feats = torch.ones(1, 1, 4, 8)
    feats[..., 4:] = 10
    obj = _whole(32, 64)
    dot = group_pixels(feats, [obj], 2, assignment="dot", n_init=2)[0]
    l2 = group_pixels(feats, [obj], 2, assignment="l2", n_init=2)[0]
    assert dot.unique().numel() == 1
    assert l2[:, :24].unique().numel() == 1 and l2[:, 40:].unique().numel() == 1
    assert int(l2[0, 0]) != int(l2[0, 63])
    with pytest.raises(ValueError, match="assignment"):
        group_pixels(feats, [obj], 2, assignment="cos")


@pytest.mark.parametrize("assignment", ["dot", "l2"])
@pytest.mark.parametrize("box", [(5, 45, 3, 70), (17, 38, 25, 60)])  # near the borders; inside (crop)
def test_low_resolution_scores_equal_upsampling_the_features_first(assignment, box):
    torch.manual_seed(0)
    feats = torch.randn(1, 16, 6, 10)
    mask = torch.zeros(48, 80, dtype=torch.bool)
    mask[box[0]:box[1], box[2]:box[3]] = True
    obj = ObjectToGroup(0, mask, (46, 75), 3)
    labels = group_pixels(feats, [obj], 4, assignment=assignment, n_init=4)[0]
    # The direct reference computation: upsample all channels, crop, score with the same centroids.
    from part_distillation.models.kmeans import kmeans_list
    points = feats[0][:, masks_to_grid(mask[None], (6, 10))[0]].T
    cents = kmeans_list([points], 4, n_init=4, seed=[3])[0].centroids
    x = F.interpolate(feats, size=(48, 80), mode="bilinear", align_corners=False)[0, :, :46, :75]
    x = x.permute(1, 2, 0)
    dot = x @ cents.T
    scores = dot if assignment == "dot" else 2 * dot - x.square().sum(-1, keepdim=True) - cents.square().sum(-1)
    direct = torch.where(mask[:46, :75], scores.argmax(-1) + 1, 0)
    assert (labels == direct).float().mean() > 0.999


def test_result_does_not_depend_on_batching():
    torch.manual_seed(1)
    feats = torch.randn(3, 8, 8, 8)
    objs = [_whole(64, 64, seed=10 + i, image=i) for i in range(3)]
    together = group_pixels(feats, objs, 4, n_init=5)
    alone = [group_pixels(feats[i:i + 1], [ObjectToGroup(0, o.mask, o.fitted_size, o.seed)], 4, n_init=5)[0]
             for i, o in enumerate(objs)]
    assert all(torch.equal(a, b) for a, b in zip(together, alone))


def test_first_argmax_matches_torch_argmax_with_ties_to_the_lowest_index():
    scores = torch.randint(0, 3, (2, 4, 5, 7)).float()
    assert torch.equal(first_argmax(scores), scores.argmax(1))
