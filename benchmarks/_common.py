"""Helpers shared by the benchmarks: one thread budget for both sides, wall-clock timing."""
from __future__ import annotations

import os
import sys
import time
from typing import Callable


def limit_threads(threads: int = 2) -> None:
    """Same thread budget for the project (torch) and its baselines (OpenMP/BLAS)."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(threads)
    import torch

    torch.set_num_threads(threads)


def threads_from_argv(default: int = 2) -> int:
    """``--threads N`` read before torch/numpy load (thread pools are sized at import)."""
    argv = sys.argv
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith("--threads="):
            return int(arg.split("=", 1)[1])
    return default


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """Wall seconds of one call and its result."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def fmt_times(times: list[float], scale: float = 1e3, unit: str = "ms") -> str:
    return "[" + ", ".join(f"{t * scale:.1f}" for t in times) + f"] {unit}"


def inertia(x, centroids, labels, chunk: int = 50_000) -> float:
    """Sum of squared distances to the assigned centroids, in float64, in bounded memory.

    numpy is imported here, not at module level: thread pools are sized at import, after
    ``limit_threads`` has run.
    """
    import numpy as np

    centroids = centroids.astype(np.float64)
    total = 0.0
    for start in range(0, len(x), chunk):
        diff = x[start:start + chunk].astype(np.float64) - centroids[labels[start:start + chunk]]
        total += float(np.einsum("nd,nd->", diff, diff))
    return total


def kmeans_benchmark_args(description: str, full_help: str):
    """Arguments of the k-means benchmarks (B1, B5) and the project's k-means options they set."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--full", action="store_true", help=full_help)
    parser.add_argument("--n-init", type=int, default=None, help="project's restarts in the _ref comparison (default 10, the stages')")
    parser.add_argument("--sample-size", type=int, default=None, help="project's sample_size (default: the library's)")
    parser.add_argument("--threads", type=int, default=2, help="threads for both sides")
    args = parser.parse_args()
    options = {name: value for name, value in (("n_init", args.n_init), ("sample_size", args.sample_size))
               if value is not None}
    return args, options
