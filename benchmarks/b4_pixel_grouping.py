"""B4: pixel grouping per image on CPU — backbone vs grouping, project vs the reference's loop.

Synthetic images fitted to 640 with their true object masks. For each backbone (the
Swin-L of Mask2Former with random weights: same cost as the official ones; and
EfficientNet-Lite0 with its ImageNet weights) on the same features:

* backbone: the forward pass to the grouping levels, per image;
* project grouping: ``models.grouping.group_pixels`` (batched k-means, 10 restarts,
  scores on the feature grid, only K maps upsampled) + RLE encoding of the parts;
* reference grouping: the released code's per-image loop — sklearn
  ``KMeans(4, n_init=10, random_state=0)`` on the object's feature pixels, all C feature
  channels upsampled bilinearly to the padded image (in channel chunks to bound memory;
  same arithmetic), cropped, ``dot`` argmax, object pixels, RLE.

Goals: grouping <= 10% of backbone time; >= 20x the reference's grouping. The last line:
``B4 grouping_over_backbone=... speedup_vs_reference=...`` (Swin-L, the reference's
backbone), then the same for EfficientNet-Lite0.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import limit_threads, threads_from_argv, timed  # noqa: E402

limit_threads(threads_from_argv(2))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.cluster import KMeans  # noqa: E402

from part_distillation.data.synthetic import make_synthetic_dataset  # noqa: E402
from part_distillation.evaluation.segments import synthetic_objects  # noqa: E402
from part_distillation.masks import encode_rles  # noqa: E402
from part_distillation.models.efficientnet import build_efficientnet_lite0  # noqa: E402
from part_distillation.models.grouping import FeatureSource, ObjectToGroup, group_pixels, masks_to_grid  # noqa: E402
from part_distillation.models.mask2former import build_mask2former, preprocess_images  # noqa: E402

K, RESTARTS = 4, 10


def project_grouping(features: torch.Tensor, item: dict, padded) -> tuple[np.ndarray, list]:
    mask = torch.zeros(padded, dtype=torch.bool)
    mask[: item["fitted"][0], : item["fitted"][1]] = torch.from_numpy(item["object"])
    labels = group_pixels(features, [ObjectToGroup(0, mask, item["fitted"], 0)], K, n_init=RESTARTS)[0].numpy()
    ids = [k for k in range(1, K + 1) if (labels == k).any()]
    return labels, encode_rles(labels[None] == np.array(ids)[:, None, None])


def reference_grouping(features: torch.Tensor, item: dict, padded, chunk: int = 128) -> tuple[np.ndarray, list]:
    """The released per-image loop (sklearn k-means, every channel upsampled)."""
    h, w = item["fitted"]
    mask = torch.zeros(padded, dtype=torch.bool)
    mask[:h, :w] = torch.from_numpy(item["object"])
    grid = masks_to_grid(mask[None], tuple(features.shape[-2:]))[0]
    points = features[0][:, grid].T.numpy()
    centroids = torch.from_numpy(KMeans(K, n_init=RESTARTS, random_state=0).fit(points).cluster_centers_).float()
    scores = torch.zeros(K, h, w)
    for start in range(0, features.shape[1], chunk):
        up = F.interpolate(features[:, start:start + chunk], size=padded, mode="bilinear", align_corners=False)
        scores += torch.einsum("chw,kc->khw", up[0, :, :h, :w], centroids[:, start:start + chunk])
    labels = np.where(item["object"], scores.argmax(0).numpy() + 1, 0)
    ids = [k for k in range(1, K + 1) if (labels == k).any()]
    return labels, encode_rles(labels[None] == np.array(ids)[:, None, None])


def measure(name: str, source: FeatureSource, items: list) -> dict:
    backbone, ours, ref, agreement = [], [], [], []
    for item in items:
        pixels = preprocess_images([item["image"]]).pixel_values
        padded = tuple(pixels.shape[-2:])
        source(pixels)  # warm-up (allocator, kernels)
        seconds, features = timed(lambda: source(pixels))
        backbone.append(seconds)
        project_grouping(features, item, padded)  # warm-up
        seconds, (labels, _) = timed(lambda: project_grouping(features, item, padded))
        ours.append(seconds)
        seconds, (ref_labels, _) = timed(lambda: reference_grouping(features, item, padded))
        ref.append(seconds)
        agreement.append(_matched_agreement(labels, ref_labels))
    b, o, r = (statistics.median(t) for t in (backbone, ours, ref))
    print(f"{name}: {features.shape[1]} channels on a {tuple(features.shape[-2:])} grid; per image: "
          f"backbone {b * 1e3:.0f} ms, project grouping {o * 1e3:.1f} ms, reference grouping {r * 1e3:.1f} ms; "
          f"grouping/backbone {o / b:.3f} (reference {r / b:.3f}); speedup {r / o:.1f}x; "
          f"pixels labelled alike (best permutation) median {statistics.median(agreement):.3f}")
    return {"over": o / b, "speedup": r / o}


def _matched_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of object pixels with the same part under the best one-to-one relabelling."""
    from itertools import permutations

    inside = a > 0
    best = 0.0
    for perm in permutations(range(1, K + 1)):
        mapped = np.zeros(K + 1, dtype=np.int64)
        mapped[1:] = perm
        best = max(best, float((mapped[a[inside]] == b[inside]).mean()))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--efficientnet-levels", default="stride4,stride8,stride16")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        make_synthetic_dataset(tmp, num_classes=args.images, images_per_class=1, size=(192, 144), seed=1)
        items = synthetic_objects(Path(tmp), "train", 640)
    print(f"{len(items)} images fitted to {items[0]['fitted']}, objects {[int(it['object'].sum()) for it in items]} px, "
          f"K={K}, {RESTARTS} restarts, {torch.get_num_threads()} threads")
    torch.manual_seed(0)
    effnet = FeatureSource("efficientnet_lite0", build_efficientnet_lite0().to(memory_format=torch.channels_last),
                           args.efficientnet_levels.split(",")).eval()
    eff = measure("efficientnet_lite0 " + args.efficientnet_levels, effnet, items)
    swin = FeatureSource("mask2former", build_mask2former("swin_l_coco_instance"), ("res3", "res4")).eval()
    sw = measure("Swin-L res3+res4 (random weights)", swin, items)
    print(f"B4 grouping_over_backbone={sw['over']:.3f} speedup_vs_reference={sw['speedup']:.1f}x "
          f"efficientnet_grouping_over_backbone={eff['over']:.3f} efficientnet_speedup_vs_reference={eff['speedup']:.1f}x")


if __name__ == "__main__":
    main()
