"""The record store: how one stage hands per-image results to the next.

A stage output is a directory::

    <output>/manifest.json                       stage, config, fingerprint, shard count
    <output>/shards/00003-of-00060.rec           records of job 3 (append-only)
    <output>/shards/00003-of-00060.r01.rec       records of rank 1 of job 3 (multi-process jobs)
    <output>/shards/00003-of-00060.summary.json  whole-file counts, written at close
    <output>/shards/00003-of-00060.idx           key table (a cache, rebuilt from the shard)

Each job (each rank of a job) appends only to its own shard file, so the file count
grows with the number of jobs, never with the number of images, and no two processes
ever write one file.

Record
    A dict with a non-empty string ``"key"`` (a stable image id, e.g. the path relative
    to the image root) and any JSON values (str, int, float, bool, None, lists,
    str-keyed dicts), numpy arrays and numpy scalars (dtype and shape kept), ``bytes``
    and torch tensors (read back as numpy arrays), nested freely. Tuples come back as
    lists. COCO RLE masks are plain dicts ``{"size": [h, w], "counts": str}``.
    ``schemas`` declares each stage's fields; the writer checks them.

The parts, one module each:
    ``framing``   the shard file format, crash safety, ``repair_shard``
    ``manifest``  the manifest, config fingerprint, the one list of not-fingerprinted keys,
                  ``overwrite_config`` (the old output is moved aside)
    ``writer``    ``ShardWriter``: resume, skip markers, superseding, ranks, counts
    ``keytable``  per-file key tables (hash, offset) saved next to each shard
    ``reader``    ``RecordStore``: iteration, slices, lookup, duplicate rule, summaries
    ``coco``      ``export_coco`` (streaming)
    ``schemas``   record schemas of the stages
"""
from part_distillation.store.coco import coco_results, export_coco
from part_distillation.store.errors import (
    ConfigMismatchError, CorruptShardError, DuplicateKeyError, ShardCountMismatchError, ShardLockedError,
    StoreError,
)
from part_distillation.store.files import atomic_write_json, manifest_path, shard_name
from part_distillation.store.framing import (
    FORMAT, FRAME_HEADER_SIZE, MAGIC, encode_payload, repair_shard, scan_file,
)
from part_distillation.store.keytable import KeyTable, key_hash, load_table
from part_distillation.store.manifest import (
    DEFAULT_IGNORE_KEYS, check_manifest, code_version, config_diff, config_fingerprint, ensure_manifest, read_manifest,
)
from part_distillation.store.reader import RecordStore
from part_distillation.store.schemas import RecordSchema
from part_distillation.store.writer import ShardWriter

__all__ = [
    "FORMAT", "FRAME_HEADER_SIZE", "MAGIC", "DEFAULT_IGNORE_KEYS",
    "StoreError", "CorruptShardError", "ConfigMismatchError", "ShardCountMismatchError", "ShardLockedError",
    "DuplicateKeyError",
    "ShardWriter", "RecordStore", "RecordSchema", "KeyTable",
    "export_coco", "coco_results", "repair_shard", "scan_file", "encode_payload", "key_hash", "load_table",
    "atomic_write_json", "manifest_path", "shard_name", "check_manifest", "code_version", "config_diff", "config_fingerprint",
    "ensure_manifest", "read_manifest",
]
