"""The record store's refusals: every one is a :class:`StoreError`."""
from __future__ import annotations

from pathlib import Path


class StoreError(Exception):
    """Any refusal of the record store."""


class CorruptShardError(StoreError):
    """A frame that fails its checks is followed by valid frames: real corruption."""

    def __init__(self, path: Path, offset: int, reason: str):
        self.path, self.offset, self.reason = Path(path), offset, reason
        super().__init__(
            f"corrupt record in {path} at byte offset {offset}: {reason}; the records after it are "
            f"intact. Read with on_corrupt='skip' to skip it, or rewrite the shard without it with "
            f"part_distillation.store.repair_shard({str(path)!r}) and rerun its job to recompute the lost record")


class ConfigMismatchError(StoreError):
    """The output was made with a different config or stage."""


class ShardCountMismatchError(StoreError):
    """The output was made with a different number of shards."""


class ShardLockedError(StoreError):
    """Another process is writing this shard."""


class DuplicateKeyError(StoreError, KeyError):
    """The key is already in this shard."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class EmptyInputError(StoreError, ValueError):
    """An input record set holds nothing the stage can use (e.g. every record filtered out)."""
