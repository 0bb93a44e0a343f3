#!/usr/bin/env python
"""Draw a stage output's records as one PNG collage: a row per class, a few images each.

    python tools/collage.py pseudo_labels/part_labels/proposal_generation_dcrf/synthetic_train dcrf.png \
        --per-class 4 --classes 8

Works for any stage whose records carry masks (stage 1 ``masks``, stages 2/3
``part_masks`` + ``object_mask``, stage 5 ``part_masks`` + ``cluster_ids``); see
``part_distillation/viz.py``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from part_distillation.store import RecordStore, manifest_path
from part_distillation.viz import class_collage, write_png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store_dir", type=Path, help="a stage output folder (with manifest.json)")
    parser.add_argument("out", type=Path, help="PNG file to write")
    parser.add_argument("--per-class", type=int, default=4, help="images per class (default 4)")
    parser.add_argument("--classes", type=int, default=8, help="classes, the first by class index (default 8)")
    parser.add_argument("--cell", type=int, default=192, help="side of each image cell in pixels")
    args = parser.parse_args(argv)
    if not manifest_path(args.store_dir).is_file():
        print(f"error: {args.store_dir} is not a stage output (no manifest.json)", file=sys.stderr)
        return 2
    store = RecordStore(args.store_dir)
    image = class_collage(store.iter_records(), args.per_class, args.classes, args.cell)
    write_png(args.out, image)
    print(f"wrote {args.out} ({image.shape[1]}x{image.shape[0]}) from stage {store.stage} records of {args.store_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
