#!/usr/bin/env python
"""Convert a detectron2 Mask2Former checkpoint (.pkl) into the project's checkpoint format.

The output is ``torch.save`` of a state dict with transformers module names, readable with
``torch.load(weights_only=True)`` and loadable with
``part_distillation.models.checkpoint.load_project_checkpoint``. Before writing, the
converted entries are checked by name and shape against the architecture named by
``--spec`` (built on the meta device, so nothing large is allocated).

Example:
    python tools/convert_weights.py weights/mask2former/instance/swinL_i21k_q200_e100.pkl \\
        weights/mask2former/instance/swinL_i21k_q200_e100.pth
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from part_distillation.models.checkpoint import (
    DEFAULT_WEIGHTS_PATH,
    CheckpointMismatchError,
    UnsafePickleError,
    LoadReport,
    check_fits,
    convert_detectron2_state_dict,
    detectron2_model_state,
    read_detectron2_pickle,
)
from part_distillation.models.mask2former import SPECS, Mask2Former, get_spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, nargs="?", default=DEFAULT_WEIGHTS_PATH,
                        help=f"detectron2 .pkl (default: {DEFAULT_WEIGHTS_PATH})")
    parser.add_argument("output", type=Path, nargs="?", default=None,
                        help="where to write the state dict (default: the source with suffix .pth)")
    parser.add_argument("--spec", default="swin_l_coco_instance", choices=[*sorted(SPECS), "none"],
                        help="architecture to check the converted entries against ('none' skips the check)")
    args = parser.parse_args(argv)

    output = args.output or args.source.with_suffix(".pth")
    try:
        raw = detectron2_model_state(read_detectron2_pickle(args.source), str(args.source))
        state, plan = convert_detectron2_state_dict(raw, str(args.source))
        report = LoadReport(source=str(args.source), dropped=list(plan.dropped))
        if args.spec != "none":
            spec = get_spec(args.spec)
            head = state.get("class_predictor.bias")
            if head is not None:  # the class head's size is a property of the checkpoint, not the spec
                spec = spec.with_num_classes(int(head.shape[0]) - 1)
            with torch.device("meta"):
                model = Mask2Former.from_spec(spec)
            check_fits(model, state, report, strict=True)
        else:
            report.loaded = sorted(state)
    except (FileNotFoundError, UnsafePickleError, CheckpointMismatchError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, output)
    print(report.summary())
    print(f"wrote {len(state)} entries to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
