"""How ``count`` jobs split the work of one stage: the one sharding rule (``shard.by``).

Every sharded stage, whether it reads an image tree, a folder of images, a dataset or a
record store, decides which job owns an item here, so ``shard.by`` means one thing:

- ``by="image"``: item ``key`` belongs to shard ``key_hash(key) % count``
  (``store.keytable.key_hash``, stable across processes and Python versions). It depends on
  the key alone, never on which other items exist, so a job of a stage that follows a
  growing input (or a resumed run over a tree that gained images) keeps its items.
- ``by="class"``: every class (wnid) stays in one shard; classes go, largest first (ties by
  wnid), to the shard with the fewest items so far (ties to the lowest index): see
  :func:`assign_classes_to_shards`. An item without a class goes by key, as ``by="image"``.

The record store applies the same rule vectorised over its key tables
(``RecordStore.iter_slice``); :func:`shard_items` applies it to a list in memory.
"""
from __future__ import annotations

import heapq
from typing import Callable, Iterable, Mapping, Sequence, TypeVar

from part_distillation.store.keytable import key_hash

T = TypeVar("T")

#: The values of ``shard.by`` (``"key"`` is accepted as the store's older name of ``"image"``).
SHARD_BY = ("class", "image")


def check_shard(index: int, count: int, by: str = "class") -> str:
    """Validate one job's slice; returns ``by`` with ``"key"`` read as ``"image"``."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"shard count must be a positive integer, got {count!r}")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise ValueError(f"shard index must be an integer in [0, {count}), got {index!r}")
    by = "image" if by == "key" else by
    if by not in SHARD_BY:
        raise ValueError(f"shard by must be 'class' or 'image', got {by!r}")
    return by


def key_shard(key: str, count: int) -> int:
    """The shard that owns ``key`` under ``by="image"``."""
    return key_hash(key) % count


def assign_classes_to_shards(class_sizes: Mapping[str, int], count: int) -> dict[str, int]:
    """Map each class to a shard, balancing total size (greedy, largest class first)."""
    heap = [(0, s) for s in range(count)]  # (items so far, shard index): a valid heap as built
    owner: dict[str, int] = {}
    for wnid, size in sorted(class_sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        load, target = heapq.heappop(heap)
        owner[wnid] = target
        heapq.heappush(heap, (load + size, target))
    return owner


def shard_items(items: Iterable[T], index: int, count: int, by: str, *, key: Callable[[T], str],
                cls: Callable[[T], str | None] | None = None) -> list[T]:
    """The items of shard ``index`` of ``count`` (in the given order): ``key(item)`` names an
    item, ``cls(item)`` its class (needed for ``by="class"``; None: no class)."""
    by = check_shard(index, count, by)
    items = list(items)
    if by == "class":
        if cls is None:
            raise ValueError("shard by class needs the items' classes")
        sizes: dict[str, int] = {}
        for item in items:
            c = cls(item)
            if c is not None:
                sizes[c] = sizes.get(c, 0) + 1
        owner = assign_classes_to_shards(sizes, count)
        return [item for item in items
                if (owner[cls(item)] if cls(item) is not None else key_shard(key(item), count)) == index]
    return [item for item in items if key_shard(key(item), count) == index]


def in_shard(key: str, index: int, count: int) -> bool:
    """Whether ``key`` belongs to shard ``index`` of ``count`` under ``by="image"``."""
    return key_shard(key, count) == index


__all__: Sequence[str] = ("SHARD_BY", "assign_classes_to_shards", "check_shard", "in_shard", "key_shard",
                          "shard_items")
