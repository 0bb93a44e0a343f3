"""One batched k-means for the whole pipeline (pixel grouping and part ranking).

Many independent problems are solved at once: ``points`` (B, N, D) with a validity
``mask`` (B, N) for problems of different sizes (or a list, see :func:`kmeans_list`).
Everything runs on the device of the inputs.

How it stays fast without giving up quality:

- Distances use ||x||^2 - 2 x.c + ||c||^2 with one batched matmul per pass, in float32.
- Initialisation is greedy k-means++ (sklearn's variant: ``2 + log K`` candidate
  centres per step, keep the one that lowers the potential most) seeded per problem by
  a ``torch.Generator``, so a problem's answer does not depend on what it is batched
  with.
- Coarse to fine: the ``n_init`` initialisations and their Lloyd iterations run on a
  random sample of each problem (all of it when it is small), all runs sharing one
  matmul per pass; the best run by sample inertia is then refined by Lloyd iterations
  on all points. Huge problems thus need only a handful of passes over their data.
- Lloyd stops on label stability or when a pass lowers the inertia by no more than
  ``tol`` times the inertia (the slow creep at the end of Lloyd changes nothing that
  matters); after the refinement's first pass, cluster sums are updated only with the
  points that changed cluster.
- Passes are chunked over points (bounded temporaries for millions of points) and,
  on CPU, problems are processed in groups small enough to stay in cache.
- Empty clusters are re-seeded with the points farthest from their centres; a cluster
  stays empty only when every point already sits on a centre (fewer distinct points
  than K), and its centroid is then a duplicate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["KMeansResult", "batched_kmeans", "kmeans", "kmeans_list", "assign_to_centroids"]

# Temporaries per chunk (elements of the (B, chunk, R*K) distance block) and, on CPU,
# the data size of one group of problems (kept well inside L2/L3 cache).
_CHUNK_ELEMENTS = 1 << 21
_CPU_GROUP_BYTES = 24 << 20
# Refinement re-sums all points when more than this fraction changed cluster.
_INCREMENTAL_FRACTION = 0.125


@dataclass(frozen=True)
class KMeansResult:
    """Result of k-means: per problem (leading dim B) or for one problem (no B dim).

    centroids (B, K, D) float32; labels (B, N) int64, -1 where the point is masked out;
    inertia (B,) float64, sum of squared distances to the assigned centroid; counts
    (B, K) int64 cluster sizes (0 only when there were fewer distinct points than K);
    n_iter (B,) Lloyd iterations of the final run over all points.
    """

    centroids: torch.Tensor
    labels: torch.Tensor
    inertia: torch.Tensor
    counts: torch.Tensor
    n_iter: torch.Tensor


def default_sample_size(n_clusters: int) -> int:
    """Points per problem used for the initialisations (the refinement uses all)."""
    return max(2048, 256 * n_clusters)


def batched_kmeans(
    points: torch.Tensor,
    n_clusters: int,
    mask: torch.Tensor | None = None,
    *,
    n_init: int = 1,
    max_iter: int = 300,
    tol: float = 1e-4,
    seed: int | Sequence[int] = 0,
    sample_size: int | None = None,
    chunk_size: int | None = None,
    group_bytes: int | None = None,
) -> KMeansResult:
    """K-means on B independent problems: points (B, N, D), mask (B, N) of valid points.

    ``seed``: an int (problem b uses ``seed + b``) or one seed per problem; the result
    of a problem depends only on its points and its seed. ``n_init`` initialisations
    are compared on the sample (``sample_size`` points, default
    :func:`default_sample_size`) and the best is refined on all points. ``chunk_size``
    bounds the points per pass step; ``group_bytes`` the data per group of problems
    (default: all at once on GPU, cache-sized groups on CPU).
    """
    if points.dim() != 3:
        raise ValueError(f"points must be (B, N, D), got shape {tuple(points.shape)}")
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    if n_init < 1 or max_iter < 0 or tol < 0:
        raise ValueError(f"need n_init >= 1, max_iter >= 0, tol >= 0; got {n_init}, {max_iter}, {tol}")
    batch, num_points, dim = points.shape
    device = points.device
    if mask is None:
        mask = torch.ones(batch, num_points, dtype=torch.bool, device=device)
    mask = mask.to(device=device, dtype=torch.bool)
    if mask.shape != (batch, num_points):
        raise ValueError(f"mask must be {(batch, num_points)}, got {tuple(mask.shape)}")
    seeds = _problem_seeds(seed, batch)
    points = points if points.dtype == torch.float32 else points.float()
    sample_size = default_sample_size(n_clusters) if sample_size is None else int(sample_size)
    if sample_size < 1:
        raise ValueError(f"sample_size must be >= 1, got {sample_size}")
    if group_bytes is None:
        group_bytes = _CPU_GROUP_BYTES if device.type == "cpu" else 1 << 62

    centroids = points.new_zeros(batch, n_clusters, dim)
    labels = torch.full((batch, num_points), -1, dtype=torch.long, device=device)
    inertia = torch.zeros(batch, dtype=torch.float64, device=device)
    counts = torch.zeros(batch, n_clusters, dtype=torch.long, device=device)
    n_iter = torch.zeros(batch, dtype=torch.long, device=device)
    bytes_per_problem = max(1, num_points * dim * 4)
    per_group = max(1, group_bytes // bytes_per_problem)
    for start in range(0, batch, per_group):
        stop = min(batch, start + per_group)
        group_mask = mask[start:stop]
        length = _used_length(group_mask)
        if length == 0:
            continue
        result = _solve_group(
            points[start:stop, :length], group_mask[:, :length], n_clusters, seeds[start:stop],
            n_init=n_init, max_iter=max_iter, tol=tol, sample_size=sample_size, chunk_size=chunk_size,
        )
        centroids[start:stop] = result.centroids
        labels[start:stop, :length] = result.labels
        inertia[start:stop] = result.inertia
        counts[start:stop] = result.counts
        n_iter[start:stop] = result.n_iter
    return KMeansResult(centroids, labels, inertia, counts, n_iter)


def kmeans(points: torch.Tensor, n_clusters: int, **kwargs) -> KMeansResult:
    """K-means on one problem, points (N, D); same options as :func:`batched_kmeans`.

    Returns centroids (K, D), labels (N,), inertia, counts (K,) and n_iter as 0-d/1-d
    tensors (the batch dimension removed).
    """
    if points.dim() != 2:
        raise ValueError(f"points must be (N, D), got shape {tuple(points.shape)}")
    seed = kwargs.pop("seed", 0)
    result = batched_kmeans(points[None], n_clusters, seed=[int(seed)], **kwargs)
    return KMeansResult(*(field[0] for field in _fields(result)))


def kmeans_list(problems: Sequence[torch.Tensor], n_clusters: int, **kwargs) -> list[KMeansResult]:
    """K-means on problems of different sizes, each (N_i, D); packs them into groups.

    Problem i uses seed ``seed + i`` (or ``seed[i]``), exactly as in
    :func:`batched_kmeans`, so its answer equals ``kmeans(problems[i], seed=...)``.
    """
    if not problems:
        return []
    dims = {p.shape[-1] for p in problems}
    if any(p.dim() != 2 for p in problems) or len(dims) != 1:
        raise ValueError("problems must all be (N_i, D) with the same D")
    seeds = _problem_seeds(kwargs.pop("seed", 0), len(problems))
    group_bytes = kwargs.pop("group_bytes", None)
    device = problems[0].device
    if group_bytes is None:
        group_bytes = _CPU_GROUP_BYTES if device.type == "cpu" else 1 << 30
    dim = dims.pop()
    # Similar sizes together keep the padding small.
    order = sorted(range(len(problems)), key=lambda i: problems[i].shape[0])
    results: list[KMeansResult | None] = [None] * len(problems)
    group: list[int] = []

    def flush() -> None:
        length = max(1, max(problems[i].shape[0] for i in group))
        packed = problems[group[0]].new_zeros(len(group), length, dim, dtype=torch.float32)
        mask = torch.zeros(len(group), length, dtype=torch.bool, device=device)
        for row, i in enumerate(group):
            packed[row, : problems[i].shape[0]] = problems[i]
            mask[row, : problems[i].shape[0]] = True
        out = batched_kmeans(packed, n_clusters, mask, seed=[seeds[i] for i in group],
                             group_bytes=1 << 62, **kwargs)
        for row, i in enumerate(group):
            n = problems[i].shape[0]
            results[i] = KMeansResult(out.centroids[row], out.labels[row, :n], out.inertia[row],
                                      out.counts[row], out.n_iter[row])

    for i in order:
        length = max(problems[j].shape[0] for j in group + [i])
        if group and (len(group) + 1) * length * dim * 4 > group_bytes:
            flush()
            group = []
        group.append(i)
    flush()
    return results  # type: ignore[return-value]


def assign_to_centroids(
    points: torch.Tensor, centroids: torch.Tensor, metric: str = "l2", chunk_size: int | None = None
) -> torch.Tensor:
    """Index of the nearest centroid for each point: points (..., N, D), centroids (..., K, D).

    ``metric`` "l2" (smallest squared distance) or "dot" (largest dot product).
    """
    if metric not in ("l2", "dot"):
        raise ValueError(f"metric must be 'l2' or 'dot', got {metric!r}")
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


def _fields(result: KMeansResult):
    return (result.centroids, result.labels, result.inertia, result.counts, result.n_iter)


def _problem_seeds(seed: int | Sequence[int], batch: int) -> list[int]:
    if isinstance(seed, (int,)) or (torch.is_tensor(seed) and seed.dim() == 0):
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
    """Per-cluster sums and counts: labels (B, N, R) -> (B, R, K, D), (B, R, K) int64."""
    batch, n, runs = labels.shape
    dim = x.shape[-1]
    if runs == 1:
        # Scatter-add of rows: one read of the points, no one-hot matrix.
        index = labels[..., 0] + torch.arange(batch, device=x.device)[:, None] * k
        if mask is not None:
            index = index.masked_fill(~mask, batch * k)
        index = index.reshape(-1)
        sums = x.new_zeros(batch * k + 1, dim)
        sums.index_add_(0, index, x.reshape(batch * n, dim))
        counts = torch.bincount(index, minlength=batch * k + 1)
        return sums[:-1].view(batch, 1, k, dim), counts[:-1].view(batch, 1, k)
    sums = x.new_zeros(batch, runs * k, dim)
    counts = torch.zeros(batch, runs * k, dtype=torch.long, device=x.device)
    ids = torch.arange(k, device=x.device)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        onehot = labels[:, start:stop, :, None] == ids  # (B, c, R, K)
        if mask is not None:
            onehot &= mask[:, start:stop, None, None]
        onehot = onehot.view(batch, stop - start, runs * k)
        counts += onehot.sum(1)
        sums.baddbmm_(onehot.transpose(1, 2).to(x.dtype), x[:, start:stop])
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
    far_points = torch.gather(x[:, None].expand(batch, runs, n, dim), 2,
                              far_index[..., None].expand(batch, runs, top, dim))
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


def _lloyd(x, x_norm, mask, centroids, max_iter, tol, chunk):
    """Lloyd iterations for R runs at once: centroids (B, R, K, D).

    Returns centroids, labels and min_dist (B, N, R), counts (B, R, K), n_iter (B, R).
    The first pass assigns the given centres. Each further pass assigns the updated
    centres; a run stops when no label changed (its centres are then the exact means)
    or when the pass lowered the inertia by no more than ``tol`` times the inertia.
    A stopped run keeps its centres, so its labels no longer change either.
    """
    batch, runs, k, _ = centroids.shape
    labels, min_dist = _assign(x, x_norm, mask, centroids, chunk)
    inertia = min_dist.sum(1, dtype=torch.float64)
    sums, counts = _cluster_sums(x, labels, mask, k, chunk)
    done = torch.zeros(batch, runs, dtype=torch.bool, device=x.device)
    n_iter = torch.zeros(batch, runs, dtype=torch.long, device=x.device)
    valid_points = x.shape[0] * x.shape[1] if mask is None else max(1, int(mask.sum()))
    for _ in range(max_iter):
        means = sums / counts.clamp(min=1)[..., None]
        updated = torch.where((counts == 0)[..., None], centroids, means)
        updated = _reseed_empty(x, updated, counts, labels, min_dist, mask)
        centroids = torch.where(done[..., None, None], centroids, updated)
        new_labels, min_dist = _assign(x, x_norm, mask, centroids, chunk)
        new_inertia = min_dist.sum(1, dtype=torch.float64)
        n_iter += (~done).long()
        changed = new_labels != labels
        if mask is not None:
            changed &= mask[..., None]
        n_changed = changed.sum(1)  # (B, R)
        done |= (n_changed == 0) | (inertia - new_inertia <= tol * new_inertia)
        inertia = new_inertia
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


def _solve_group(x, mask, k, seeds, *, n_init, max_iter, tol, sample_size, chunk_size):
    """The coarse-to-fine solve of one group of problems (all tensors on one device)."""
    x = x.contiguous()
    batch, n, dim = x.shape
    device = x.device
    counts_cpu = mask.sum(1).tolist()
    full_mask = None if min(counts_cpu) == n else mask  # None: every point valid
    trials = 2 + int(math.log(k)) if k > 1 else 0
    x_norm = torch.linalg.vector_norm(x, dim=-1).square_()

    # Per-problem randomness from per-problem generators: the sample and the uniforms.
    m = min(sample_size, max(counts_cpu))
    use_sample = max(counts_cpu) > sample_size
    uniforms = torch.empty(batch, n_init, 1 + (k - 1) * trials, dtype=torch.float64)
    sample_index = torch.zeros(batch, m, dtype=torch.long)
    sample_mask = torch.zeros(batch, m, dtype=torch.bool)
    for b, problem_seed in enumerate(seeds):
        generator = torch.Generator().manual_seed(problem_seed)
        if use_sample:
            count = counts_cpu[b]
            valid_index = torch.arange(n) if full_mask is None else mask[b].nonzero().squeeze(1).cpu()
            if count > m:
                sample_index[b] = valid_index[torch.randperm(count, generator=generator)[:m].sort().values]
                sample_mask[b] = True
            else:
                sample_index[b, :count] = valid_index
                sample_mask[b, :count] = True
        uniforms[b] = torch.rand(n_init, uniforms.shape[2], generator=generator, dtype=torch.float64)
    uniforms = uniforms.to(device)

    if use_sample:
        sample_index = sample_index.to(device)
        sample_mask = None if bool(sample_mask.all()) else sample_mask.to(device)
        xs = torch.gather(x, 1, sample_index[..., None].expand(batch, m, dim))
        xs_norm = torch.gather(x_norm, 1, sample_index)
    else:
        xs, xs_norm, sample_mask = x, x_norm, full_mask
    init = _kmeans_plus_plus(xs, xs_norm, sample_mask, uniforms, k)
    centroids, labels, min_dist, counts, n_iter = _lloyd(
        xs, xs_norm, sample_mask, init, max_iter, tol, _chunk_for(batch, n_init * k, chunk_size))
    best = min_dist.sum(1, dtype=torch.float64).argmin(1)  # (B,) best run by (sample) inertia
    centroids = torch.gather(centroids, 1, best[:, None, None, None].expand(batch, 1, k, dim))
    if use_sample:
        centroids, labels, min_dist, counts, n_iter = _lloyd(
            x, x_norm, full_mask, centroids, max_iter, tol, _chunk_for(batch, k, chunk_size))
    else:
        labels = torch.gather(labels, 2, best[:, None, None].expand(batch, n, 1))
        min_dist = torch.gather(min_dist, 2, best[:, None, None].expand(batch, n, 1))
        counts = torch.gather(counts, 1, best[:, None, None].expand(batch, 1, k))
        n_iter = torch.gather(n_iter, 1, best[:, None])
    labels = labels[..., 0]
    if full_mask is not None:
        labels = labels.masked_fill(~full_mask, -1)
    inertia = min_dist[..., 0].sum(1, dtype=torch.float64)
    return KMeansResult(centroids[:, 0], labels, inertia, counts[:, 0], n_iter[:, 0])
