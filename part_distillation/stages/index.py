"""Stage ``index``: list every image of the tree and check that it decodes.

The expensive stages then start from a checked list, and bad files (corrupt, truncated,
empty, not images) are known and counted before GPU time is spent. One record per
image: key, path, class, size, whether it decodes (with the reason when not), and the
file's size and modification time.

A rerun resumes: images already indexed are not decoded again, but their file is
``stat``-ed; images whose size or modification time changed, and indexed images whose
file is gone, are reported (a warning each and counts in the summary). With
``stage.redo_changed=true`` changed images are indexed again (the new record
supersedes the old one) and vanished ones get a ``file_missing`` tombstone (readers no
longer yield them). The summary's bad and skipped counts cover the job's whole shard,
not only this run.
Entries of the tree that are not readable files (dangling links, loops, FIFOs, folders
named like images, names that are not UTF-8) are recorded as bad the same way, with
the listing's reason.
"""
from __future__ import annotations

import logging
import os

from part_distillation.config import RunConfig
from part_distillation.data.images import ImageInfo, probe_image
from part_distillation.context import JobContext
from part_distillation.progress import progress
from part_distillation.stages.shard_io import list_shard_images, open_output
from part_distillation.store.schemas import INDEX
from part_distillation.summaries import StageSummary

from part_distillation.config import IndexStageConfig
from part_distillation.stages import SHARDED, StageSpec

SPEC = StageSpec("index", IndexStageConfig, SHARDED, shards_over="the images of data.root (shard.by)",
                 reads_image_tree=True)

log = logging.getLogger("part_distillation")


def _file_state(path: str) -> tuple[int, float] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime


def _changed(record: dict | None, state: tuple[int, float] | None) -> bool:
    if record is None or record.get("file_size") is None:
        return False  # a skip marker, or a record from before sizes were kept
    return state is None or (record["file_size"], record["mtime"]) != state


def index_record(cfg: RunConfig, tree, ref, state) -> dict:
    """The index record of one listed image: its class and what probing the file found."""
    if ref.problem:  # listed, but not a readable file: logged by the listing
        probe = ImageInfo(0, 0, False, ref.problem)
    else:
        probe = probe_image(ref.path, max_pixels=cfg.data.max_pixels, oversize=cfg.data.oversize)
        if not probe.ok:
            log.warning("bad image: %s: %s (recorded as bad and skipped by later stages; replace the "
                        "file and rerun with stage.redo_changed=true to index it again)", ref.path, probe.reason)
    return {"key": ref.key, "path": ref.path, "wnid": ref.wnid, "class_index": ref.class_index,
            "class_name": tree.names[ref.class_index], "height": probe.height, "width": probe.width,
            "ok": probe.ok, "reason": probe.reason,
            "file_size": state[0] if state else None, "mtime": state[1] if state else None}


def forget_vanished(out, listed: set, redo: bool) -> int:
    """Images indexed by an earlier run whose file is gone: counted and warned about, and
    removed from the index with ``stage.redo_changed``. Returns how many."""
    vanished = 0
    for key in sorted(set(out.done_keys) - listed):
        record = out.read(key)
        if record is None or os.path.exists(record["path"]):
            continue  # a tombstone, or an image now listed in another job's slice
        vanished += 1
        log.warning("image indexed before is gone%s: %s", "; removing it from the index" if redo
                    else " (stage.redo_changed=true removes it)", record["path"])
        if redo:
            out.skip(key, "file_missing", replace=True)
    return vanished


def run(cfg: RunConfig, context: JobContext) -> StageSummary:
    summary = StageSummary(cfg.stage.name, output=cfg.stage.output)
    tree, refs = list_shard_images(cfg, include_rejected=True)
    redo = getattr(cfg.stage, "redo_changed", False)
    changed = 0
    with open_output(cfg, INDEX, context) as out:
        listed = set()
        for ref in progress(refs, len(refs), f"index {cfg.shard.index}/{cfg.shard.count}",
                            cfg.stage.progress_every):
            summary.seen += 1
            listed.add(ref.key)
            state = _file_state(ref.path)
            replace = False
            if out.has(ref.key):
                if not _changed(out.read(ref.key), state):
                    summary.already_done += 1
                    continue
                changed += 1
                log.warning("image changed since it was indexed%s: %s", "; indexing it again" if redo
                            else " (stage.redo_changed=true indexes it again)", ref.path)
                if not redo:
                    summary.already_done += 1
                    continue
                replace = True
            out.write(index_record(cfg, tree, ref, state), replace=replace)
            summary.written += 1
        vanished = forget_vanished(out, listed, redo)
        counts = out.counts
    # Whole-shard counts: a resumed run reports the bad images found by earlier runs too.
    summary.skipped.clear()
    if counts["bad"]:
        summary.skipped["bad_image"] = sum(counts["bad"].values())
    summary.skipped.update(counts["skipped"])
    summary.extra["images_in_tree"] = len(tree)
    summary.extra["bad_by_reason"] = counts["bad"]
    summary.extra["changed_files"] = changed
    summary.extra["vanished_files"] = vanished
    if tree.skipped:
        summary.extra["folders_skipped"] = len(tree.skipped)
    return summary.finish()
