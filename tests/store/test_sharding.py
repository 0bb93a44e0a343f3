"""The one sharding rule (``shard.by``) every sharded stage uses."""
from __future__ import annotations

import pytest

from part_distillation.store.keytable import key_hash
from part_distillation.store.sharding import check_shard, in_shard, key_shard, shard_items


def test_by_image_is_the_key_hash_and_covers_every_item_once():
    keys = [f"folder/img_{i}.jpg" for i in range(200)]
    shards = [shard_items(keys, i, 3, "image", key=str) for i in range(3)]
    assert sorted(k for s in shards for k in s) == sorted(keys)
    for i, shard in enumerate(shards):
        assert all(key_hash(k) % 3 == i and key_shard(k, 3) == i and in_shard(k, i, 3) for k in shard)
    assert shard_items(keys, 1, 3, "key", key=str) == shards[1]  # the store's older name


def test_by_class_keeps_classes_whole_and_items_without_a_class_go_by_key():
    items = [(f"k{i}", f"c{i % 5}" if i % 7 else None) for i in range(70)]
    shards = [shard_items(items, i, 2, "class", key=lambda it: it[0], cls=lambda it: it[1]) for i in range(2)]
    owner = {}
    for index, shard in enumerate(shards):
        for key, cls in shard:
            if cls is None:
                assert key_shard(key, 2) == index
            else:
                assert owner.setdefault(cls, index) == index
    assert sorted(shards[0] + shards[1]) == sorted(items)
    with pytest.raises(ValueError, match="needs the items' classes"):
        shard_items(items, 0, 2, "class", key=lambda it: it[0])


@pytest.mark.parametrize("index,count,by", [(2, 2, "image"), (0, 0, "image"), (True, 2, "image"), (0, 2, "wnid")])
def test_bad_shards_are_refused(index, count, by):
    with pytest.raises(ValueError, match="shard"):
        check_shard(index, count, by)
