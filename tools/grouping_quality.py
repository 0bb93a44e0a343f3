"""Quality of pixel grouping on the synthetic dataset, reported (not tuned).

For each variant of the synthetic data (``distinct``: every part its own colour and
texture, the default generator; ``shared``: all parts of an object share the body's
appearance, so colour alone cannot find them) and each method, prints the mean over
objects of the best-match IoU between the produced segments and the true parts
(``evaluation/segments.py``). Methods: the stage's algorithm (``models/grouping.py``,
true object mask as stage-1 input, fitted frame) with each feature source and level
choice, EfficientNet-Lite0 with random weights, optionally a random Swin-L (``--swin``,
slow on CPU; the official Swin-L weights are used when ``--swin-weights`` names them),
and the two baselines of ``models/baselines.py`` (K strips of the box; k-means of
RGB + xy).

    python tools/grouping_quality.py --classes 4 --images 6 --json quality.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from part_distillation.data.synthetic import make_synthetic_dataset  # noqa: E402
from part_distillation.evaluation.segments import best_match_iou, synthetic_objects  # noqa: E402
from part_distillation.masks import label_map_to_masks  # noqa: E402
from part_distillation.models.baselines import color_position_labels, strip_labels  # noqa: E402
from part_distillation.models.efficientnet import build_efficientnet_lite0  # noqa: E402
from part_distillation.models.grouping import ObjectToGroup, concat_levels, group_pixels  # noqa: E402
from part_distillation.models.mask2former import preprocess_images  # noqa: E402

EFFICIENTNET_CHOICES = (("stride8", "stride16"), ("stride4",), ("stride4", "stride8"), ("stride8",),
                        ("stride16",), ("stride4", "stride8", "stride16"))


def backbone_maps(network, items, batch: int, kind: str):
    """All feature levels of every item, batch by batch: list of (maps, index range)."""
    out = []
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        pixels = preprocess_images([it["image"] for it in chunk]).pixel_values
        with torch.no_grad():
            maps = network.backbone_features(pixels) if kind == "swin" else network.features(pixels)
        out.append((maps, start, len(chunk), tuple(pixels.shape[-2:])))
    return out


def grouping_scores(maps_list, items, levels, k: int, n_init: int, assignment: str = "dot") -> list[float]:
    scores = []
    for maps, start, n, padded in maps_list:
        feats = concat_levels(maps, levels)
        objects = []
        for row in range(n):
            it = items[start + row]
            mask = torch.zeros(padded, dtype=torch.bool)
            mask[: it["fitted"][0], : it["fitted"][1]] = torch.from_numpy(it["object"])
            objects.append(ObjectToGroup(row, mask, it["fitted"], start + row))
        for row, labels in enumerate(group_pixels(feats, objects, k, assignment=assignment, n_init=n_init)):
            it = items[start + row]
            segs = label_map_to_masks(labels.numpy())[0] if labels is not None else np.zeros((0, *it["fitted"]), bool)
            scores.append(best_match_iou(it["parts"], segs))
    return scores


def evaluate_variant(root: Path, args) -> dict[str, float]:
    items = synthetic_objects(root, "train", args.fit)
    results: dict[str, float] = {}
    results["baseline strips"] = float(np.mean([best_match_iou(it["parts"], label_map_to_masks(
        strip_labels(it["object"], args.k))[0]) for it in items]))
    results["baseline rgb+xy k-means"] = float(np.mean([best_match_iou(it["parts"], label_map_to_masks(
        color_position_labels(it["image"], it["object"], args.k, n_init=args.restarts, seed=i))[0])
        for i, it in enumerate(items)]))
    for pretrained in (True, False):
        torch.manual_seed(0)
        net = build_efficientnet_lite0(pretrained=pretrained).to(memory_format=torch.channels_last)
        maps_list = backbone_maps(net, items, args.batch, "efficientnet")
        for levels in (EFFICIENTNET_CHOICES if pretrained else EFFICIENTNET_CHOICES[:2]):
            name = f"efficientnet_lite0{'' if pretrained else ' RANDOM'} {'+'.join(levels)}"
            results[name] = float(np.mean(grouping_scores(maps_list, items, levels, args.k, args.restarts)))
        if pretrained:
            results["efficientnet_lite0 stride8+stride16 l2"] = float(np.mean(grouping_scores(
                maps_list, items, ("stride8", "stride16"), args.k, args.restarts, "l2")))
    if args.swin:
        from part_distillation.models.mask2former import build_mask2former

        torch.manual_seed(0)
        swin = build_mask2former("swin_l_coco_instance").eval()
        label = "mask2former Swin-L RANDOM res3+res4"
        if args.swin_weights:
            from part_distillation.models.checkpoint import load_detectron2_pickle

            load_detectron2_pickle(swin, args.swin_weights)
            label = "mask2former Swin-L res3+res4"
        few = items[: args.swin_images]
        maps_list = backbone_maps(swin, few, 1, "swin")
        results[f"{label} (first {len(few)} objects)"] = float(np.mean(grouping_scores(
            maps_list, few, ("res3", "res4"), args.k, args.restarts)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--images", type=int, default=6, help="images per class")
    parser.add_argument("--size", type=int, default=128, help="synthetic image side (fitted to --fit)")
    parser.add_argument("--fit", type=int, default=640)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--restarts", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--swin", action="store_true", help="also a Swin-L backbone (slow on CPU)")
    parser.add_argument("--swin-weights", default=None)
    parser.add_argument("--swin-images", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    report = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for variant, shared in (("distinct", False), ("shared", True)):
            root = Path(tmp) / variant
            make_synthetic_dataset(root, num_classes=args.classes, images_per_class=args.images, size=args.size,
                                   seed=args.seed, shared_appearance=shared)
            report[variant] = evaluate_variant(root, args)
    objects = args.classes * args.images
    print(f"mean best-match IoU over {objects} objects per variant (K={args.k}, fitted to {args.fit}, "
          f"{args.restarts} restarts), {time.perf_counter() - started:.0f} s")
    print(f"{'method':55s} {'distinct':>9s} {'shared':>9s}")
    for method in report["distinct"]:
        print(f"{method:55s} {report['distinct'][method]:9.3f} {report['shared'][method]:9.3f}")
    if args.json:
        args.json.write_text(json.dumps({"objects_per_variant": objects, "args": vars(args) | {"json": str(args.json)},
                                         "results": report}, indent=1))


if __name__ == "__main__":
    main()
