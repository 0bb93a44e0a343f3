"""Export a stage output's records to a COCO instance-segmentation json.

    python tools/export_coco.py pseudo_labels/object_labels/in1k/detic_predictions out.json
    python tools/export_coco.py STORE OUT.json --category-field class_code --shards 0 1
    python tools/export_coco.py STORE OUT.json --frame fitted    # stages 1-3: masks as stored (640)

Masks are written in the original image's frame (the size of the ``file_name`` image) by
default; ``--frame fitted`` keeps stages 1-3's fitted frame and says so in every image entry.

See ``part_distillation.store.export_coco`` for the record fields it reads.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from part_distillation.store import RecordStore, export_coco


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", help="stage output directory (holds manifest.json)")
    parser.add_argument("out", help="COCO json to write")
    parser.add_argument("--category-field", help="record field with the category (default: category_ids, classes)")
    parser.add_argument("--categories", help="json file with a COCO categories list, a list of names or {id: name}")
    parser.add_argument("--default-category", default="object", help="category name when a record has none")
    parser.add_argument("--shards", type=int, nargs="+", help="only these shard indices")
    parser.add_argument("--frame", choices=("original", "fitted"), default="original",
                        help="frame of the exported masks: the original image's (default) or the fitted one "
                             "stages 1-3 store them in")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    categories = None
    if args.categories:
        with open(args.categories) as f:
            categories = json.load(f)
        if isinstance(categories, dict) and "categories" in categories:
            categories = categories["categories"]  # a whole COCO json
    coco = export_coco(RecordStore(args.store), args.out, category_field=args.category_field,
                       categories=categories, default_category=args.default_category, shards=args.shards,
                       frame=args.frame)
    print(f"{args.out}: {coco['images']} images, {coco['annotations']} annotations, "
          f"{len(coco['categories'])} categories, {args.frame} frame "
          f"({coco['images_left_out']} images left out: not decoded)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
