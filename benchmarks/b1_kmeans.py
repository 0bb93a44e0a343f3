"""B1: batched k-means for pixel grouping vs sklearn's KMeans fitted per problem.

Problems like pixel grouping's: one per object, ~2,500 pixel features of 1,152 dims
(Swin res3 + res4), K=4. Synthetic features: 3-6 part blobs of unequal size and spread,
shared low-rank structure plus isotropic noise, so K rarely equals the true number of
blobs (the realistic, harder case for matching sklearn's inertia).

Both sides use 2 threads and float32 input. Inertia of both is re-evaluated the same
way (float64, from each method's own centroids and labels).

    .venv/bin/python benchmarks/b1_kmeans.py          # quick: 16 problems
    .venv/bin/python benchmarks/b1_kmeans.py --full   # 96 problems
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fmt_times, limit_threads, median_time, threads_from_argv  # noqa: E402

limit_threads(threads_from_argv())

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.cluster import KMeans  # noqa: E402

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


def inertia(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> float:
    diff = x.astype(np.float64) - centroids.astype(np.float64)[labels]
    return float(np.einsum("nd,nd->", diff, diff))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="96 problems, more repeats")
    parser.add_argument("--n-init", type=int, default=1, help="project's n_init")
    parser.add_argument("--sample-size", type=int, default=None, help="project's sample_size")
    parser.add_argument("--threads", type=int, default=2, help="threads for both sides")
    args = parser.parse_args()
    num_problems, repeats = (96, 5) if args.full else (16, 3)
    rng = np.random.default_rng(0)
    problems = [make_problem(rng) for _ in range(num_problems)]
    tensors = [torch.from_numpy(p) for p in problems]
    points = sum(p.shape[0] for p in problems)
    print(f"B1 k-means: {num_problems} problems, {points / num_problems:.0f} points avg x {DIM} dims, K={K}, "
          f"torch threads {torch.get_num_threads()}")

    def run_project():
        return kmeans_list(tensors, K, n_init=args.n_init, sample_size=args.sample_size, seed=0)

    def run_sklearn():
        return [KMeans(n_clusters=K, random_state=0).fit(p) for p in problems]

    ours_s, ours_times, ours = median_time(run_project, repeats)
    sk_s, sk_times, sk = median_time(run_sklearn, max(1, repeats - 1), warmup=1)
    ratios = []
    for x, mine, theirs in zip(problems, ours, sk):
        a = inertia(x, mine.centroids.numpy(), mine.labels.numpy())
        b = inertia(x, theirs.cluster_centers_, theirs.labels_)
        ratios.append(a / b)
    ours_rate, sk_rate = num_problems / ours_s, num_problems / sk_s
    print(f"project: {ours_s / num_problems * 1e3:.2f} ms/problem ({ours_rate:.1f} problems/s), "
          f"runs {fmt_times(ours_times)}; full-data Lloyd iterations median "
          f"{statistics.median(int(r.n_iter) for r in ours)}")
    print(f"sklearn: {sk_s / num_problems * 1e3:.2f} ms/problem ({sk_rate:.1f} problems/s), "
          f"runs {fmt_times(sk_times)}; iterations median {statistics.median(m.n_iter_ for m in sk)}")
    print(f"inertia ratio project/sklearn: median {statistics.median(ratios):.5f}, "
          f"min {min(ratios):.5f}, max {max(ratios):.5f}")
    print(f"B1 speedup={ours_rate / sk_rate:.1f}x inertia_ratio={statistics.median(ratios):.4f}")


if __name__ == "__main__":
    main()
