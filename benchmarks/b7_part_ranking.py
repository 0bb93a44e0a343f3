"""B7: part ranking (stage 5): images/s of both passes, and one class's k-means vs sklearn.

Passes: the tiny proposal model (random weights, the demo's 128-pixel canvas) on
synthetic stage-3 records on CPU, as the stage runs them (``with_model_outputs``): record
-> image input -> model -> cluster pass (embeddings), and -> label pass (part labels, with
centroids of the cluster pass's embeddings), once one image per forward (the stage before
batching) and once ``--batch`` images per forward (default 8, ``stage.batch_size``). Both
passes' score thresholds are set to 0 so the untrained model keeps proposals (the work per
image is that of a trained model).

Clustering: the largest synthetic class, N L2-normalised D=256 embeddings (part
prototypes plus noise, as B5) streamed to the stage's per-class file, then clustered the
stage's way (``stages.part_ranking.cluster_classes``: memory-mapped file, the model
layer's k-means, K=8, 10 restarts) against sklearn ``KMeans(n_clusters=8, n_init=10)``
on the same float32 array, same threads. Inertia of both re-evaluated in float64;
``inertia_ratio`` = project / sklearn.

    .venv/bin/python benchmarks/b7_part_ranking.py            # N = 100,000
    .venv/bin/python benchmarks/b7_part_ranking.py --full     # N = 400,000, 16 images per class
    .venv/bin/python benchmarks/b7_part_ranking.py --batch 4  # the passes at batch 1 and 4
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from _common import inertia, limit_threads, threads_from_argv, timed  # noqa: E402

limit_threads(threads_from_argv())

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.cluster import KMeans  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from part_distillation.engine import checkpoint as ckpt  # noqa: E402
from part_distillation.models import part_ranking as ranking  # noqa: E402
from part_distillation.stages import part_ranking as stage  # noqa: E402
from part_distillation.models.checkpoint import build_model  # noqa: E402
from part_distillation.store import RecordStore  # noqa: E402
from tests.data.part_fixtures import write_part_segments  # noqa: E402

K, DIM, SIZE = 8, 256, 128


def make_class(rng: np.random.Generator, n: int) -> np.ndarray:
    """One object class's embeddings: 6-12 part prototypes of unequal frequency, noise, normalised."""
    prototypes = int(rng.integers(6, 13))
    centres = rng.normal(size=(prototypes, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.choice(prototypes, size=n, p=rng.dirichlet(np.full(prototypes, 1.5)))
    x = rng.standard_normal(size=(n, DIM), dtype=np.float32) * rng.uniform(0.04, 0.09, prototypes)[labels, None]
    x += centres[labels]
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def passes(tmp: Path, images_per_class: int, batch_size: int) -> dict:
    """Both passes over the records at batch 1 and at ``batch_size`` (the stage's
    ``with_model_outputs``), each timed once after a warm-up at that batch size."""
    records = write_part_segments(tmp / "synthetic", tmp / "records", num_classes=2,
                                  images_per_class=images_per_class)
    torch.manual_seed(0)
    model = build_model("tiny", None).eval()
    device = torch.device("cpu")
    loose = ranking.PassSettings(min_score=0.0)
    items = list(RecordStore(records).iter_records())

    def outputs(batch):
        return stage.with_model_outputs(items, lambda r: True, model, device, SIZE, batch)

    def cluster_pass(batch):
        found = []
        for _, (inputs, (logits, masks, queries, sizes)) in outputs(batch):
            found.append(ranking.cluster_pass(logits, masks, queries, torch.from_numpy(inputs.object_mask),
                                              settings=loose, **sizes)[0])
        return torch.cat(found)

    def label_pass(batch, centroids):
        parts = 0
        for _, (inputs, (logits, masks, queries, sizes)) in outputs(batch):
            parts += len(ranking.label_pass(logits, masks, queries, centroids, torch.from_numpy(inputs.object_mask),
                                            settings=loose, **sizes))
        return parts

    rates, found = {}, {}
    for batch in (1, batch_size):
        stage.model_outputs(model, [stage.ImageInput(r, SIZE) for r in items[:batch]], device)  # warm-up
        cluster_s, embeddings = timed(lambda: cluster_pass(batch))
        centroids = embeddings[torch.randperm(len(embeddings), generator=torch.Generator().manual_seed(0))[:K]]
        label_s, parts = timed(lambda: label_pass(batch, centroids))
        rates[batch] = (len(items) / cluster_s, len(items) / label_s)
        found[batch] = (embeddings, parts)
        print(f"passes at batch {batch}: {len(items)} images at {SIZE} px, {len(embeddings)} embeddings, "
              f"{parts} part labels; cluster pass {cluster_s:.2f} s ({rates[batch][0]:.2f} images/s), "
              f"label pass {label_s:.2f} s ({rates[batch][1]:.2f} images/s)")
    (e1, p1), (en, pn) = found[1], found[batch_size]
    same = e1.shape == en.shape and p1 == pn
    print(f"batch {batch_size} vs 1: same embeddings and part counts: {same} "
          f"(max embedding difference {(e1 - en).abs().max().item() if e1.shape == en.shape else float('nan'):.2e})")
    return {"rates": rates, "images": len(items)}


def clustering(tmp: Path, n: int) -> tuple[float, float]:
    x = make_class(np.random.default_rng(0), n)
    work = stage.ClusterWork(tmp / "work", Path("benchmark"))
    for start in range(0, n, 1000):  # as the cluster pass streams it, image by image
        work.add(f"image{start}", 0, torch.from_numpy(x[start:start + 1000]))
    cpu = torch.device("cpu")
    stage.cluster_classes(work, [0], K, 1, 0, cpu)  # warm-up (first-call costs)
    mine_s, (centroids, counts) = timed(lambda: stage.cluster_classes(work, [0], K, 10, 0, cpu))
    with threadpool_limits(torch.get_num_threads()):
        sk_s, fit = timed(lambda: KMeans(n_clusters=K, n_init=10, random_state=0).fit(x))
    c = centroids[0]
    labels = ((x ** 2).sum(1, keepdims=True) - 2 * x @ c.T + (c ** 2).sum(1)[None]).argmin(1)
    ratio = inertia(x, c, labels) / inertia(x, fit.cluster_centers_, fit.labels_)
    print(f"clustering one class of {counts[0]} x {DIM}, K={K}, 10 restarts, {torch.get_num_threads()} threads: "
          f"project (from the class file) {mine_s:.2f} s, sklearn n_init=10 {sk_s:.2f} s, inertia ratio {ratio:.5f}")
    return sk_s / mine_s, ratio


def main() -> None:
    full = "--full" in sys.argv
    batch_size = int(sys.argv[sys.argv.index("--batch") + 1]) if "--batch" in sys.argv else 8
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        found = passes(tmp, 16 if full else 6, batch_size)
        speedup, ratio = clustering(tmp, 400_000 if full else 100_000)
    (cluster_1, label_1), (cluster_n, label_n) = found["rates"][1], found["rates"][batch_size]
    print(f"B7 speedup={speedup:.1f}x inertia_ratio={ratio:.4f} "
          f"cluster_pass_images_per_s={cluster_n:.2f} label_pass_images_per_s={label_n:.2f} (batch {batch_size}) "
          f"cluster_pass_batch1_images_per_s={cluster_1:.2f} label_pass_batch1_images_per_s={label_1:.2f} "
          f"batching_speedup_cluster={cluster_n / cluster_1:.2f}x batching_speedup_label={label_n / label_1:.2f}x")


if __name__ == "__main__":
    main()
