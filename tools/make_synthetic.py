#!/usr/bin/env python
"""Write the synthetic part dataset: an ImageNet-style tree plus PartImageNet-style json.

Example: python tools/make_synthetic.py --out data/synthetic --classes 8 --images-per-class 50
(run it once per split: --split train, then --split val with the same seed and classes).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from part_distillation.data.synthetic import make_synthetic_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="dataset root (the split folder, words.txt and annotations/ go here)")
    parser.add_argument("--classes", type=int, default=4, help="number of object classes")
    parser.add_argument("--images-per-class", type=int, default=10)
    parser.add_argument("--size", type=int, nargs="+", default=[128], metavar="N",
                        help="image side, or width height")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts-per-class", type=int, default=4, help="parts of each class, body included")
    parser.add_argument("--split", default="train")
    parser.add_argument("--format", choices=["JPEG", "PNG"], default="JPEG", dest="image_format")
    parser.add_argument("--jpeg-quality", type=int, default=95)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing split")
    args = parser.parse_args(argv)
    if len(args.size) not in (1, 2):
        parser.error("--size takes one value (square) or two (width height)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    start = time.perf_counter()
    try:
        summary = make_synthetic_dataset(
            args.out, num_classes=args.classes, images_per_class=args.images_per_class,
            size=args.size[0] if len(args.size) == 1 else (args.size[0], args.size[1]), seed=args.seed,
            parts_per_class=args.parts_per_class, split=args.split, image_format=args.image_format,
            jpeg_quality=args.jpeg_quality, overwrite=args.overwrite)
    except (ValueError, FileExistsError) as exc:
        parser.exit(2, f"make_synthetic: error: {exc}\n")
    print(f"wrote {summary.num_images} images of {len(summary.wnids)} classes "
          f"({summary.num_part_annotations} part masks, {summary.num_part_categories} part categories) "
          f"in {time.perf_counter() - start:.1f}s")
    print(f"  images:      {summary.image_dir}")
    print(f"  class names: {summary.words_file}")
    print(f"  parts:       {summary.parts_json}")
    print(f"  objects:     {summary.objects_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
