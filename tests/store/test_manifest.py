"""The manifest: fingerprint, refusals, the one ignore list, overwrite_config, umask."""
from __future__ import annotations

import json
import logging
import os

import pytest

from part_distillation import __version__
from part_distillation.store import (
    ConfigMismatchError, RecordStore, ShardCountMismatchError, ShardWriter, code_version, config_fingerprint, export_coco, repair_shard,
)

from tests.store.helpers import CONFIG, make_record, writer


def test_manifest_records_the_run(tmp_path):
    with writer(tmp_path, 0, 3):
        pass
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["stage"] == "test" and m["config"] == CONFIG and m["num_shards"] == 3
    assert m["code_version"] == "test" and m["config_fingerprint"] == config_fingerprint(CONFIG) and m["created"]
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind


def test_config_mismatch_is_refused_naming_the_keys(tmp_path):
    with writer(tmp_path, 0, 3) as w:
        w.write(make_record(0))
    changed = {**CONFIG, "model": {"k": 8}, "data": {"name": "toy"}}  # data.root removed
    with pytest.raises(ConfigMismatchError) as err:
        writer(tmp_path, 1, 3, config=changed)
    msg = str(err.value)
    assert "model.k" in msg and "data.root" in msg and "overwrite_config=True" in msg and "4" in msg
    assert "launcher" not in msg


def test_overwrite_config_moves_the_old_output_aside_and_starts_afresh(tmp_path, caplog):
    out = tmp_path / "out"
    with writer(out, 0, 3) as w:
        w.write(make_record(0))
        w.write(make_record(1))
    changed = {**CONFIG, "model": {"k": 8}}
    with caplog.at_level(logging.WARNING):
        with writer(out, 1, 3, config=changed, overwrite_config=True) as w:
            w.write(make_record(5))
    (old,) = tmp_path.glob("out.old-*")
    assert f"moved it aside to {old}" in caplog.text
    # No record made under the old config is read under the new manifest ...
    store = RecordStore(out)
    assert store.config == changed and [r["i"] for r in store.iter_records()] == [5]
    # ... and nothing was deleted: the old output is intact where the log says.
    assert [r["i"] for r in RecordStore(old).iter_records()] == [0, 1] and RecordStore(old).config == CONFIG
    # The other jobs of the new run join the new output (no second move).
    with writer(out, 2, 3, config=changed, overwrite_config=True) as w:
        w.write(make_record(6))
    assert len(list(tmp_path.glob("out.old-*"))) == 1
    assert sorted(r["i"] for r in RecordStore(out).iter_records()) == [5, 6]


def test_files_are_created_with_the_process_umask(tmp_path):
    old_mask = os.umask(0o002)
    try:
        with writer(tmp_path / "out", 0, 1) as w:
            w.write(make_record(0))
        coco_out = tmp_path / "out" / "coco.json"
        export_coco(tmp_path / "out", coco_out)
        shard = w.path
        with open(shard, "ab") as f:
            f.write(b"PDR1xyz")  # a torn tail: repair rewrites the file
        assert repair_shard(shard)["torn_tail_offset"] is not None
        assert len(RecordStore(tmp_path / "out")) == 1  # the reader saves the rebuilt key table
        for path in (tmp_path / "out" / "manifest.json", w.summary_path, shard, shard.with_suffix(".idx"),
                     coco_out):
            assert path.stat().st_mode & 0o777 == 0o664, path
    finally:
        os.umask(old_mask)


def test_one_list_of_not_fingerprinted_keys_covers_the_run_config():
    from part_distillation import store
    from part_distillation.stages import shard_io

    assert not hasattr(shard_io, "NOT_FINGERPRINTED")
    assert "shard.index" in store.DEFAULT_IGNORE_KEYS and "shard.count" in store.DEFAULT_IGNORE_KEYS
    job0 = {"shard": {"index": 0, "count": 4, "by": "class"}, "stage": {"name": "index", "progress_every": 1,
            "output": "/a", "redo_changed": False, "workers": 1}, "model": {"device": "cuda", "k": 3}, "log_level": "INFO"}
    job3 = {"shard": {"index": 3, "count": 4, "by": "class"}, "stage": {"name": "index", "progress_every": 50,
            "output": "/b", "redo_changed": True, "workers": 2}, "model": {"device": "cpu", "k": 3}, "log_level": "DEBUG"}
    assert config_fingerprint(job0) == config_fingerprint(job3)
    assert config_fingerprint(job0) != config_fingerprint({**job0, "shard": {"index": 0, "count": 4, "by": "image"}})


def test_ignored_keys_do_not_count(tmp_path):
    with writer(tmp_path, 0, 3):
        pass
    # shard index, launcher settings are ignored by default; data.root when the caller says so.
    other_job = {**CONFIG, "launcher": {"nodes": 2}, "shard": {"index": 2, "count": 3},
                 "data": {"name": "toy", "root": "/scratch/b"}}
    with pytest.raises(ConfigMismatchError, match="data.root"):
        writer(tmp_path, 1, 3, config=other_job)
    with writer(tmp_path, 1, 3, config=other_job, ignore_keys=["data.root"]):
        pass
    assert config_fingerprint(other_job, ["data.root"]) == config_fingerprint(CONFIG, ["data.root"])
    assert config_fingerprint(other_job) != config_fingerprint(CONFIG)


def test_stage_and_shard_count_mismatch_are_refused(tmp_path):
    with writer(tmp_path, 0, 3):
        pass
    with pytest.raises(ShardCountMismatchError, match="num_shards=3.*num_shards=2"):
        writer(tmp_path, 0, 2)
    with pytest.raises(ShardCountMismatchError):
        writer(tmp_path, 0, 2, overwrite_config=True)
    with pytest.raises(ConfigMismatchError, match="stage: 'test'"):
        ShardWriter(tmp_path, 0, 3, stage="other", config=CONFIG, code_version="test")
    with pytest.raises(ValueError, match="shard_index"):
        writer(tmp_path, 3, 3)


def test_code_version_starts_with_the_package_version():
    assert code_version().startswith(__version__)




def test_check_manifest_refuses_exactly_what_ensure_manifest_refuses_in_its_words(tmp_path):
    from part_distillation.store import StoreError, check_manifest, ensure_manifest

    assert check_manifest(tmp_path / "none", stage="test", config=CONFIG, num_shards=3) is None
    with writer(tmp_path, 0, 3):
        pass
    changed = {**CONFIG, "model": {"k": 8}}
    cases = [
        dict(stage="test", config=CONFIG, num_shards=3),                           # the same run: accepted
        dict(stage="test", config=changed, num_shards=3),                          # another config
        dict(stage="test", config=changed, num_shards=3, overwrite_config=True),   # ... started afresh
        dict(stage="test", config=CONFIG, num_shards=2),                           # another shard count
        dict(stage="test", config=CONFIG, num_shards=2, overwrite_config=True),    # ... refused all the same
        dict(stage="other", config=CONFIG, num_shards=3),                          # another stage
    ]
    for case in cases:
        before = (tmp_path / "manifest.json").read_text()
        said = check_manifest(tmp_path, **case)
        assert (tmp_path / "manifest.json").read_text() == before  # a check writes nothing
        if said is None:
            continue  # (writing with those settings is covered by the tests above)
        assert "\n" not in said
        with pytest.raises(StoreError) as err:
            ensure_manifest(tmp_path, code_version="test", **case)
        assert said == "; ".join(line.strip() for line in str(err.value).splitlines() if line.strip())
    refused = [check_manifest(tmp_path, **case) is not None for case in cases]
    assert refused == [False, True, False, True, True, True]


def test_check_manifest_names_the_shard_count_as_the_caller_calls_it(tmp_path):
    # the stages' preflight names the setting to change (shard.count), not the store's own word
    from part_distillation.store import check_manifest

    with writer(tmp_path, 0, 3):
        pass
    said = check_manifest(tmp_path, stage="test", config=CONFIG, num_shards=2, count_key="shard.count")
    assert "asks for shard.count=2" in said and "Use shard.count=3" in said and "num_shards" not in said
    assert "num_shards=3" in check_manifest(tmp_path, stage="test", config=CONFIG, num_shards=2)
