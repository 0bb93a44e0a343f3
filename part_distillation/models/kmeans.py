"""One batched k-means for the whole pipeline (pixel grouping and part ranking).

Many independent problems are solved at once: ``points`` (B, N, D) with a validity
``mask`` (B, N) for problems of different sizes, or a list (:func:`kmeans_list`).
Everything runs on the device of the inputs.

The contract is sklearn ``KMeans``'s of the reference's era (k-means++, ``n_init=10``
restarts, ``max_iter=300``, ``tol=1e-4``): the answer is a Lloyd fixed point in the full
feature space, stopped by sklearn's rule. Lloyd stops when an iteration changes no
label, or when its centre update moves the centres by at most
``tol * mean(var(X, axis=0))`` (the squared shift summed over the K centres; the
variance is the problem's own, over its valid points); the labels returned are then the
nearest centres of the returned centroids (sklearn's final assignment). The
relative-inertia rule this module used before stopped after 3-5 passes with the
centres still moving by far more than that.

The speed comes from needing few passes over all points, which is what k-means costs.
These tricks are kept because none of them changes what the stopping rule means:

1. Coarse coordinates: up to ``sample_size`` random points per problem projected on
   ``coarse_dims`` principal directions of the problem (one step of subspace iteration
   on 256 of those points; one small matmul).
2. Restarts, in those few dimensions: ``n_init`` runs of greedy k-means++ (sklearn's
   variant: ``2 + log K`` candidates per step, the one that lowers the potential most)
   and Lloyd with the rule above (tolerance from the variance of the coarse
   coordinates), all runs and all problems sharing each batched matmul; the run with
   the lowest inertia wins. So the restarts pick the starting point; they are not
   ``n_init`` full-data Lloyd runs as in sklearn (benchmarks B1 and B5 compare the
   inertia with sklearn's ``n_init=10``).
3. Lift: full-dimensional centroids are the means of the sampled points' clusters.
4. Refinement: Lloyd on all points in all dimensions from those centroids, with the
   rule above on the full data (sklearn's tolerance, sklearn's meaning). Cluster sums
   are updated with the changed points only when few changed (exact up to float32
   rounding, far below the tolerance).

Distances use ||x||^2 - 2 x.c + ||c||^2 (batched matmuls) in float32. Each problem
draws its randomness from its own ``torch.Generator``, so its answer does not depend on
what it is batched with. Passes are chunked over points (bounded temporaries for
millions of points); on CPU, problems go in cache-sized groups. Empty clusters are
re-seeded with the points farthest from their centres; a cluster stays empty (count 0,
a duplicate centroid) only when every point already sits on a centre, i.e. there are
fewer distinct points than K.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = [
    "KMeansResult", "batched_kmeans", "kmeans", "kmeans_list", "assign_to_centroids",
    "default_sample_size", "default_coarse_dims",
]

_CHUNK_ELEMENTS = 1 << 21          # elements of one (B, chunk, R*K) distance block
_CPU_GROUP_BYTES = 24 << 20        # full-dim data per group of problems on CPU (cache)
_GPU_GROUP_BYTES = 1 << 31
_COARSE_BYTES = 64 << 20           # coarse data solved together
_INCREMENTAL_FRACTION = 0.125      # above it, cluster sums are recomputed from scratch
_PCA_POINTS = 256                  # points per problem that estimate the coarse directions
_PROJECTION_SEED = 20230601        # fixed: the directions must not depend on batching


@dataclass(frozen=True)
class KMeansResult:
    """Result of k-means: per problem (leading dim B) or for one problem (no B dim).

    centroids (B, K, D) float32; labels (B, N) int64, -1 where the point is masked out;
    inertia (B,) float64, sum of squared distances to the assigned centroid; counts
    (B, K) int64 cluster sizes (0 only when there were fewer distinct points than K);
    n_iter (B,) assignment passes over all points in the refinement (sklearn's
    ``n_iter_`` plus its final assignment when it stopped on the centre shift).
    """

    centroids: torch.Tensor
    labels: torch.Tensor
    inertia: torch.Tensor
    counts: torch.Tensor
    n_iter: torch.Tensor


def default_sample_size(n_clusters: int) -> int:
    """Points per problem that fit the coarse clustering (fewer: all of them)."""
    return max(512, 128 * n_clusters)


def default_coarse_dims(n_clusters: int) -> int:
    """Principal directions of the coarse stage (K clusters span K - 1 of them)."""
    return max(16, 2 * n_clusters)


def batched_kmeans(
    points: torch.Tensor,
    n_clusters: int,
    mask: torch.Tensor | None = None,
    *,
    n_init: int = 10,
    max_iter: int = 300,
    tol: float = 1e-4,
    seed: int | Sequence[int] = 0,
    sample_size: int | None = None,
    coarse_dims: int | None = None,
    chunk_size: int | None = None,
    group_bytes: int | None = None,
) -> KMeansResult:
    """K-means on B independent problems: points (B, N, D), mask (B, N) of valid points.

    ``seed``: an int (problem b uses ``seed + b``) or one seed per problem; a problem's
    result depends only on its points and its seed. ``n_init`` k-means++ restarts are
    compared in the coarse stage (they cost little there; default 10 as the reference's
    sklearn). ``max_iter`` bounds the Lloyd iterations (centre updates) of each stage;
    a stage stops as sklearn does (module notes): no label changed, or the squared
    centre shift summed over the centres is at most ``tol`` times the problem's mean
    feature variance.
    ``sample_size``/``coarse_dims`` shape the coarse stage (defaults
    :func:`default_sample_size`, :func:`default_coarse_dims`; ``coarse_dims=0`` keeps
    all dimensions). ``chunk_size`` bounds the points per pass step; ``group_bytes``
    the full-dimensional data handled together (default: cache-sized on CPU).
    """
    if points.dim() != 3:
        raise ValueError(f"points must be (B, N, D), got shape {tuple(points.shape)}")
    if not points.is_floating_point():
        raise TypeError(f"points must be floating point, got {points.dtype}")
    batch, num_points, dim = points.shape
    device = points.device
    if mask is None:
        mask = torch.ones(batch, num_points, dtype=torch.bool, device=device)
    if mask.shape != (batch, num_points):
        raise ValueError(f"mask must be {(batch, num_points)}, got {tuple(mask.shape)}")
    mask = mask.to(device=device, dtype=torch.bool)
    seeds = _problem_seeds(seed, batch)
    points = points.float()
    if group_bytes is None:
        group_bytes = _CPU_GROUP_BYTES if device.type == "cpu" else _GPU_GROUP_BYTES
    options = _options(n_clusters, n_init, max_iter, tol, sample_size, coarse_dims, chunk_size)

    def groups():
        per_group = max(1, group_bytes // max(1, num_points * dim * 4))
        for start in range(0, batch, per_group):
            stop = min(batch, start + per_group)
            length = _used_length(mask[start:stop])
            if length:  # a group without valid points keeps zeros and labels -1
                yield start, points[start:stop, :length], mask[start:stop, :length], seeds[start:stop]

    centroids = points.new_zeros(batch, n_clusters, dim)
    labels = torch.full((batch, num_points), -1, dtype=torch.long, device=device)
    inertia = torch.zeros(batch, dtype=torch.float64, device=device)
    counts = torch.zeros(batch, n_clusters, dtype=torch.long, device=device)
    n_iter = torch.zeros(batch, dtype=torch.long, device=device)
    for start, result in _solve_groups(groups(), **options):
        rows = slice(start, start + result.labels.shape[0])
        centroids[rows] = result.centroids
        labels[rows, : result.labels.shape[1]] = result.labels
        inertia[rows], counts[rows], n_iter[rows] = result.inertia, result.counts, result.n_iter
    return KMeansResult(centroids, labels, inertia, counts, n_iter)


def kmeans(points: torch.Tensor, n_clusters: int, **kwargs) -> KMeansResult:
    """K-means on one problem, points (N, D); same options as :func:`batched_kmeans`.

    Returns centroids (K, D), labels (N,), inertia (0-d), counts (K,) and n_iter (0-d).
    """
    if points.dim() != 2:
        raise ValueError(f"points must be (N, D), got shape {tuple(points.shape)}")
    seed = kwargs.pop("seed", 0)
    result = batched_kmeans(points[None], n_clusters, seed=[int(seed)], **kwargs)
    return KMeansResult(*(field[0] for field in _fields(result)))


def kmeans_list(
    problems: Sequence[torch.Tensor],
    n_clusters: int,
    *,
    n_init: int = 10,
    max_iter: int = 300,
    tol: float = 1e-4,
    seed: int | Sequence[int] = 0,
    sample_size: int | None = None,
    coarse_dims: int | None = None,
    chunk_size: int | None = None,
    group_bytes: int | None = None,
) -> list[KMeansResult]:
    """K-means on problems of different sizes, each (N_i, D), without a padded copy on CPU.

    Problem i uses seed ``seed + i`` (or ``seed[i]``), as in :func:`batched_kmeans`, so
    its answer equals ``kmeans(problems[i], seed=...)``; the options are the same.
    Results come back in the input order, shaped as :func:`kmeans` returns them. On CPU
    each problem is refined in place (no copy); on GPU similar sizes are packed into
    padded groups of at most ``group_bytes``. The coarse stage is shared either way.
    """
    if len(problems) == 0:
        return []
    if any(p.dim() != 2 for p in problems) or len({p.shape[1] for p in problems}) != 1:
        raise ValueError("problems must all be (N_i, D) with the same D")
    if any(not p.is_floating_point() for p in problems):
        raise TypeError("problems must be floating point")
    seeds = _problem_seeds(seed, len(problems))
    device, dim = problems[0].device, problems[0].shape[1]
    if group_bytes is None:
        group_bytes = _CPU_GROUP_BYTES if device.type == "cpu" else _GPU_GROUP_BYTES
    options = _options(n_clusters, n_init, max_iter, tol, sample_size, coarse_dims, chunk_size)
    nonempty = [i for i in range(len(problems)) if problems[i].shape[0] > 0]

    def groups():
        if device.type == "cpu":
            for i in nonempty:
                x = problems[i].to(torch.float32).contiguous()[None]
                yield [i], x, torch.ones(x.shape[:2], dtype=torch.bool), [seeds[i]]
            return
        order = sorted(nonempty, key=lambda i: problems[i].shape[0])  # similar sizes together
        batch: list[int] = []
        for i in order + [None]:
            if batch and (i is None or (len(batch) + 1) * problems[i].shape[0] * dim * 4 > group_bytes):
                length = problems[batch[-1]].shape[0]
                x = torch.zeros(len(batch), length, dim, device=device)
                mask = torch.zeros(len(batch), length, dtype=torch.bool, device=device)
                for row, j in enumerate(batch):
                    x[row, : problems[j].shape[0]] = problems[j]
                    mask[row, : problems[j].shape[0]] = True
                yield batch, x, mask, [seeds[j] for j in batch]
                batch = []
            if i is not None:
                batch.append(i)

    results: list[KMeansResult | None] = [None] * len(problems)
    for i in range(len(problems)):
        if problems[i].shape[0] == 0:
            results[i] = KMeansResult(
                torch.zeros(n_clusters, dim, device=device), torch.zeros(0, dtype=torch.long, device=device),
                torch.zeros((), dtype=torch.float64, device=device),
                torch.zeros(n_clusters, dtype=torch.long, device=device), torch.zeros((), dtype=torch.long, device=device))
    for indices, result in _solve_groups(groups(), **options):
        for row, i in enumerate(indices):
            n = problems[i].shape[0]
            results[i] = KMeansResult(result.centroids[row], result.labels[row, :n], result.inertia[row],
                                      result.counts[row], result.n_iter[row])
    return results  # type: ignore[return-value]


def assign_to_centroids(
    points: torch.Tensor, centroids: torch.Tensor, metric: str = "l2", chunk_size: int | None = None
) -> torch.Tensor:
    """Index of the nearest centroid per point: points (N, D) or (B, N, D), centroids (K, D) or (B, K, D).

    ``metric`` "l2" (smallest squared distance) or "dot" (largest dot product).
    """
    if metric not in ("l2", "dot"):
        raise ValueError(f"metric must be 'l2' or 'dot', got {metric!r}")
    if points.dim() != centroids.dim() or points.dim() not in (2, 3):
        raise ValueError(f"points {tuple(points.shape)} and centroids {tuple(centroids.shape)} "
                         "must both be 2-D or both 3-D")
    batched = points.dim() == 3
    x = points if batched else points[None]
    c = (centroids if batched else centroids[None]).to(x.dtype)
    chunk = chunk_size or max(1, _CHUNK_ELEMENTS // max(1, x.shape[0] * c.shape[1]))
    out = torch.empty(x.shape[:2], dtype=torch.long, device=x.device)
    c_t = c.transpose(1, 2)
    half_norm = 0.5 * c.square().sum(-1)[:, None, :]
    for start in range(0, x.shape[1], chunk):
        scores = torch.bmm(x[:, start:start + chunk], c_t)
        if metric == "l2":
            scores = scores - half_norm  # argmax of x.c - |c|^2/2 == argmin of |x - c|^2
        out[:, start:start + chunk] = scores.argmax(-1)
    return out if batched else out[0]


# --------------------------------------------------------------------------- internals


@dataclass
class _Group:
    """One group of problems between the stages (all tensors on the points' device)."""

    key: object                       # the caller's name for the group
    x: torch.Tensor                   # (G, n, D) contiguous points
    mask: torch.Tensor | None         # (G, n), None when every point is valid
    x_norm: torch.Tensor              # (G, n) squared norms
    z: torch.Tensor                   # (G, m, d) coarse coordinates of the sampled points
    sample_index: torch.Tensor        # (G, m) rows that fit the coarse clustering
    sample_mask: torch.Tensor | None  # (G, m), None when every sample slot is used
    uniforms: torch.Tensor            # (G, n_init, draws) k-means++ draws

    @property
    def coarse_bytes(self) -> int:
        return self.sample_index.numel() * self.z.shape[-1] * 4 * 4  # sample and temporaries


def _options(n_clusters, n_init, max_iter, tol, sample_size, coarse_dims, chunk_size) -> dict:
    """The checked options of a solve, defaults filled in."""
    sample_size = default_sample_size(n_clusters) if sample_size is None else int(sample_size)
    coarse_dims = default_coarse_dims(n_clusters) if coarse_dims is None else int(coarse_dims)
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    if n_init < 1 or max_iter < 1 or tol < 0 or sample_size < 1 or coarse_dims < 0:
        raise ValueError("need n_init >= 1, max_iter >= 1, tol >= 0, sample_size >= 1, coarse_dims >= 0; got "
                         f"{n_init}, {max_iter}, {tol}, {sample_size}, {coarse_dims}")
    return dict(k=n_clusters, n_init=n_init, max_iter=max_iter, tol=tol, sample_size=sample_size,
                coarse_dims=coarse_dims, chunk_size=chunk_size)


def _fields(result: KMeansResult):
    return (result.centroids, result.labels, result.inertia, result.counts, result.n_iter)


def _problem_seeds(seed, batch: int) -> list[int]:
    if isinstance(seed, int) or (torch.is_tensor(seed) and seed.dim() == 0):
        return [int(seed) + b for b in range(batch)]
    seeds = [int(s) for s in seed]
    if len(seeds) != batch:
        raise ValueError(f"{len(seeds)} seeds for {batch} problems")
    return seeds


def _used_length(mask: torch.Tensor) -> int:
    """Points up to the last valid one in any problem of the group (drops padding)."""
    any_valid = mask.any(0)
    if not bool(any_valid.any()):
        return 0
    return int(any_valid.nonzero()[-1]) + 1


def _plan_group(key, x, mask, seeds, sample_size, coarse_dims, k, n_init) -> _Group:
    """Norms, coarse coordinates and the per-problem random draws of one group.

    Problem b's generator gives, in this order: its k-means++ uniforms, then (when it
    has more points than ``sample_size`` or needs principal directions) one random
    permutation of its points; the sample is its first ``sample_size`` entries (all
    points in order when there are fewer), the directions come from the first 256.
    """
    x = x.contiguous()
    batch, n, dim = x.shape
    counts = mask.sum(1).tolist()
    full_mask = None if min(counts) == n else mask
    x_norm = torch.linalg.vector_norm(x, dim=-1).square_()
    project = 0 < coarse_dims < dim
    m = min(sample_size, max(counts))
    pca_points = min(_PCA_POINTS, max(counts))
    trials = 2 + int(math.log(k)) if k > 1 else 0

    uniforms = torch.empty(batch, n_init, 1 + (k - 1) * trials, dtype=torch.float64)
    sample_index = torch.zeros(batch, m, dtype=torch.long)
    sample_mask = torch.zeros(batch, m, dtype=torch.bool)
    pca_index = torch.zeros(batch, pca_points, dtype=torch.long)
    pca_mask = torch.zeros(batch, pca_points, dtype=torch.bool)
    valid_rows = mask.cpu() if full_mask is not None else None
    for b, problem_seed in enumerate(seeds):
        generator = torch.Generator().manual_seed(problem_seed)
        uniforms[b] = torch.rand(n_init, uniforms.shape[2], generator=generator, dtype=torch.float64)
        count = counts[b]
        rows = torch.arange(n) if valid_rows is None else valid_rows[b].nonzero().squeeze(1)
        order = torch.randperm(count, generator=generator) if count > sample_size or project else None
        chosen = rows[order[:sample_size]] if count > sample_size else rows
        sample_index[b, : len(chosen)] = chosen
        sample_mask[b, : len(chosen)] = True
        if project:
            pca = rows[order[:pca_points]]
            pca_index[b, : len(pca)] = pca
            pca_mask[b, : len(pca)] = True

    device = x.device
    sample_index = sample_index.to(device)
    sample_mask = None if bool(sample_mask.all()) else sample_mask.to(device)
    x_sample = _gather_rows(x, sample_index)
    z = _project(x_sample, x, pca_index.to(device), pca_mask.to(device), coarse_dims) if project else x_sample
    return _Group(key, x, full_mask, x_norm, z, sample_index, sample_mask, uniforms.to(device))


def _gather_rows(x, index):
    """Rows of each problem: x (B, n, D), index (B, m) -> (B, m, D)."""
    batch, n, dim = x.shape
    offsets = torch.arange(batch, device=x.device)[:, None] * n
    return x.reshape(batch * n, dim).index_select(0, (index + offsets).reshape(-1)).view(*index.shape, dim)


def _project(points, x, pca_index, pca_mask, dims):
    """Every point on its problem's leading principal directions: (B, n, dims).

    One step of subspace iteration (W = S^T S Omega) on a few centred points per
    problem: no SVD, and it tilts a random basis toward the high-variance directions,
    where clusters separate. Omega is fixed, so batching changes nothing.
    """
    weights = pca_mask.to(x.dtype)[..., None]
    pts = _gather_rows(x, pca_index)
    mean = (pts * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp(min=1)
    centred = (pts - mean) * weights
    omega = _test_matrix(x.shape[-1], dims, x.device)
    spread = torch.bmm((centred @ omega).transpose(1, 2), centred)  # (B, dims, D) = (S^T S Omega)^T
    basis = torch.linalg.qr(spread.transpose(1, 2)).Q  # (B, D, dims)
    return torch.baddbmm(-(mean @ basis), points, basis)


@functools.lru_cache(maxsize=16)
def _test_matrix(dim: int, dims: int, device: torch.device) -> torch.Tensor:
    """The fixed random start of the subspace iteration (cached: it is the same every call)."""
    generator = torch.Generator().manual_seed(_PROJECTION_SEED)
    return torch.randn(dim, dims, generator=generator).to(device)


def _solve_groups(inputs, *, k, n_init, max_iter, tol, sample_size, coarse_dims, chunk_size):
    """(key, points, mask, seeds) per group -> (key, KMeansResult of the group), lazily.

    Groups are planned one by one (full-dimensional reads), their coarse problems solved
    together once they fill ``_COARSE_BYTES``, then each group is refined.
    """
    pending: list[_Group] = []
    for key, x, mask, seeds in inputs:
        pending.append(_plan_group(key, x, mask, seeds, sample_size, coarse_dims, k, n_init))
        if sum(g.coarse_bytes for g in pending) >= _COARSE_BYTES:
            yield from _solve(pending, k, n_init, max_iter, tol, chunk_size)
            pending = []
    if pending:
        yield from _solve(pending, k, n_init, max_iter, tol, chunk_size)


def _solve(groups: list[_Group], k, n_init, max_iter, tol, chunk_size):
    """Coarse fit of all the groups' samples at once, then lift and refine each group."""
    samples = [g.z for g in groups]
    m = max(z.shape[1] for z in samples)
    any_mask = any(g.sample_mask is not None or z.shape[1] < m for g, z in zip(groups, samples))
    z = torch.cat([_pad_rows(z, m) for z in samples])
    z_mask = torch.cat([
        _pad_rows(g.sample_mask if g.sample_mask is not None
                  else torch.ones(g.sample_index.shape, dtype=torch.bool, device=z.device), m)
        for g in groups]) if any_mask else None
    uniforms = torch.cat([g.uniforms for g in groups])
    z_norm = z.square().sum(-1)
    batch = z.shape[0]
    init = _kmeans_plus_plus(z, z_norm, z_mask, uniforms, k)
    centroids, _, min_dist, _, _ = _lloyd(z, z_norm, z_mask, init, max_iter,
                                          _absolute_tolerance(z, z_norm, z_mask, tol),
                                          _chunk_for(batch, n_init * k, chunk_size))
    best = min_dist.sum(1, dtype=torch.float64).argmin(1)  # (B,): lowest coarse inertia
    centroids = torch.gather(centroids, 1, best[:, None, None, None].expand(batch, 1, k, z.shape[-1]))
    row = 0
    for g in groups:
        size = g.x.shape[0]
        yield g.key, _refine(g, centroids[row:row + size], k, max_iter, tol, chunk_size)
        row += size


def _pad_rows(t, m):
    if t.shape[1] == m:
        return t
    return torch.cat([t, t.new_zeros(t.shape[0], m - t.shape[1], *t.shape[2:])], 1)


def _refine(g: _Group, coarse_centroids, k, max_iter, tol, chunk_size) -> KMeansResult:
    """Lift the coarse clusters of the sample to full-dimensional means, then run Lloyd on all points."""
    x, batch = g.x, g.x.shape[0]
    chunk = _chunk_for(batch, k, chunk_size)
    z_norm = g.z.square().sum(-1)
    labels = _assign(g.z, z_norm, g.sample_mask, coarse_centroids, chunk)[0]
    x_sample = _gather_rows(x, g.sample_index)
    sums, counts = _cluster_sums(x_sample, labels, g.sample_mask, k, chunk)
    centroids = _fill_empty(x_sample, g.sample_mask, sums / counts.clamp(min=1)[..., None], counts)
    tol_abs = _absolute_tolerance(x, g.x_norm, g.mask, tol)
    centroids, labels, min_dist, counts, n_iter = _lloyd(x, g.x_norm, g.mask, centroids, max_iter, tol_abs, chunk)
    centroids, labels, counts, n_iter = centroids[:, 0], labels[..., 0], counts[:, 0], n_iter[:, 0]
    inertia = min_dist[..., 0].sum(1, dtype=torch.float64)
    if g.mask is not None:
        labels = labels.masked_fill(~g.mask, -1)
        centroids = centroids.masked_fill(~g.mask.any(1)[:, None, None], 0)  # problems without points
    return KMeansResult(centroids, labels, inertia, counts, n_iter)


def _fill_empty(x, mask, centroids, counts):
    """Put the centre of an empty cluster on the problem's first valid point.

    (The refinement moves it to a far point if there is one not already on a centre.)
    """
    batch = x.shape[0]
    first = torch.zeros(batch, dtype=torch.long, device=x.device) if mask is None else mask.long().argmax(1)
    point = x[torch.arange(batch, device=x.device), first]
    return torch.where((counts == 0)[..., None], point[:, None, None, :], centroids)


def _chunk_for(batch: int, runs_k: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return max(1, int(chunk_size))
    return max(256, _CHUNK_ELEMENTS // max(1, batch * runs_k))


def _assign(x, x_norm, mask, centroids, chunk):
    """Nearest centre per point for R runs: centroids (B, R, K, D) -> labels, min dist (B, N, R).

    ``mask`` None means all points are valid (saves the masking passes).
    """
    batch, runs, k, dim = centroids.shape
    flat = centroids.reshape(batch, runs * k, dim)
    c_t = flat.transpose(1, 2)
    c_norm = flat.square().sum(-1)[:, None, :]
    n = x.shape[1]
    labels = torch.empty(batch, n, runs, dtype=torch.long, device=x.device)
    min_dist = torch.empty(batch, n, runs, dtype=x.dtype, device=x.device)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        dist = torch.baddbmm(c_norm, x[:, start:stop], c_t, alpha=-2.0)  # (B, c, R*K)
        torch.min(dist.view(batch, stop - start, runs, k), -1,
                  out=(min_dist[:, start:stop], labels[:, start:stop]))
    min_dist.add_(x_norm[..., None]).clamp_(min=0)
    if mask is not None:
        min_dist.masked_fill_(~mask[..., None], 0)
    return labels, min_dist


def _cluster_sums(x, labels, mask, k, chunk):
    """Per-cluster sums and counts: labels (B, N, R) -> (B, R, K, D), (B, R, K) int64.

    A one-hot matrix times the points (one batched matmul per chunk, parallel on every
    device); masked points go to a dropped extra row.
    """
    batch, n, runs = labels.shape
    dim = x.shape[-1]
    rows = runs * k
    sums = x.new_zeros(batch, rows, dim)
    counts = torch.zeros(batch, rows, dtype=torch.long, device=x.device)
    offsets = torch.arange(runs, device=x.device) * k
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        index = labels[:, start:stop] + offsets  # (B, c, R)
        if mask is not None:
            index = index.masked_fill(~mask[:, start:stop, None], rows)
        onehot = x.new_zeros(batch, rows + 1, stop - start)
        onehot.scatter_(1, index.transpose(1, 2), 1.0)
        onehot = onehot[:, :rows]
        sums.baddbmm_(onehot, x[:, start:stop])
        counts += onehot.sum(-1).long()
    return sums.view(batch, runs, k, dim), counts.view(batch, runs, k)


def _update_sums(x, sums, counts, old, new, changed, k):
    """Single run: move only the points that changed cluster between the sums."""
    batch, n, _ = old.shape
    where = changed.reshape(-1).nonzero().squeeze(1)
    if where.numel() == 0:
        return sums, counts
    rows = x.reshape(batch * n, -1).index_select(0, where)
    problem = torch.div(where, n, rounding_mode="floor") * k
    old_index = problem + old.reshape(-1)[where]
    new_index = problem + new.reshape(-1)[where]
    flat_sums = sums.reshape(batch * k, -1).clone()
    flat_sums.index_add_(0, new_index, rows)
    flat_sums.index_add_(0, old_index, rows, alpha=-1)
    flat_counts = counts.reshape(batch * k).clone()
    ones = torch.ones_like(new_index)
    flat_counts.index_add_(0, new_index, ones)
    flat_counts.index_add_(0, old_index, ones, alpha=-1)
    return flat_sums.view_as(sums), flat_counts.view_as(counts)


def _reseed_empty(x, centroids, counts, labels, min_dist, mask):
    """Move each empty centre onto one of the points farthest from their centre."""
    empty = counts == 0  # (B, R, K)
    if not bool(empty.any()):
        return centroids
    batch, runs, k, dim = centroids.shape
    n = x.shape[1]
    top = min(k, n)
    dist = min_dist if mask is None else min_dist.masked_fill(~mask[..., None], -1)
    far_dist, far_index = dist.transpose(1, 2).topk(top, dim=-1)  # (B, R, top)
    far_points = _gather_rows(x, far_index.reshape(batch, runs * top)).view(batch, runs, top, dim)
    own = torch.gather(labels.transpose(1, 2), 2, far_index)
    own_centre = torch.gather(centroids, 2, own[..., None].expand(batch, runs, top, dim))
    # Exact distances: the expanded form is not exact near zero, and a point already on
    # its centre (fewer distinct points than K) must not be moved.
    usable = (far_dist >= 0) & ((far_points - own_centre).square().sum(-1) > 0)
    order = empty.long().cumsum(-1)  # the j-th empty cluster takes the j-th farthest point
    rank = (order - 1).clamp(min=0, max=top - 1)
    take = empty & (order <= top) & torch.gather(usable, 2, rank)
    chosen = torch.gather(far_points, 2, rank[..., None].expand(batch, runs, k, dim))
    return torch.where(take[..., None], chosen, centroids)


def _lloyd(x, x_norm, mask, centroids, max_iter, tol_abs, chunk):
    """Lloyd iterations for R runs at once: centroids (B, R, K, D); tol_abs (B,) float64.

    Returns centroids, labels and min_dist (B, N, R), counts (B, R, K) and n_iter
    (B, R), the assignment passes made. Stopping is sklearn's: a run stops when a pass
    changed no label (its centres are then the exact means), or when the centre update
    before that pass moved the centres by at most ``tol_abs`` (squared shift summed over
    the K centres); the pass after the update is sklearn's final assignment, so labels
    are always the nearest centres. At most ``max_iter`` updates. A stopped run keeps
    its centres, so its labels stop changing too.
    """
    batch, runs, k, _ = centroids.shape
    n_iter = torch.ones(batch, runs, dtype=torch.long, device=x.device)
    labels, min_dist = _assign(x, x_norm, mask, centroids, chunk)
    sums, counts = _cluster_sums(x, labels, mask, k, chunk)
    done = torch.zeros(batch, runs, dtype=torch.bool, device=x.device)
    tol_abs = tol_abs.to(device=x.device, dtype=torch.float64)[:, None]
    valid_points = x.shape[0] * x.shape[1] if mask is None else max(1, int(mask.sum()))
    for _ in range(max_iter):
        means = sums / counts.clamp(min=1)[..., None]
        updated = torch.where((counts == 0)[..., None], centroids, means)
        updated = _reseed_empty(x, updated, counts, labels, min_dist, mask)
        shift = (updated - centroids).square().sum((-2, -1), dtype=torch.float64)  # (B, R)
        centroids = torch.where(done[..., None, None], centroids, updated)
        new_labels, min_dist = _assign(x, x_norm, mask, centroids, chunk)
        n_iter += (~done).long()
        changed = new_labels != labels
        if mask is not None:
            changed &= mask[..., None]
        n_changed = changed.sum(1)  # (B, R)
        done |= (n_changed == 0) | (shift <= tol_abs)
        if bool(done.all()):
            labels = new_labels
            break
        if runs == 1 and int(n_changed.sum()) <= _INCREMENTAL_FRACTION * valid_points:
            sums, counts = _update_sums(x, sums, counts, labels, new_labels, changed, k)
        else:
            sums, counts = _cluster_sums(x, new_labels, mask, k, chunk)
        labels = new_labels
    counts = _cluster_sums(x, labels, mask, k, chunk)[1] if runs > 1 else _count(labels, mask, k)
    return centroids, labels, min_dist, counts, n_iter


def _absolute_tolerance(x, x_norm, mask, tol):
    """sklearn's tolerance ``tol * mean(var(X, axis=0))`` per problem: (B,) float64.

    From the squared norms already at hand, mean variance = (E|x|^2 - |E x|^2) / D,
    the small sums in float64 (one read of the points, no centred or float64 copy).
    """
    dim = x.shape[-1]
    if mask is None:
        count = torch.full((x.shape[0],), float(x.shape[1]), dtype=torch.float64, device=x.device)
        total = x.sum(1).double()  # float32 sum: a float64 sum would copy all points as float64
        square = x_norm.sum(1, dtype=torch.float64)
    else:
        weights = mask.to(x.dtype)
        count = mask.sum(1).double()
        total = torch.bmm(weights[:, None, :], x).squeeze(1).double()
        square = (x_norm * weights).sum(1, dtype=torch.float64)
    count = count.clamp(min=1)
    mean_variance = (square / count - (total / count[:, None]).square().sum(-1)) / dim
    return tol * mean_variance.clamp(min=0)


def _count(labels, mask, k):
    """Cluster sizes of a single run: labels (B, N, 1) -> (B, 1, K)."""
    batch = labels.shape[0]
    index = labels[..., 0] + torch.arange(batch, device=labels.device)[:, None] * k
    if mask is not None:
        index = index.masked_fill(~mask, batch * k)
    return torch.bincount(index.reshape(-1), minlength=batch * k + 1)[:-1].view(batch, 1, k)


def _kmeans_plus_plus(x, x_norm, mask, uniforms, k):
    """Greedy k-means++ for R runs per problem: uniforms (B, R, 1 + (K-1)*T) -> (B, R, K, D)."""
    batch, n, dim = x.shape
    runs = uniforms.shape[1]
    trials = (uniforms.shape[2] - 1) // (k - 1) if k > 1 else 0
    valid = (torch.ones(batch, n, dtype=torch.float64, device=x.device) if mask is None
             else mask.double())[:, None, :].expand(batch, runs, n)
    first = _sample(valid, uniforms[:, :, :1])  # (B, R, 1)
    centres = [torch.gather(x, 1, first.reshape(batch, runs, 1).expand(batch, runs, dim))]
    closest = _sq_dist(x, x_norm, centres[0])  # (B, R, N)
    if mask is not None:
        closest.masked_fill_(~mask[:, None, :], 0)
    for step in range(1, k):
        u = uniforms[:, :, 1 + (step - 1) * trials: 1 + step * trials]
        weights = closest.double()
        weights = torch.where(weights.sum(-1, keepdim=True) > 0, weights, valid)  # all on centres: uniform
        candidates = _sample(weights, u)  # (B, R, T)
        cand_points = torch.gather(x, 1, candidates.reshape(batch, runs * trials, 1).expand(-1, -1, dim))
        dist = _sq_dist(x, x_norm, cand_points).view(batch, runs, trials, n)
        dist = torch.minimum(dist, closest[:, :, None, :])
        if mask is not None:
            dist.masked_fill_(~mask[:, None, None, :], 0)
        best = dist.sum(-1, dtype=torch.float64).argmin(-1)  # (B, R): lowest potential
        closest = torch.gather(dist, 2, best[..., None, None].expand(batch, runs, 1, n))[:, :, 0]
        chosen = torch.gather(cand_points.view(batch, runs, trials, dim), 2,
                              best[..., None, None].expand(batch, runs, 1, dim))[:, :, 0]
        centres.append(chosen)
    return torch.stack(centres, 2)


def _sample(weights, u):
    """Indices drawn proportionally to weights (B, R, N) for uniforms u (B, R, T)."""
    cum = weights.cumsum(-1)
    target = u.to(cum.dtype) * cum[..., -1:]
    index = torch.searchsorted(cum, target.contiguous(), right=True)
    return index.clamp_(max=weights.shape[-1] - 1)


def _sq_dist(x, x_norm, centres):
    """Squared distances x (B, N, D) to centres (B, M, D) -> (B, M, N), clamped at 0."""
    dist = torch.baddbmm(centres.square().sum(-1)[..., None], centres, x.transpose(1, 2), alpha=-2.0)
    return dist.add_(x_norm[:, None, :]).clamp_(min=0)


