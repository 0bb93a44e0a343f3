"""B5: k-means for part ranking (one object class) vs sklearn's KMeans.

One class of part ranking: 200,000 L2-normalised 256-dim query embeddings, K=8.
Synthetic embeddings: 6-12 part prototypes of unequal frequency on the sphere, each
sample its prototype plus noise of varying spread, normalised (as the pipeline does).

Peak memory: the rise of the process's resident memory during the call over its value
before, polled from /proc/self/statm every millisecond (covers torch's and numpy's
allocations alike; the input data is not counted).

Two baselines in the same run, both sklearn ``KMeans`` (k-means++, tol 1e-4, at most
300 iterations): ``n_init=1`` against the project at one restart (``speedup``,
``inertia_ratio``), and ``n_init=10``, what the reference ran, against the project at
the stages' default restarts (10; ``speedup_ref``, ``inertia_ratio_ref``). Both sides
use float32 input and ``--threads`` (2) threads; with ``--full`` sklearn is also timed
limited to 1 thread and the faster of its two timings is the baseline. Inertia of both is
re-evaluated the same way (float64); ratios are project / sklearn, medians printed.

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
STAGE_RESTARTS = 10  # the stages' default n_init (the reference's sklearn: 10 restarts)
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
    restarts = options.pop("n_init", STAGE_RESTARTS)
    classes, repeats = (5, 3) if args.full else (2, 2)
    threads = torch.get_num_threads()
    print(f"B5 part-ranking k-means: {classes} classes of {N} x {DIM}, K={K}, threads {threads}; "
          f"project restarts 1 and {restarts}, sklearn n_init 1 and 10")
    rng = np.random.default_rng(0)
    times = {name: [] for name in ("project_1", "project_ref", "sklearn_1", "sklearn_10")}
    ratios = {"project_1": [], "project_ref": []}
    peaks = {"project_ref": [], "sklearn_10": []}
    for c in range(classes):
        x = make_class(rng)
        xt = torch.from_numpy(x)
        kmeans(xt[:5000], K)  # warm-up (first-call costs)
        reference = {}
        for n in (1, 10):  # sklearn once per class, the faster of its thread settings
            line = []
            for limit in (threads, 1) if args.full else (threads,):
                with threadpool_limits(limit):
                    seconds, fit, peak = with_peak_rss(lambda: KMeans(n_clusters=K, n_init=n, random_state=0).fit(x))
                line.append(seconds)
                if limit == threads:
                    reference[n] = inertia(x, fit.cluster_centers_, fit.labels_)
                    iterations = fit.n_iter_
                    if n == 10:
                        peaks["sklearn_10"].append(peak)
            times[f"sklearn_{n}"].append(min(line))
            one_thread = f", {line[1]:.3f} s (1 thread)" if args.full else ""
            print(f"class {c}: sklearn n_init={n}: {line[0]:.3f} s ({threads} threads){one_thread}, "
                  f"{iterations} iterations (best run)")
        for name, n_init, against in (("project_1", 1, 1), ("project_ref", restarts, 10)):
            for r in range(repeats):
                seconds, mine, peak = with_peak_rss(lambda: kmeans(xt, K, seed=r, n_init=n_init, **options))
                times[name].append(seconds)
                if name in peaks:
                    peaks[name].append(peak)
                ratios[name].append(inertia(x, mine.centroids.numpy(), mine.labels.numpy()) / reference[against])
            print(f"class {c}: {name} (restarts {n_init}): {statistics.median(times[name][-repeats:]):.3f} s, "
                  f"assignment passes {int(mine.n_iter)}, inertia ratios vs sklearn n_init={against} "
                  f"{', '.join(f'{q:.5f}' for q in ratios[name][-repeats:])}")
    median = {name: statistics.median(t) for name, t in times.items()}
    for name in ("project_1", "project_ref", "sklearn_1", "sklearn_10"):
        print(f"{name}: median {median[name]:.3f} s per class")
    print(f"peak RSS rise: project_ref median {statistics.median(peaks['project_ref']):.0f} MB "
          f"(max {max(peaks['project_ref']):.0f}), sklearn n_init=10 median {statistics.median(peaks['sklearn_10']):.0f} MB")
    for name, label in (("project_1", "1 restart vs sklearn n_init=1"),
                        ("project_ref", f"{restarts} restarts vs sklearn n_init=10")):
        values = ratios[name]
        print(f"inertia ratio project/sklearn, {label}: median {statistics.median(values):.5f}, "
              f"min {min(values):.5f}, max {max(values):.5f}")
    print(f"B5 speedup={median['sklearn_1'] / median['project_1']:.1f}x "
          f"speedup_ref={median['sklearn_10'] / median['project_ref']:.1f}x "
          f"inertia_ratio={statistics.median(ratios['project_1']):.4f} "
          f"inertia_ratio_ref={statistics.median(ratios['project_ref']):.4f}")


if __name__ == "__main__":
    main()
