"""B5: k-means for part ranking (one object class) vs sklearn's KMeans.

One class of part ranking: 200,000 L2-normalised 256-dim query embeddings, K=8.
Synthetic embeddings: 6-12 part prototypes of unequal frequency on the sphere, each
sample its prototype plus noise of varying spread, normalised (as the pipeline does).

Peak memory: the rise of the process's resident memory during the call over its value
before, polled from /proc/self/statm every millisecond (covers torch's and numpy's
allocations alike; the input data is not counted). Both sides use the same thread
count (``--threads``, 2) and float32 input; sklearn is also timed limited to 1 thread,
for reference. Inertia of both is re-evaluated the same way (float64).

    .venv/bin/python benchmarks/b5_ranking_kmeans.py          # quick: 2 classes
    .venv/bin/python benchmarks/b5_ranking_kmeans.py --full   # 5 classes, more repeats
"""
from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import inertia, kmeans_benchmark_args, limit_threads, threads_from_argv, timed  # noqa: E402

limit_threads(threads_from_argv())

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.cluster import KMeans  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from part_distillation.models.kmeans import kmeans  # noqa: E402

N, DIM, K = 200_000, 256, 8
PAGE = os.sysconf("SC_PAGE_SIZE")


def make_class(rng: np.random.Generator, n: int = N) -> np.ndarray:
    """Query embeddings of one object class's kept part proposals (L2-normalised)."""
    prototypes = int(rng.integers(6, 13))
    centres = rng.normal(size=(prototypes, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.choice(prototypes, size=n, p=rng.dirichlet(np.full(prototypes, 1.5)))
    spread = rng.uniform(0.04, 0.09, size=prototypes).astype(np.float32)
    x = rng.standard_normal(size=(n, DIM), dtype=np.float32)
    x *= spread[labels, None]
    x += centres[labels]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def with_peak_rss(fn):
    """Run fn; return (seconds, result, peak rise of resident memory in MB).

    Waits first so the other side's spinning OpenMP/BLAS threads are idle.
    """
    time.sleep(0.5)
    base = rss_bytes()
    peak = [base]
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    seconds, out = timed(fn)
    stop.set()
    thread.join()
    peak[0] = max(peak[0], rss_bytes())
    return seconds, out, (peak[0] - base) / 2**20



def main() -> None:
    args, options = kmeans_benchmark_args(__doc__.splitlines()[0], "5 classes, 3 timed runs each")
    classes, repeats = (5, 3) if args.full else (2, 2)
    print(f"B5 part-ranking k-means: {classes} classes of {N} x {DIM}, K={K}, threads {torch.get_num_threads()}")
    rng = np.random.default_rng(0)
    ours_times, sk_times, sk1_times, ratios, ours_peaks, sk_peaks = [], [], [], [], [], []
    for c in range(classes):
        x = make_class(rng)
        xt = torch.from_numpy(x)
        kmeans(xt[:5000], K)  # warm-up (first-call costs)
        for r in range(repeats):  # interleaved: noise from other users hits both sides
            seconds, mine, peak = with_peak_rss(lambda: kmeans(xt, K, seed=r, **options))
            ours_times.append(seconds)
            ours_peaks.append(peak)
            if r == 0:
                sk_s, theirs, sk_peak = with_peak_rss(lambda: KMeans(n_clusters=K, random_state=0).fit(x))
                sk_times.append(sk_s)
                sk_peaks.append(sk_peak)
                with threadpool_limits(1):
                    sk1_times.append(with_peak_rss(lambda: KMeans(n_clusters=K, random_state=0).fit(x))[0])
                b = inertia(x, theirs.cluster_centers_, theirs.labels_)
            ratios.append(inertia(x, mine.centroids.numpy(), mine.labels.numpy()) / b)
        print(f"class {c}: project {statistics.median(ours_times[-repeats:]):.3f} s "
              f"(assignment passes {int(mine.n_iter)}), sklearn {sk_s:.3f} s ({theirs.n_iter_} iterations), "
              f"inertia ratios {', '.join(f'{q:.5f}' for q in ratios[-repeats:])}")
    ours_s, sk_s = statistics.median(ours_times), statistics.median(sk_times)
    print(f"project: median {ours_s:.3f} s per class, peak RSS rise median {statistics.median(ours_peaks):.0f} MB "
          f"(max {max(ours_peaks):.0f})")
    print(f"sklearn: median {sk_s:.3f} s per class, peak RSS rise median {statistics.median(sk_peaks):.0f} MB; "
          f"limited to 1 thread {statistics.median(sk1_times):.3f} s (project speedup over it "
          f"{statistics.median(sk1_times) / ours_s:.1f}x)")
    print(f"inertia ratio project/sklearn: median {statistics.median(ratios):.5f}, "
          f"min {min(ratios):.5f}, max {max(ratios):.5f}")
    print(f"B5 speedup={sk_s / ours_s:.1f}x inertia_ratio={statistics.median(ratios):.4f} "
          f"peak_mb={max(ours_peaks):.0f}")


if __name__ == "__main__":
    main()
