"""Part ranking's computations on hand-worked values (docs/method.md#stage-5, docs/differences.md#trap-4 to #trap-6)."""
import math

import numpy as np
import pytest
import torch

from part_distillation.models import part_ranking as ranking


def test_classifiers_on_hand_values():
    x = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    c = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # dot: x·c
    np.testing.assert_allclose(ranking.cluster_logits(x, c, "dot"), [[1.0, 0.0], [0.6, 1.6]])
    # l2: x·c - |x|^2 - |c|^2, no factor 2 (docs/differences.md#trap-6): [1-1-1, 0-1-4], [0.6-1-1, 1.6-1-4]
    np.testing.assert_allclose(ranking.cluster_logits(x, c, "l2"), [[-1.0, -5.0], [-1.4, -3.4]], atol=1e-6)
    with pytest.raises(ValueError, match="classifier"):
        ranking.cluster_logits(x, c, "cosine")


def test_label_pair_scores_are_foreground_probability_times_cluster_softmax():
    class_logits = torch.tensor([[2.0, 0.0]])  # foreground prob = sigmoid(2)
    x = torch.tensor([[1.0, 0.0]])
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    fg = 1 / (1 + math.exp(-2))
    # l2 logits [1-1-1, 0-1-1] = [-1, -2]: softmax [e/(e+1), 1/(e+1)]
    want = [fg * math.e / (math.e + 1), fg / (math.e + 1)]
    np.testing.assert_allclose(ranking.label_pair_scores(class_logits, x, c, "l2")[0], want, rtol=1e-6)


def _logits(h, w, boxes):
    """(Q, h, w) mask logits: +10 inside each (r0, r1, c0, c1) box, -10 elsewhere."""
    out = torch.full((len(boxes), h, w), -10.0)
    for q, (r0, r1, c0, c1) in enumerate(boxes):
        out[q, r0:r1, c0:c1] = 10.0
    return out


def test_cluster_pass_labels_the_whole_image_before_restricting_to_the_object():
    # 8 x 12 image, object = columns 0..5
    obj = torch.zeros(8, 12, dtype=torch.bool)
    obj[:, :6] = True
    boxes = [(0, 4, 0, 4),    # q0: in the object, fg sigmoid(2)
             (4, 8, 0, 4),    # q1: in the object, fg sigmoid(1)
             (0, 8, 8, 12),   # q2: outside the object, fg sigmoid(3): kept by area and score, dropped by IoU
             (0, 1, 0, 1),    # q3: one pixel (1/80 of the predicted foreground): dropped by area
             (0, 8, 4, 6)]    # q4: in the object, fg sigmoid(-2) = 0.12 < 0.3: dropped by score
    class_logits = torch.tensor([[2.0, 0], [1.0, 0], [3.0, 0], [3.0, 0], [-2.0, 0]])
    embeddings = torch.arange(5 * 3, dtype=torch.float32).reshape(5, 3) + 1
    got, kept = ranking.cluster_pass(class_logits, _logits(8, 12, boxes), embeddings, obj,
                                     padded_size=(8, 12), image_size=(8, 12))
    assert kept.query_indices.tolist() == [0, 1]  # by descending score
    want = embeddings[[0, 1]] / embeddings[[0, 1]].norm(dim=1, keepdim=True)
    torch.testing.assert_close(got, want)
    assert kept.masks[0].sum() == 15 and kept.masks[1].sum() == 16  # q3 took its pixel from q0


def test_label_pass_merges_clusters_restricts_and_filters():
    # 8 x 8 image, object = columns 0..3 (32 pixels)
    obj = torch.zeros(8, 8, dtype=torch.bool)
    obj[:, :4] = True
    boxes = [(0, 4, 0, 4),   # q0 -> cluster 0, fg sigmoid(2)
             (4, 8, 0, 4),   # q1 -> cluster 0, fg sigmoid(1): merged with q0
             (0, 8, 4, 8),   # q2: outside the object: empty once restricted (before binarising)
             (0, 1, 0, 1)]   # q3 -> cluster 1, fg sigmoid(3): wins pixel (0, 0), 1/32 < 5%: dropped
    class_logits = torch.tensor([[2.0, 0], [1.0, 0], [0.0, 0], [3.0, 0]])
    embeddings = torch.tensor([[1.0, 0], [1.0, 0], [1.0, 0], [0, 1.0]])
    centroids = torch.tensor([[1.0, 0], [0, 1.0]])
    parts = ranking.label_pass(class_logits, _logits(8, 8, boxes), embeddings, centroids, obj,
                               padded_size=(8, 8), image_size=(8, 8), classifier="dot")
    assert parts.classes.tolist() == [0]
    want_mask = obj.clone()
    want_mask[0, 0] = False
    assert torch.equal(parts.masks[0], want_mask)
    # the cluster's score: the best member, q0: sigmoid(2) x softmax([1, 0])[0]
    sig2 = 1 / (1 + math.exp(-2))
    assert parts.scores[0].item() == pytest.approx(sig2 * math.e / (math.e + 1), rel=1e-5)
    # with a threshold between the two clusters' scores only the higher one survives anyway;
    # lowering the area filter keeps cluster 1's single pixel as a second part
    parts = ranking.label_pass(class_logits, _logits(8, 8, boxes), embeddings, centroids, obj,
                               padded_size=(8, 8), image_size=(8, 8), classifier="dot",
                               settings=ranking.PassSettings(min_area_ratio=0.01, min_score=0.1))
    assert sorted(parts.classes.tolist()) == [0, 1]
    assert parts.masks[parts.classes == 1].sum() == 1


def test_label_pass_keeps_every_part_when_none_passes_the_score_or_area_filter():
    """The reference's ``if valid.any()``: each filter keeps what it was given when nothing passes."""
    obj = torch.ones(4, 4, dtype=torch.bool)
    centroids = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # score: fg sigmoid(-3) = 0.047 x softmax < 0.1 for both clusters: both kept
    class_logits = torch.tensor([[-3.0, 0.0], [-3.0, 0.0]])
    logits = _logits(4, 4, [(0, 4, 0, 2), (0, 4, 2, 4)])
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    parts = ranking.label_pass(class_logits, logits, embeddings, centroids, obj, padded_size=(4, 4),
                               image_size=(4, 4), classifier="dot")
    assert sorted(parts.classes.tolist()) == [0, 1] and (parts.scores < 0.1).all()
    assert [int(m.sum()) for m in parts.masks] == [8, 8]
    # area: each cluster owns half of the object, below a 60% threshold: both kept, then the
    # score filter (both pass 0.1 here) keeps both too
    parts = ranking.label_pass(torch.tensor([[3.0, 0.0], [3.0, 0.0]]), logits, embeddings, centroids, obj,
                               padded_size=(4, 4), image_size=(4, 4), classifier="dot",
                               settings=ranking.PassSettings(min_area_ratio=0.6, min_score=0.1))
    assert sorted(parts.classes.tolist()) == [0, 1]
    # the IoU-with-the-object filter has no fallback: nothing of the object predicted, nothing kept
    far = torch.zeros(4, 4, dtype=torch.bool)
    far[0, 0] = True
    parts = ranking.label_pass(class_logits, _logits(4, 4, [(2, 4, 2, 4), (2, 4, 2, 4)]), embeddings, centroids,
                               far, padded_size=(4, 4), image_size=(4, 4), classifier="dot")
    assert len(parts) == 0


def test_cluster_pass_keeps_every_proposal_when_none_passes_the_score_or_area_filter():
    """Each of the area and score filters falls back to what it was given, in turn; the IoU filter does not."""
    obj = torch.ones(4, 4, dtype=torch.bool)
    # score: both queries cover half the image, foreground sigmoid(-1) = 0.27 < 0.3: both kept
    got, kept = ranking.cluster_pass(torch.tensor([[-1.0, 0.0], [-1.5, 0.0]]), _logits(4, 4, [(0, 4, 0, 2), (0, 4, 2, 4)]),
                                     torch.eye(3)[:2], obj, padded_size=(4, 4), image_size=(4, 4))
    assert kept.query_indices.tolist() == [0, 1] and got.shape == (2, 3)
    # area then score: a 40 x 40 foreground of one big low-score query, the high-score ones own 1
    # pixel each (1/1600 < 5%): the area filter keeps the big one alone; it fails the score
    # filter (0.12 < 0.3), which then keeps what it was given: the big one, not the small ones
    boxes = [(0, 40, 0, 40), (0, 1, 0, 1), (39, 40, 39, 40)]
    got, kept = ranking.cluster_pass(torch.tensor([[-2.0, 0.0], [3.0, 0.0], [3.0, 0.0]]), _logits(40, 40, boxes),
                                     torch.eye(3), torch.ones(40, 40, dtype=torch.bool),
                                     padded_size=(40, 40), image_size=(40, 40))
    assert kept.query_indices.tolist() == [0]
    torch.testing.assert_close(got, torch.eye(3)[:1])
    # every proposal off the object: the IoU filter leaves nothing (no fallback)
    off = torch.zeros(4, 4, dtype=torch.bool)
    off[0, 0] = True
    got, kept = ranking.cluster_pass(torch.tensor([[2.0, 0.0]]), _logits(4, 4, [(2, 4, 2, 4)]), torch.ones(1, 3),
                                     off, padded_size=(4, 4), image_size=(4, 4))
    assert got.shape == (0, 3) and len(kept) == 0
