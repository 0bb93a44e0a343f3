"""Tests of the batched k-means (pixel grouping and part ranking use it)."""
from __future__ import annotations

import contextlib
import io
import re

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans, kmeans_plusplus

from part_distillation.models.kmeans import (
    _absolute_tolerance,
    _lloyd,
    assign_to_centroids,
    batched_kmeans,
    kmeans,
    kmeans_list,
)

torch.set_num_threads(2)


def blobs(seed: int, n: int, dim: int, k: int, spread: float = 10.0, noise: float = 1.0):
    """n points around k random centres; returns points (n, dim) and true labels (n,)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=g) * spread
    truth = torch.arange(n) % k
    truth = truth[torch.randperm(n, generator=g)]
    return centres[truth] + noise * torch.randn(n, dim, generator=g), truth


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Labels equal up to a permutation of the cluster ids."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def inertia_of(x: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor) -> float:
    return float(((x.double() - centroids.double()[labels]) ** 2).sum())


def lloyd_random_init(x: torch.Tensor, k: int, seed: int, iters: int = 100) -> float:
    """Plain Lloyd from k random points (the naive baseline); returns its inertia."""
    g = torch.Generator().manual_seed(seed)
    c = x[torch.randperm(len(x), generator=g)[:k]].clone()
    for _ in range(iters):
        labels = torch.cdist(x, c).argmin(1)
        new = torch.stack([x[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(k)])
        if torch.equal(new, c):
            break
        c = new
    return inertia_of(x, c, torch.cdist(x, c).argmin(1))


@pytest.mark.parametrize("dim", [8, 64])  # 64 > coarse dims: the projected coarse stage
def test_recovers_separated_blobs(dim):
    x, truth = blobs(0, 600, dim, 4)
    result = kmeans(x, 4)
    assert same_partition(result.labels, truth)
    assert result.counts.sum() == 600 and (result.counts == 150).all()
    assert result.centroids.shape == (4, dim) and result.labels.dtype == torch.long
    assert result.inertia.item() == pytest.approx(inertia_of(x, result.centroids, result.labels), rel=1e-4)


def test_labels_are_nearest_centroids_and_centroids_are_means():
    x, _ = blobs(1, 900, 48, 6, spread=3.0, noise=1.5)  # overlapping: a real Lloyd fixed point
    result = kmeans(x, 5)
    assert torch.equal(assign_to_centroids(x, result.centroids), result.labels)
    for j in range(5):
        assert torch.allclose(result.centroids[j], x[result.labels == j].mean(0), atol=1e-4)


def test_batched_equals_per_problem_with_same_seeds():
    sizes = [40, 300, 2500]
    problems = [blobs(10 + i, n, 32, 3, spread=4.0, noise=1.0)[0] for i, n in enumerate(sizes)]
    options = dict(n_init=2, sample_size=256)  # 2500 > 256: the sampled path too
    together = kmeans_list(problems, 4, seed=[7, 8, 9], **options)
    padded = torch.zeros(3, 2500, 32)
    mask = torch.zeros(3, 2500, dtype=torch.bool)
    for i, p in enumerate(problems):
        padded[i, : len(p)] = p
        mask[i, : len(p)] = True
    batched = batched_kmeans(padded, 4, mask, seed=[7, 8, 9], **options)
    for i, (p, seed) in enumerate(zip(problems, [7, 8, 9])):
        alone = kmeans(p, 4, seed=seed, **options)
        assert torch.equal(alone.labels, together[i].labels)
        assert torch.allclose(alone.centroids, together[i].centroids, atol=1e-4)
        assert torch.equal(alone.labels, batched.labels[i, : len(p)])
        assert (batched.labels[i, len(p):] == -1).all()
        assert torch.allclose(alone.inertia, batched.inertia[i], rtol=1e-5)


def test_int_seed_means_seed_plus_index():
    problems = [blobs(20 + i, 200, 16, 3, spread=2.0)[0] for i in range(3)]
    together = kmeans_list(problems, 3, seed=5)
    for i, p in enumerate(problems):
        assert torch.equal(kmeans(p, 3, seed=5 + i).labels, together[i].labels)


def test_mask_with_holes_equals_the_valid_points_alone():
    x, _ = blobs(3, 400, 24, 3)
    mask = torch.rand(400, generator=torch.Generator().manual_seed(0)) > 0.3
    masked = batched_kmeans(x[None], 3, mask[None], seed=[4])
    alone = kmeans(x[mask], 3, seed=4)
    assert torch.equal(masked.labels[0][mask], alone.labels)
    assert (masked.labels[0][~mask] == -1).all()


def test_chunked_equals_unchunked():
    x, _ = blobs(4, 3000, 40, 5, spread=3.0, noise=1.5)
    whole = kmeans(x, 5)
    chunked = kmeans(x, 5, chunk_size=97)
    assert torch.equal(whole.labels, chunked.labels)
    assert torch.allclose(whole.centroids, chunked.centroids, atol=1e-4)


def test_cpu_groups_do_not_change_the_answer():
    problems = torch.stack([blobs(30 + i, 500, 20, 3, spread=3.0)[0] for i in range(4)])
    one_group = batched_kmeans(problems, 3, seed=1)
    small_groups = batched_kmeans(problems, 3, seed=1, group_bytes=1)  # one problem per group
    assert torch.equal(one_group.labels, small_groups.labels)


def test_fewer_distinct_points_than_k():
    x = torch.tensor([[0.0, 0.0]] * 3 + [[5.0, 5.0]] * 4)
    result = kmeans(x, 4)
    assert sorted(result.counts.tolist()) == [0, 0, 3, 4]
    assert result.inertia.item() == pytest.approx(0.0, abs=1e-6)
    assert same_partition(result.labels, torch.tensor([0] * 3 + [1] * 4))
    # every centroid (also the empty clusters') sits on a data point
    assert all(((x - c).abs().sum(1) == 0).any() for c in result.centroids)


def test_all_identical_points_and_fewer_points_than_k():
    same = kmeans(torch.full((10, 3), 2.5), 3)
    assert (same.labels == same.labels[0]).all() and same.counts.max() == 10
    assert same.inertia.item() == pytest.approx(0.0, abs=1e-3)
    two = kmeans(torch.tensor([[0.0, 1.0], [4.0, 4.0]]), 4)
    assert two.labels[0] != two.labels[1] and two.counts.sum() == 2
    one = kmeans(torch.tensor([[1.0, 2.0, 3.0]]), 2)
    assert one.labels.tolist() == [one.labels[0].item()] and one.inertia.item() == pytest.approx(0.0, abs=1e-6)


def test_problem_without_points_gives_minus_one_labels():
    x = torch.randn(2, 50, 6)
    mask = torch.ones(2, 50, dtype=torch.bool)
    mask[1] = False
    result = batched_kmeans(x, 3, mask)
    assert (result.labels[1] == -1).all() and result.inertia[1] == 0 and (result.counts[1] == 0).all()
    assert (result.centroids[1] == 0).all()
    assert (result.labels[0] >= 0).all()
    empty = kmeans_list([torch.zeros(0, 6), x[0]], 3)
    assert empty[0].labels.shape == (0,) and empty[1].labels.shape == (50,)


def test_empty_cluster_is_reseeded_on_the_farthest_point():
    # One far outlier and two tight groups, K=3: the outlier must get its own cluster.
    x = torch.cat([torch.zeros(50, 4), torch.ones(50, 4), torch.full((1, 4), 40.0)])
    result = kmeans(x, 3, coarse_dims=0)
    assert sorted(result.counts.tolist()) == [1, 50, 50]
    assert result.inertia.item() == pytest.approx(0.0, abs=1e-3)


def test_never_worse_than_random_init_lloyd():
    x, _ = blobs(5, 1000, 16, 6, spread=6.0, noise=1.0)
    ours = kmeans(x, 6).inertia.item()
    for seed in range(5):
        assert ours <= lloyd_random_init(x, 6, seed) * (1 + 1e-6)


def test_median_quality_matches_sklearn_on_overlapping_blobs():
    ratios = []
    for seed in range(7):  # a single run of either is a local optimum: compare the median
        x, _ = blobs(60 + seed, 1500, 64, 6, spread=2.0, noise=1.5)
        theirs = KMeans(n_clusters=4, random_state=0, n_init=1).fit(x.numpy())
        ratios.append(kmeans(x, 4, seed=seed, n_init=1).inertia.item() / theirs.inertia_)
    assert float(np.median(ratios)) <= 1.01


def test_ten_restarts_match_sklearns_ten_restarts():
    """The stages' default (10 restarts) against what the reference ran (sklearn n_init=10)."""
    ratios = []
    for seed in range(5):
        x = bar(seed)
        theirs = KMeans(n_clusters=5, random_state=0, n_init=10).fit(x)
        ours = kmeans(torch.from_numpy(x), 5, seed=seed)
        ratios.append(inertia_of(torch.from_numpy(x), ours.centroids, ours.labels) / theirs.inertia_)
    assert float(np.median(ratios)) <= 1.0 + 1e-4 and max(ratios) <= 1.02  # bar(): many near-equal optima


def bar(seed: int, n: int = 3000, dim: int = 32) -> np.ndarray:
    """A uniform 2-D square in ``dim`` dims plus a little noise (float32): no cluster
    structure, so Lloyd creeps for many iterations with a small inertia gain per pass."""
    rng = np.random.default_rng(seed)
    square = rng.uniform(-1, 1, size=(n, 2))
    basis = np.linalg.qr(rng.normal(size=(dim, 2)))[0].T
    return (square @ basis * 5 + rng.normal(size=(n, dim)) * 0.05).astype(np.float32)


def sklearn_lloyd(x: np.ndarray, init: np.ndarray):
    """sklearn's Lloyd from ``init`` (tol 1e-4, max_iter 300) and how it stopped ("strict" or "shift")."""
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        fitted = KMeans(len(init), init=init, n_init=1, algorithm="lloyd", tol=1e-4, verbose=1).fit(x)
    said = re.search(r"Converged at iteration \d+: (strict convergence|center shift)", log.getvalue())
    assert said, log.getvalue()[-300:]
    return fitted, "strict" if said.group(1).startswith("strict") else "shift"


def lloyd_step_shift(x: np.ndarray, centroids: np.ndarray) -> float:
    """Squared centre shift summed over the centres of one more Lloyd step (float64, numpy)."""
    x = x.astype(np.float64)
    centroids = centroids.astype(np.float64)
    labels = ((x[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    means = np.stack([x[labels == j].mean(0) if (labels == j).any() else centroids[j]
                      for j in range(len(centroids))])
    return float(((means - centroids) ** 2).sum())


def relative_inertia_lloyd(x: np.ndarray, init: np.ndarray, tol: float = 1e-3):
    """Lloyd stopped by the rule this module used before (a pass lowers the inertia by at
    most ``tol`` of it), in float64: (assignment passes, centroids)."""
    x = x.astype(np.float64)
    centroids, previous, passes = init.astype(np.float64), np.inf, 0
    while True:
        dist = ((x[:, None, :] - centroids[None]) ** 2).sum(-1)
        labels, inertia = dist.argmin(1), dist.min(1).sum()
        passes += 1
        if previous - inertia <= tol * inertia:
            return passes, centroids
        previous = inertia
        centroids = np.stack([x[labels == j].mean(0) for j in range(len(centroids))])


def test_absolute_tolerance_is_sklearns():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(3, 200, 7)) * rng.uniform(0.1, 3, size=7) + 4).astype(np.float32)
    mask = rng.random((3, 200)) > 0.4
    xt = torch.from_numpy(x)
    norms = xt.square().sum(-1)
    whole = _absolute_tolerance(xt, norms, None, 1e-4)
    masked = _absolute_tolerance(xt, norms, torch.from_numpy(mask), 1e-4)
    for b in range(3):
        assert whole[b].item() == pytest.approx(1e-4 * np.var(x[b].astype(np.float64), axis=0).mean(), rel=1e-4)
        expected = 1e-4 * np.var(x[b][mask[b]].astype(np.float64), axis=0).mean()
        assert masked[b].item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lloyd_stops_where_sklearn_stops_from_the_same_start(seed):
    """Same data, same k-means++ start: same labels, inertia and iterations as sklearn."""
    x = bar(seed)
    init, _ = kmeans_plusplus(x, 5, random_state=seed)
    theirs, how = sklearn_lloyd(x, init)
    xt = torch.from_numpy(x)[None]
    tol_abs = torch.tensor([1e-4 * np.var(x.astype(np.float64), axis=0).mean()], dtype=torch.float64)
    centroids, labels, min_dist, _, n_iter = _lloyd(
        xt, xt.square().sum(-1), None, torch.from_numpy(init)[None, None], 300, tol_abs, 4096)
    assert np.array_equal(labels[0, :, 0].numpy(), theirs.labels_)
    assert min_dist.sum().item() == pytest.approx(theirs.inertia_, rel=1e-5)
    np.testing.assert_allclose(centroids[0, 0].numpy(), theirs.cluster_centers_, atol=1e-4)
    # passes over the points: sklearn's iterations, plus its final assignment after a shift stop
    assert int(n_iter) == theirs.n_iter_ + (1 if how == "shift" else 0)


def test_relative_inertia_rule_stopped_early_the_centre_shift_rule_does_not():
    """On slowly creeping data the old rule stopped with the centres still moving by far
    more than sklearn's tolerance; the module's answer is converged by sklearn's rule."""
    for seed in range(3):
        x = bar(seed)
        tol_abs = 1e-4 * np.var(x.astype(np.float64), axis=0).mean()
        init, _ = kmeans_plusplus(x, 5, random_state=seed)
        old_passes, old_centroids = relative_inertia_lloyd(x, init)
        theirs, _ = sklearn_lloyd(x, init)
        assert old_passes < theirs.n_iter_ and lloyd_step_shift(x, old_centroids) > 10 * tol_abs
        ours = kmeans(torch.from_numpy(x), 5, seed=seed)
        # float32 distances near ties: a float64 step may move a point or two more
        assert lloyd_step_shift(x, ours.centroids.numpy()) <= 2 * tol_abs
        assert torch.equal(assign_to_centroids(torch.from_numpy(x), ours.centroids), ours.labels)


def test_assign_to_centroids_l2_and_dot():
    x, _ = blobs(7, 300, 10, 3)
    c = torch.randn(5, 10)
    assert torch.equal(assign_to_centroids(x, c), torch.cdist(x, c).argmin(1))
    assert torch.equal(assign_to_centroids(x, c, metric="dot"), (x @ c.T).argmax(1))
    batched = assign_to_centroids(x[None].repeat(2, 1, 1), c[None].repeat(2, 1, 1), chunk_size=7)
    assert torch.equal(batched[1], torch.cdist(x, c).argmin(1))


def test_invalid_inputs():
    with pytest.raises(ValueError):
        batched_kmeans(torch.randn(10, 3), 2)
    with pytest.raises(ValueError):
        batched_kmeans(torch.randn(2, 10, 3), 2, torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError):
        kmeans(torch.randn(10, 3), 0)
    with pytest.raises(TypeError):
        kmeans(torch.ones(10, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError):
        kmeans_list([torch.randn(5, 3), torch.randn(5, 4)], 2)
    with pytest.raises(ValueError):
        batched_kmeans(torch.randn(2, 10, 3), 2, seed=[1, 2, 3])


@pytest.mark.requires("cuda")
def test_gpu_matches_cpu():
    problems = [blobs(40 + i, n, 64, 4, spread=5.0)[0] for i, n in enumerate([100, 700, 3000])]
    cpu = kmeans_list(problems, 4, seed=3)
    gpu = kmeans_list([p.cuda() for p in problems], 4, seed=3)
    for a, b in zip(cpu, gpu):
        assert b.labels.is_cuda
        assert same_partition(a.labels, b.labels.cpu())
        assert torch.allclose(a.inertia, b.inertia.cpu(), rtol=1e-4)
