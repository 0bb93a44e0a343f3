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
    proposal_inference_settings,
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


# ------------------------------------------------ PartDistillation inference (stages 4-6)

def _logit(p):
    return float(np.log(p / (1 - p)))


def test_proposal_inference_on_a_hand_worked_image():
    """6x6 image, object = the left 4 columns, 4 queries of one foreground class."""
    fg = [0.9, 0.8, 0.3, 0.6]
    class_logits = torch.tensor([[_logit(p), 0.0] for p in fg])  # softmax foreground = fg exactly
    mask_logits = torch.full((4, 6, 6), -10.0)
    mask_logits[0, :, 0:3] = 2.0    # columns 0-2
    mask_logits[1, :, 2:6] = 5.0    # columns 2-5: column 2 overlaps query 0, 4-5 leave the object
    mask_logits[2, :, :] = 10.0     # the best mask, but 4th by foreground probability: not in top 3
    mask_logits[3, 0, 0] = 10.0     # one pixel, lost to query 0 (0.9 s(2) = 0.79 > 0.6 s(10) = 0.6)
    obj = torch.zeros(6, 6, dtype=torch.bool)
    obj[:, :4] = True
    common = dict(padded_size=(6, 6), image_size=(6, 6), object_mask=obj, topk=3)
    got = proposal_inference(class_logits, mask_logits, **common)
    # column 2: 0.9 s(2) = 0.793 < 0.8 s(5) = 0.795 -> query 1; query 3 owns nothing: area filter
    assert got.query_indices.tolist() == [0, 1]
    assert got.scores.tolist() == pytest.approx([0.9, 0.8])  # no mask-score factor
    assert got.masks[0].tolist() == [[True, True, False, False, False, False]] * 6
    assert got.masks[1].tolist() == [[False, False, True, True, False, False]] * 6
    # plain instance inference multiplies by the mask score: query 1 (0.8 s(5)) before query 0 (0.9 s(2))
    plain = instance_inference(class_logits, mask_logits, padded_size=(6, 6), image_size=(6, 6), topk=4)
    assert plain.sorted_by_score().query_indices.tolist() == [1, 0, 3, 2]
    # overlapping proposals: logit > 0 inside the object; query 3's pixel is 1 of the
    # 24-pixel region (4.2 %, not > 5 %)
    over = proposal_inference(class_logits, mask_logits, one_label=False, **common)
    assert over.query_indices.tolist() == [0, 1]
    assert [int(m.sum()) for m in over.masks] == [18, 12]
    # both settings from one top-k selection: the same as each alone
    both = proposal_inference_settings(class_logits, mask_logits, **common)
    assert list(both) == ["overlapping", "one-label"]
    for setting, alone in (("overlapping", over), ("one-label", got)):
        assert torch.equal(both[setting].masks, alone.masks) and torch.equal(both[setting].scores, alone.scores)
    with pytest.raises(ValueError, match="proposal settings"):
        proposal_inference_settings(class_logits, mask_logits, **common, settings=("one_label",))
    # without the object, query 1 keeps columns 4-5 (one label per pixel over the whole image)
    free = proposal_inference(class_logits, mask_logits, **{**common, "object_mask": None})
    assert free.masks[1].tolist() == [[False, False, True, True, True, True]] * 6


def test_proposal_filters_fall_back_to_everything_when_nothing_passes():
    fg = [0.9, 0.8, 0.6]
    class_logits = torch.tensor([[_logit(p), 0.0] for p in fg])
    mask_logits = torch.full((3, 4, 5), -10.0)
    mask_logits[0, :, :2] = 3.0   # 8 px
    mask_logits[1, :, 2:] = 3.0   # 12 px
    mask_logits[2, 0, 0] = 1.0    # loses its only pixel: owns 0 px
    common = dict(padded_size=(4, 5), image_size=(4, 5))
    assert proposal_inference(class_logits, mask_logits, **common).query_indices.tolist() == [0, 1]
    # area > 65 % of the 20 px region: none passes -> all three kept (the empty one too)
    every = proposal_inference(class_logits, mask_logits, min_area_ratio=0.65, **common)
    assert every.query_indices.tolist() == [0, 1, 2] and int(every.masks[2].sum()) == 0
    # area > 45 %: only query 1 (60 %)
    assert proposal_inference(class_logits, mask_logits, min_area_ratio=0.45,
                              **common).query_indices.tolist() == [1]
    # then the score filter: > 0.85 keeps query 0 only; > 0.95 keeps all that passed the area
    assert proposal_inference(class_logits, mask_logits, min_score=0.85, **common).query_indices.tolist() == [0]
    assert proposal_inference(class_logits, mask_logits, min_score=0.95,
                              **common).query_indices.tolist() == [0, 1]
    # filters off
    assert len(proposal_inference(class_logits, mask_logits, min_area_ratio=None, min_score=None, **common)) == 3


def np_part_inference(pair_scores, mask_logits, padded, image, obj, topk, restrict, one_label, merge,
                      min_area, min_score, min_iou):
    """The inference steps of docs/method.md#inference written out with loops over pairs and pixels."""
    num_queries, num_classes = pair_scores.shape
    pairs = sorted(((pair_scores[q, c], q, c) for q in range(num_queries) for c in range(num_classes)),
                   key=lambda t: -t[0])[:topk]
    logits = np_to_image(mask_logits[[q for _, q, _ in pairs]], padded, image)
    if obj is not None and restrict == "before":
        logits = np.where(obj[None], logits, 0.0)
    region = (logits > 0).any(0)
    masks = np.zeros(logits.shape, bool)
    for y in range(region.shape[0]):
        for x in range(region.shape[1]):
            if not one_label:
                masks[:, y, x] = logits[:, y, x] > 0
            elif region[y, x]:
                values = [s / (1 + np.exp(-logits[i, y, x])) for i, (s, _, _) in enumerate(pairs)]
                masks[int(np.argmax(values)), y, x] = True
    items = [(s, q, c, m) for (s, q, c), m in zip(pairs, masks)]
    if merge:
        merged = []
        for c in sorted({c for _, _, c, _ in items}):
            group = [it for it in items if it[2] == c]
            best = max(group, key=lambda it: it[0])
            merged.append((best[0], best[1], c, np.any([it[3] for it in group], axis=0)))
        items = merged

    def keep_or_all(kept):
        return kept if kept else items
    if min_area is not None:
        items = keep_or_all([it for it in items if it[3].sum() > min_area * region.sum()])
    if min_score is not None:
        items = keep_or_all([it for it in items if it[0] > min_score])
    if obj is not None and restrict == "after":
        items = [(s, q, c, m & obj) for s, q, c, m in items]
    if min_iou is not None:
        items = [it for it in items if (it[3] & obj).sum() / max((it[3] | obj).sum(), 1) > min_iou]
    return sorted(items, key=lambda it: -it[0])


CASES = {  # the settings of each stage (docs/method.md#inference)
    "stage4_proposals": dict(restrict="before", one_label=True, merge=False, min_area=0.05, min_score=-1.0,
                             min_iou=None),
    "stage4_overlapping": dict(restrict="before", one_label=False, merge=False, min_area=0.05, min_score=-1.0,
                               min_iou=None),
    "stage5_cluster_pass": dict(restrict="after", one_label=True, merge=False, min_area=0.05, min_score=0.3,
                                min_iou=0.001),
    "stage5_label_pass": dict(restrict="before", one_label=True, merge=True, min_area=0.05, min_score=0.1,
                              min_iou=0.001),
    "stage6": dict(restrict="before", one_label=True, merge=True, min_area=None, min_score=None, min_iou=None),
    "strict_filters": dict(restrict="before", one_label=True, merge=False, min_area=0.3, min_score=0.9,
                           min_iou=None),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", sorted(CASES))
def test_part_inference_matches_a_brute_force_implementation(case, seed):
    settings = CASES[case]
    rng = np.random.default_rng(seed)
    num_queries, num_classes = 7, 3
    pair_scores = rng.dirichlet(np.ones(num_classes + 1), size=num_queries)[:, :num_classes]
    mask_logits = rng.normal(0, 4, size=(num_queries, 8, 10))  # a 27x37 image in a 32x40 input
    obj = np.zeros((27, 37), bool)
    obj[3:20, 5:30] = True
    padded, image = (32, 40), (27, 37)
    want = np_part_inference(pair_scores, mask_logits, padded, image, obj, 12, **settings)
    got = part_inference(torch.tensor(pair_scores), torch.tensor(mask_logits), padded_size=padded,
                         image_size=image, object_mask=obj, topk=12, restrict=settings["restrict"],
                         one_label=settings["one_label"], merge_classes=settings["merge"],
                         min_area_ratio=settings["min_area"], min_score=settings["min_score"],
                         min_object_iou=settings["min_iou"])
    assert len(want) > 0
    assert [(q, c) for _, q, c, _ in want] == list(zip(got.query_indices.tolist(), got.classes.tolist()))
    np.testing.assert_allclose(got.scores.numpy(), [s for s, _, _, _ in want], rtol=1e-6)
    np.testing.assert_array_equal(got.masks.numpy(), np.stack([m for _, _, _, m in want]))
    if settings["restrict"] == "after" or settings["min_iou"] is not None:
        assert not (got.masks.numpy() & ~obj).any()


def test_part_inference_refuses_bad_settings():
    with pytest.raises(ValueError, match="restrict"):
        part_inference(torch.ones(2, 1), torch.zeros(2, 4, 4), padded_size=(4, 4), image_size=(4, 4),
                       restrict="inside")
    with pytest.raises(ValueError, match="object_mask"):
        part_inference(torch.ones(2, 1), torch.zeros(2, 4, 4), padded_size=(4, 4), image_size=(4, 4),
                       min_object_iou=0.001)


@pytest.mark.parametrize("seed", range(6))
def test_pairs_sharing_a_query_give_the_masks_of_the_plain_per_pair_computation(seed):
    """Stage 5's pairs are every query x every part class: the logits are resized and labelled
    per distinct query, and must give what labelling every pair's own copy gives (ties too)."""
    from part_distillation import postprocess as pp

    g = torch.Generator().manual_seed(seed)
    queries, clusters = 6, 3
    pair_scores = torch.rand(queries, clusters, generator=g).round(decimals=1)   # many equal scores
    pair_scores[1] = pair_scores[4]   # two queries with the same scores ...
    mask_logits = torch.randn(queries, 5, 7, generator=g)
    mask_logits[4] = mask_logits[1]   # ... and the same logits: exact ties between queries
    object_mask = torch.rand(20, 28, generator=g) > 0.2
    kwargs = dict(padded_size=(20, 28), image_size=(20, 28), object_mask=object_mask, topk=10,
                  min_area_ratio=None, min_score=None)
    got = pp.part_inference(pair_scores, mask_logits, **kwargs)
    scores, classes, query = pp.topk_pairs(pair_scores, 10, sorted=True)
    logits = pp.restrict_to_object(pp.resize_mask_logits(mask_logits[query], (20, 28), (20, 28)), object_mask)
    order = torch.argsort(scores, descending=True, stable=True)
    expected = pp.one_label_per_pixel(logits, scores)[order]
    assert torch.equal(got.masks, expected) and torch.equal(got.query_indices, query[order])
    overlapping = pp.part_inference(pair_scores, mask_logits, one_label=False, **kwargs)
    assert torch.equal(overlapping.masks, (logits > 0)[order])
