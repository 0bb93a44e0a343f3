"""The shard writer: one process appends the records of one job (or one rank of it).

Resume
    ``writer.has(key)`` / ``writer.done_keys`` are the keys complete in the shard file:
    records and skip markers (``writer.skip(key, reason)`` for images that give no
    record, so a rerun does not retry them; readers never yield skip markers).

Duplicate keys and superseding
    A writer refuses a key already in its shard file (:class:`DuplicateKeyError`; check
    ``writer.has(key)`` first) unless told ``replace=True``: then the new frame
    supersedes the old one (the newest frame of a key in a shard file wins; a skip
    marker written with ``replace=True`` is a tombstone that removes the key's record
    from what readers yield). Superseding works within one shard file: redo a key in the
    job (shard index and rank) that wrote it.

Ranks
    A job of several processes writes one shard file per rank: rank 0
    ``00003-of-00060.rec``, rank r ``00003-of-00060.rNN.rec``, each with its own lock,
    summary and key table. Readers read all files of a shard index, rank order. The
    ranks of one job must process disjoint keys (a key written by two ranks is read
    once, from the lowest rank); keep the world size when resuming, since each rank
    resumes from its own file only.

Counts
    The shard summary (``.summary.json``, written at close) counts the whole file, not
    only this run: records, skip markers by reason, and *bad* records (records whose
    ``ok`` field is false, e.g. undecodable images of the index stage) by their
    ``reason`` field.
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Set
from pathlib import Path
from typing import Any

from part_distillation.store.errors import DuplicateKeyError, ShardLockedError, StoreError
from part_distillation.store.files import atomic_write_json, shard_name
from part_distillation.store.framing import (
    FRAME_HEADER_SIZE, frame_payload, ShardScan, decode_meta, decode_record, encode_payload, pread_exact,
    record_class_and_bad, try_flock,
)
from part_distillation.store.keytable import TableBuilder
from part_distillation.store.manifest import code_version as _code_version, ensure_manifest
from part_distillation.store.schemas import RecordSchema

logger = logging.getLogger("part_distillation.store")

#: Distinct bad-record reasons counted per shard file; further ones count as "other".
MAX_REASONS = 100


class _KeysView(Set):
    """Read-only live view of a writer's done keys (no copy)."""

    def __init__(self, keys: Mapping):
        self._keys = keys

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class ShardWriter:
    """Appends records to one shard file of a stage output; the only writer of that file.

    Opening checks (or creates) the manifest, takes the shard file's lock, and reads the
    keys already complete so a rerun can skip them (``has(key)``); a torn last record
    from a crash is truncated away. Use as a context manager: ``close()`` fsyncs, writes
    the shard's summary and its key table.
    """

    def __init__(self, output_dir: str | os.PathLike, shard_index: int, num_shards: int, *,
                 stage: str, config: Mapping[str, Any], code_version: str | None = None,
                 ignore_keys: Iterable[str] = (), overwrite_config: bool = False,
                 fsync_every: int = 256, on_corrupt: str = "raise", schema: RecordSchema | None = None,
                 rank: int = 0, world_size: int = 1):
        if not isinstance(num_shards, int) or num_shards < 1:
            raise ValueError(f"num_shards must be a positive int, got {num_shards!r}")
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index must be in [0, {num_shards}), got {shard_index}")
        if not isinstance(world_size, int) or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        if fsync_every < 1:
            raise ValueError("fsync_every must be >= 1")
        self.output_dir = Path(output_dir)
        self.shard_index, self.num_shards = shard_index, num_shards
        self.rank, self.world_size = rank, world_size
        self.code_version = code_version if code_version is not None else _code_version()
        self.fsync_every = fsync_every
        self.schema = schema
        self.manifest = ensure_manifest(self.output_dir, stage=stage, config=config, num_shards=num_shards,
                                        code_version=self.code_version, ignore_keys=ignore_keys,
                                        overwrite_config=overwrite_config)
        shards = self.output_dir / "shards"
        shards.mkdir(exist_ok=True)
        name = shard_name(shard_index, num_shards, rank)
        self.path = shards / f"{name}.rec"
        self.summary_path = shards / f"{name}.summary.json"
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            self._lock()
            # key -> (offset, payload length, skip reason or None, bad reason or None) of its newest frame
            self._done: dict[str, tuple[int, int, str | None, str | None]] = {}
            self._records = 0
            self._skipped: dict[str, int] = {}
            self._bad: dict[str, int] = {}
            self._table = TableBuilder()
            self._end = self._recover(on_corrupt)
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise
        self.resumed_records = self._records
        self.resumed_skipped = sum(self._skipped.values())
        self.written_this_run = 0
        self.skipped_this_run = 0
        self.replaced_this_run = 0
        self._unsynced = 0
        os.lseek(self._fd, self._end, os.SEEK_SET)
        if self._done:
            logger.info("resuming %s: %d keys already done", self.path, len(self._done))

    def _lock(self, patience_s: float = 2.0) -> None:
        """Take the exclusive lock; wait briefly while only readers probe it (shared locks)."""
        deadline = time.monotonic() + patience_s
        while True:
            if try_flock(self._fd, fcntl.LOCK_EX):
                return
            if not try_flock(self._fd, fcntl.LOCK_SH):
                break  # an exclusive holder: another writer
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        raise ShardLockedError(
            f"shard {self.path} is locked by another process that is writing it; two jobs must not "
            f"write the same shard (check shard_index={self.shard_index}, num_shards={self.num_shards} "
            f"and rank={self.rank}, or wait for the other job to finish)")

    def _recover(self, on_corrupt: str) -> int:
        """Read the done keys; truncate a torn tail. Returns the append offset."""
        size = os.fstat(self._fd).st_size
        scan = ShardScan(self.path, self._fd, size, on_corrupt=on_corrupt, tail_log_level=None)
        for offset, buf, pos, length in scan:
            meta = self._table.add_frame(buf, pos, offset, length)
            self._count(meta["key"], offset, length, meta.get("skip"), meta.get("bad"))
        self._skipped_corrupt = bool(scan.corrupt)  # then its key table would hide the damage: not saved
        if scan.tail is not None:
            offset, reason = scan.tail
            logger.warning("%s: truncating incomplete last record at byte offset %d (%s, %d bytes)",
                           self.path, offset, reason, size - offset)
            os.ftruncate(self._fd, offset)
            os.fsync(self._fd)
        return scan.valid_end if scan.tail is not None else size

    def _count(self, key: str, offset: int, length: int, skip_reason: str | None, bad: str | None) -> None:
        if bad is not None and bad not in self._bad and len(self._bad) >= MAX_REASONS:
            bad = "other"  # reasons may name sizes or errors: keep the summary small
        old = self._done.get(key)
        if old is not None:  # superseded: its counts go
            self._add_counts(old[2], old[3], -1)
        self._done[key] = (offset, length, skip_reason, bad)
        self._add_counts(skip_reason, bad, 1)

    def _add_counts(self, skip_reason: str | None, bad: str | None, n: int) -> None:
        if skip_reason is None:
            self._records += n
            if bad is not None:
                self._bad[bad] = self._bad.get(bad, 0) + n
        else:
            self._skipped[skip_reason] = self._skipped.get(skip_reason, 0) + n

    # -- queries
    def has(self, key: str) -> bool:
        """Whether ``key`` is already complete in this shard file (written or skipped)."""
        return key in self._done

    @property
    def done_keys(self) -> Set[str]:
        """Keys complete in this shard file, written or skipped (a live read-only view)."""
        return _KeysView(self._done)

    def read(self, key: str) -> dict | None:
        """The newest record of ``key`` in this shard file; None for a skip marker or an unknown key."""
        entry = self._done.get(key)
        if entry is None or entry[2] is not None or self._fd is None:
            return None
        offset, length = entry[0], entry[1]
        data = pread_exact(self._fd, FRAME_HEADER_SIZE + length, offset)
        meta, after = decode_meta(data, FRAME_HEADER_SIZE)
        return decode_record(data, FRAME_HEADER_SIZE, meta, after)

    @property
    def counts(self) -> dict:
        """Whole-file counts: ``records``, ``skipped`` and ``bad`` (by reason)."""
        return {"records": self._records, "skipped": {k: v for k, v in sorted(self._skipped.items()) if v},
                "bad": {k: v for k, v in sorted(self._bad.items()) if v}}

    # -- writing
    def write(self, record: Mapping[str, Any], *, replace: bool = False) -> None:
        """Append one record; it is complete on disk (page cache) when this returns.

        ``replace=True`` allows a key already in this shard file: the new record supersedes it.
        """
        key = record.get("key") if isinstance(record, Mapping) else None
        if not isinstance(key, str) or not key:
            raise ValueError("a record must be a dict with a non-empty str 'key'")
        if self.schema is not None:
            self.schema.check(record)
        fields = {k: v for k, v in record.items() if k != "key"}
        class_name, bad = record_class_and_bad(fields)
        self._append(key, encode_payload(key, fields), replace, None, class_name, bad)

    def skip(self, key: str, reason: str, *, replace: bool = False) -> None:
        """Mark ``key`` as done without a record (e.g. 'no_detections'), so reruns skip it too.

        With ``replace=True`` it supersedes the key's record (a tombstone)."""
        if not isinstance(key, str) or not key:
            raise ValueError("key must be a non-empty str")
        if not isinstance(reason, str) or not reason:
            raise ValueError("reason must be a non-empty str")
        self._append(key, encode_payload(key, {}, reason), replace, reason, None, None)

    def _append(self, key: str, payload: bytes, replace: bool, skip_reason: str | None,
                class_name: str | None, bad: str | None) -> None:
        if self._fd is None:
            raise StoreError(f"writer of {self.path} is closed")
        if key in self._done and not replace:
            raise DuplicateKeyError(f"key {key!r} is already in {self.path}; check writer.has(key) "
                                    f"before computing a record (or write with replace=True to supersede it)")
        header = frame_payload(payload)
        total = len(header) + len(payload)
        try:
            written = os.writev(self._fd, [header, payload])
            if written < total:
                rest = memoryview(header + payload)[written:]
                while rest:
                    rest = rest[os.write(self._fd, rest):]
        except BaseException:
            # Leave no torn record behind us in this process.
            os.ftruncate(self._fd, self._end)
            os.lseek(self._fd, self._end, os.SEEK_SET)
            raise
        offset = self._end
        self._end += total
        self._table.add(key, offset, len(payload), header, skip=skip_reason is not None,
                        class_name=class_name, bad=bad is not None)
        if key in self._done:
            self.replaced_this_run += 1
        self._count(key, offset, len(payload), skip_reason, bad)
        if skip_reason is not None:
            self.skipped_this_run += 1
        else:
            self.written_this_run += 1
        self._unsynced += 1
        if self._unsynced >= self.fsync_every:
            self.flush()

    def flush(self) -> None:
        """fsync the shard: what was written survives a power loss."""
        if self._fd is not None and self._unsynced:
            os.fsync(self._fd)
            self._unsynced = 0

    def summary(self, status: str = "closed") -> dict:
        """What this shard file holds now and what this run added (written at close)."""
        counts = self.counts
        return {
            "shard_index": self.shard_index,
            "num_shards": self.num_shards,
            "rank": self.rank,
            "world_size": self.world_size,
            "records": counts["records"],
            "skipped": counts["skipped"],
            "bad": counts["bad"],
            "written_this_run": self.written_this_run,
            "skipped_this_run": self.skipped_this_run,
            "replaced_this_run": self.replaced_this_run,
            "resumed_records": self.resumed_records,
            "resumed_skipped": self.resumed_skipped,
            "bytes": self._end,
            "status": status,
            "code_version": self.code_version,
            "closed": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }

    def close(self, status: str = "closed") -> None:
        """fsync, write the shard summary and key table atomically, release the lock. Idempotent."""
        if self._fd is None:
            return
        try:
            self._unsynced = max(self._unsynced, 1)
            self.flush()
            atomic_write_json(self.summary_path, self.summary(status))
            try:
                if not self._skipped_corrupt:
                    self._table.table(self.path, self._end, os.fstat(self._fd).st_ino).save()
            except OSError as e:  # readers rebuild a missing table from the shard
                logger.warning("could not write the key table of %s: %s", self.path, e)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("closed" if exc_type is None else f"error: {exc_type.__name__}")

    def __repr__(self) -> str:
        return f"ShardWriter({str(self.path)!r}, records={self._records})"
