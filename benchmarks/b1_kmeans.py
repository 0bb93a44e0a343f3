"""B1: batched k-means for pixel grouping vs sklearn's KMeans fitted per problem.

Problems like pixel grouping's: one per object, ~2,500 pixel features of 1,152 dims
(Swin res3 + res4), K=4. Synthetic features: 3-6 part blobs of unequal size and spread,
shared low-rank structure plus isotropic noise, so K rarely equals the true number of
blobs (the realistic, harder case for matching sklearn's inertia).

Both sides get 2 threads (``--threads``) and float32 input; runs are interleaved and
the medians compared. sklearn is also timed limited to 1 thread, which is faster for it
on this machine (its OpenMP and BLAS pools oversubscribe the 2 cores), and that
speedup is printed too. Inertia of both is re-evaluated the same way (float64, from
each method's own centroids and labels).

    .venv/bin/python benchmarks/b1_kmeans.py          # quick: 16 problems
    .venv/bin/python benchmarks/b1_kmeans.py --full   # 96 problems
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fmt_times, inertia, kmeans_benchmark_args, limit_threads, threads_from_argv, timed  # noqa: E402

limit_threads(threads_from_argv())

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.cluster import KMeans  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from part_distillation.models.kmeans import kmeans_list  # noqa: E402

DIM, K = 1152, 4


def make_problem(rng: np.random.Generator) -> np.ndarray:
    """Pixel features of one object: a few part blobs in a low-rank space plus noise."""
    n = int(rng.integers(1800, 3200))
    parts = int(rng.integers(3, 7))
    weights = rng.dirichlet(np.full(parts, 2.0))
    labels = rng.choice(parts, size=n, p=weights)
    base = rng.normal(size=DIM) * 0.5
    centres = base + rng.normal(size=(parts, DIM)) * rng.uniform(0.4, 1.0, size=(parts, 1))
    basis = rng.normal(size=(24, DIM)) / np.sqrt(24)
    spread = rng.uniform(0.5, 1.5, size=(parts, 1))
    x = centres[labels] + spread[labels] * (rng.normal(size=(n, 24)) @ basis) * 0.5
    x += rng.normal(size=(n, DIM)) * 0.6
    return np.maximum(x, -1.0).astype(np.float32)  # post-activation-like skew



def main() -> None:
    args, options = kmeans_benchmark_args(__doc__.splitlines()[0], "96 problems, more repeats")
    num_problems, repeats, sk_repeats = (96, 5, 3) if args.full else (16, 3, 2)
    rng = np.random.default_rng(0)
    problems = [make_problem(rng) for _ in range(num_problems)]
    tensors = [torch.from_numpy(p) for p in problems]
    points = sum(p.shape[0] for p in problems)
    print(f"B1 k-means: {num_problems} problems, {points / num_problems:.0f} points avg x {DIM} dims, K={K}, "
          f"torch threads {torch.get_num_threads()}")

    def run_project():
        return kmeans_list(tensors, K, seed=0, **options)

    def run_sklearn():
        return [KMeans(n_clusters=K, random_state=0).fit(p) for p in problems]

    def run_sklearn_one_thread():
        with threadpool_limits(1):
            return run_sklearn()

    run_project()  # warm-up
    ours_times, sk_times, sk1_times = [], [], []
    def settled(fn):
        time.sleep(0.5)  # the other side's spinning OpenMP/BLAS threads go idle first
        return timed(fn)

    for r in range(repeats):  # interleaved: noise from other users hits both sides alike
        if r < sk_repeats:
            seconds, sk = settled(run_sklearn)
            sk_times.append(seconds)
            seconds, _ = settled(run_sklearn_one_thread)
            sk1_times.append(seconds)
        seconds, ours = settled(run_project)
        ours_times.append(seconds)
    ours_s, sk_s, sk1_s = (statistics.median(t) for t in (ours_times, sk_times, sk1_times))
    ratios = []
    for x, mine, theirs in zip(problems, ours, sk):
        a = inertia(x, mine.centroids.numpy(), mine.labels.numpy())
        b = inertia(x, theirs.cluster_centers_, theirs.labels_)
        ratios.append(a / b)
    ours_rate, sk_rate, sk1_rate = num_problems / ours_s, num_problems / sk_s, num_problems / sk1_s
    print(f"project: {ours_s / num_problems * 1e3:.2f} ms/problem ({ours_rate:.1f} problems/s), "
          f"runs {fmt_times(ours_times)}; full-data assignment passes median "
          f"{statistics.median(int(r.n_iter) for r in ours)}")
    print(f"sklearn ({torch.get_num_threads()} threads, its default here): {sk_s / num_problems * 1e3:.2f} ms/problem "
          f"({sk_rate:.1f} problems/s), runs {fmt_times(sk_times)}; iterations median "
          f"{statistics.median(m.n_iter_ for m in sk)}")
    print(f"sklearn limited to 1 thread (faster here): {sk1_s / num_problems * 1e3:.2f} ms/problem; "
          f"project speedup over it {ours_rate / sk1_rate:.1f}x")
    print(f"inertia ratio project/sklearn: median {statistics.median(ratios):.5f}, "
          f"min {min(ratios):.5f}, max {max(ratios):.5f}")
    print(f"B1 speedup={ours_rate / sk_rate:.1f}x inertia_ratio={statistics.median(ratios):.4f}")


if __name__ == "__main__":
    main()
