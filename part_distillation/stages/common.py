"""What every stage does around its work: open its shard of the output, list its input.

Written once so each stage's ``run()`` only wires data, a model and the store.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from part_distillation.config import RunConfig
from part_distillation.data.imagenet import ImageRecordRef, ImageTree, list_image_tree, shard
from part_distillation.store import ShardWriter, code_version
from part_distillation.store.schemas import RecordSchema

#: Keys that say where or how a job runs, not what it computes: they never make an
#: existing output "different" (the shard count is checked on its own by the store).
NOT_FINGERPRINTED = ("shard.index", "shard.count", "launcher", "paths", "log_level", "overwrite_config",
                     "experiment", "stage.progress_every", "stage.input", "stage.output", "model.device",
                     "stage.batch_size")


def open_output(cfg: RunConfig, schema: RecordSchema) -> ShardWriter:
    """This job's writer on ``cfg.stage.output``: checks the manifest, resumes the shard,
    checks every record against ``schema``."""
    return ShardWriter(cfg.stage.output, cfg.shard.index, cfg.shard.count, stage=cfg.stage.name,
                       config=dataclasses.asdict(cfg), code_version=code_version(),
                       ignore_keys=NOT_FINGERPRINTED, overwrite_config=cfg.overwrite_config,
                       schema=schema)


def list_shard_images(cfg: RunConfig) -> tuple[ImageTree, Sequence[ImageRecordRef]]:
    """The image tree of ``cfg.data`` and the slice of it this job handles."""
    tree = list_image_tree(cfg.data.root, split=cfg.data.split, words_file=cfg.data.words_file)
    return tree, shard(tree.images, cfg.shard.index, cfg.shard.count, by=cfg.shard.by)
