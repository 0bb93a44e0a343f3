"""What every stage does around its work: open its shard of the output, list its input.

Written once so each stage's ``run()`` only wires data, a model and the store.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from part_distillation.config import RunConfig
from part_distillation.data.imagenet import ImageRecordRef, ImageTree, list_image_tree, shard
from part_distillation.store import ShardWriter, check_manifest, code_version
from part_distillation.store.schemas import RecordSchema


def open_output(cfg: RunConfig, schema: RecordSchema, context=None) -> ShardWriter:
    """This process's writer on ``cfg.stage.output``: checks the manifest, resumes its shard
    file, checks every record against ``schema``.

    ``context`` (the job's ``JobContext``; None = rank 0 of 1): each rank of a multi-process
    job writes its own file of the job's shard (``<index>-of-<count>.rNN.rec`` for rank > 0).
    The keys the store does not fingerprint are ``store.DEFAULT_IGNORE_KEYS`` (one list).
    """
    rank = getattr(context, "rank", 0) if context is not None else 0
    world_size = getattr(context, "world_size", 1) if context is not None else 1
    return ShardWriter(cfg.stage.output, cfg.shard.index, cfg.shard.count, stage=cfg.stage.name,
                       config=dataclasses.asdict(cfg), code_version=code_version(),
                       overwrite_config=cfg.overwrite_config, schema=schema,
                       rank=rank, world_size=world_size)


def output_conflict(cfg: RunConfig) -> str | None:
    """Why ``open_output`` would refuse this job's output (shard count, stage or config), or None.

    Checked before any job is submitted, by the store's own rule (``store.check_manifest``),
    in the words of the refusal itself.
    """
    return check_manifest(cfg.stage.output, stage=cfg.stage.name, config=dataclasses.asdict(cfg),
                          num_shards=cfg.shard.count, overwrite_config=cfg.overwrite_config,
                          count_key="shard.count")


def list_shard_images(cfg: RunConfig, include_rejected: bool = False) -> tuple[ImageTree, Sequence[ImageRecordRef]]:
    """The image tree of ``cfg.data`` and the slice of it this job handles.

    ``include_rejected`` adds the entries that are not readable image files
    (``ref.problem`` set) so that a stage can record them as bad.
    """
    tree = list_image_tree(cfg.data.root, split=cfg.data.split, words_file=cfg.data.words_file)
    refs = tree.images + tree.rejected if include_rejected else tree.images
    return tree, shard(refs, cfg.shard.index, cfg.shard.count, by=cfg.shard.by)
