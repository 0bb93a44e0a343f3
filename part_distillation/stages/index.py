"""Stage ``index``: list every image of the tree and check that it decodes.

The expensive stages then start from a checked list, and bad files (corrupt, truncated,
empty, not images) are known and counted before GPU time is spent. One record per
image: key, path, class, size and whether it decodes (with the reason when not).
Entries of the tree that are not readable files (dangling links, loops, FIFOs, folders
named like images, names that are not UTF-8) are recorded as bad the same way, with
the listing's reason, and counted as ``not_an_image_file``.
"""
from __future__ import annotations

import logging

from part_distillation.config import RunConfig
from part_distillation.data.images import ImageInfo, probe_image
from part_distillation.context import JobContext
from part_distillation.progress import StageSummary, progress
from part_distillation.stages.common import list_shard_images, open_output
from part_distillation.store.schemas import INDEX

log = logging.getLogger("part_distillation")


def run(cfg: RunConfig, context: JobContext) -> StageSummary:
    summary = StageSummary(cfg.stage.name, output=cfg.stage.output)
    tree, refs = list_shard_images(cfg, include_rejected=True)
    with open_output(cfg, INDEX) as out:
        for ref in progress(refs, len(refs), f"index {cfg.shard.index}/{cfg.shard.count}",
                            cfg.stage.progress_every):
            summary.seen += 1
            if out.has(ref.key):
                summary.already_done += 1
                continue
            if ref.problem:  # listed, but not a readable file: logged by the listing
                probe = ImageInfo(0, 0, False, ref.problem)
                summary.skip("not_an_image_file")
            else:
                probe = probe_image(ref.path, max_pixels=cfg.data.max_pixels, oversize=cfg.data.oversize)
                if not probe.ok:
                    log.warning("bad image skipped: %s: %s", ref.path, probe.reason)
                    summary.skip("bad_image")
            out.write({"key": ref.key, "path": ref.path, "wnid": ref.wnid, "class_index": ref.class_index,
                       "class_name": tree.names[ref.class_index], "height": probe.height,
                       "width": probe.width, "ok": probe.ok, "reason": probe.reason})
            summary.written += 1
    summary.extra["images_in_tree"] = len(tree)
    if tree.skipped:
        summary.extra["folders_skipped"] = len(tree.skipped)
    return summary.finish()
