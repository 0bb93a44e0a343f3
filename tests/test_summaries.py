"""Stage summaries (a pipeline reports each stage apart, with where its output is; each job
saves its summary next to its output)."""
from __future__ import annotations

import errno
import json
import logging
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from part_distillation import __main__ as entry
from part_distillation.config import register_configs, validate
from part_distillation.data.imagenet import list_image_tree
from part_distillation.data.synthetic import make_synthetic_dataset
from part_distillation.stages.shard_io import output_conflict
from part_distillation.store import RecordStore
from part_distillation.summaries import StageSummary, read_summaries, record_summary


def test_a_pipeline_summary_keeps_stage_counts_apart_and_names_the_outputs(caplog):
    made = StageSummary("synthetic_data", written=48, output="/data/synthetic")
    indexed = StageSummary("index", seen=48, written=40, already_done=8, output="/out/index")
    indexed.skip("bad_image")
    pipeline = StageSummary("pipeline", parts=[made, indexed], output="/out/index").finish()
    summary = pipeline.as_dict()
    assert "seen" not in summary and "written" not in summary  # 48 images + 48 records are not 96 of anything
    assert summary["stages"]["synthetic_data"]["written"] == 48
    assert summary["stages"]["index"] == {**summary["stages"]["index"], "seen": 48, "written": 40,
                                          "already_done": 8, "skipped": {"bad_image": 1}, "output": "/out/index"}
    with caplog.at_level(logging.INFO, logger="part_distillation"):
        pipeline.log()
        indexed.log()
    lines = caplog.messages
    assert "outputs: synthetic_data: /data/synthetic, index: /out/index" in lines[0]
    assert "48 inputs seen, 40 records written, 8 already done" in lines[1] and "output: /out/index" in lines[1]


# --------------------------------------------------------------------------- progress lines

# --------------------------------------------------------------------------- saved summaries

def _compose(*overrides: str):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=entry.config_dir(), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture
def small_tree(tmp_path):
    make_synthetic_dataset(tmp_path / "data", num_classes=2, images_per_class=3, size=48, seed=1)
    return tmp_path / "data"


def _run_index(monkeypatch, tree, root, *extra):
    from part_distillation import launch
    from part_distillation.launch import local

    monkeypatch.setattr(local, "configure_logging", lambda level: None)  # leave other tests' log levels alone
    return launch.run_job(_compose("stage=index", f"data.root={tree}", f"paths.root={root}", *extra))


def test_run_job_saves_its_summary_next_to_the_output_and_a_rerun_replaces_it(monkeypatch, small_tree, tmp_path):
    output = tmp_path / "out" / "pseudo_labels" / "index" / "synthetic_train"
    first = _run_index(monkeypatch, small_tree, tmp_path / "out")
    saved_path = output / "summaries" / "index-shard0-of-1.json"
    saved = json.loads(saved_path.read_text())
    assert {k: v for k, v in saved.items() if k != "job"} == first  # what run_job returned
    assert (saved["written"], saved["seen"], saved["already_done"]) == (6, 6, 0)
    assert saved["job"]["shard_index"] == 0 and saved["job"]["shard_count"] == 1 and saved["job"]["rank"] == 0
    assert saved["job"]["data"] == "synthetic_train" and saved["wall_s"] > 0

    second = _run_index(monkeypatch, small_tree, tmp_path / "out")
    again = json.loads(saved_path.read_text())
    assert (again["written"], again["already_done"]) == (0, 6) == (second["written"], second["already_done"])
    assert sorted(p.name for p in saved_path.parent.iterdir()) == [saved_path.name]  # replaced, no leftovers
    # the store is untouched by the extra folder: same records, same manifest check
    assert len(RecordStore(output).keys()) == 6
    assert output_conflict(validate(_compose("stage=index", f"data.root={small_tree}",
                                             f"paths.root={tmp_path / 'out'}"))) is None
    assert read_summaries(output, "index") == [again]


def test_every_shard_keeps_its_own_summary(monkeypatch, small_tree, tmp_path):
    for index in (1, 0):
        _run_index(monkeypatch, small_tree, tmp_path / "out", "shard.count=2", f"shard.index={index}")
    output = tmp_path / "out" / "pseudo_labels" / "index" / "synthetic_train"
    assert sorted(p.name for p in (output / "summaries").iterdir()) == ["index-shard0-of-2.json",
                                                                        "index-shard1-of-2.json"]
    saved = read_summaries(output)
    assert [s["job"]["shard_index"] for s in saved] == [0, 1]  # in shard order
    assert sum(s["written"] for s in saved) == 6 == len(RecordStore(output).keys())


def _cfg(output, data_root, index=0, count=1, stage="index"):
    return SimpleNamespace(stage=SimpleNamespace(name=stage, output=str(output)),
                           data=SimpleNamespace(root=str(data_root), name="synthetic_train"),
                           shard=SimpleNamespace(index=index, count=count), experiment="demo")


def test_each_rank_of_a_multi_process_job_keeps_its_own_summary(tmp_path):
    cfg = _cfg(tmp_path / "run", tmp_path / "data", stage="proposal_learning")
    for rank in (0, 1):
        summary = StageSummary("proposal_learning", seen=10 + rank).finish()
        record_summary(cfg, summary, SimpleNamespace(rank=rank, world_size=2, job_id="77"))
    saved = read_summaries(tmp_path / "run")
    assert [(s["job"]["rank"], s["seen"], s["job"]["job_id"]) for s in saved] == [(0, 10, "77"), (1, 11, "77")]
    assert sorted(p.name for p in (tmp_path / "run" / "summaries").iterdir()) == [
        "proposal_learning-shard0-of-1.rank0.json", "proposal_learning-shard0-of-1.rank1.json"]


def test_a_stage_writing_the_image_tree_keeps_its_summary_where_the_tree_listing_never_looks(small_tree):
    listed_before = list_image_tree(small_tree, split="train")
    flat_tree = small_tree / "train"  # also the case of a flat tree (data.split=null)
    for root in (small_tree, flat_tree):
        path = record_summary(_cfg(root, root, stage="synthetic_data"), StageSummary("synthetic_data").finish())
        assert path == root / ".summaries" / "synthetic_data-shard0-of-1.json" and path.is_file()
        assert read_summaries(root)[0]["stage"] == "synthetic_data"
    for tree, split in ((small_tree, "train"), (flat_tree, None)):
        listed = list_image_tree(tree, split=split)
        assert sorted(listed.wnids) == sorted(listed_before.wnids) and len(listed.images) == 6 and not listed.rejected


def test_a_summary_that_cannot_be_saved_leaves_the_old_one_and_does_not_fail_the_job(tmp_path, caplog, monkeypatch):
    import part_distillation.store.files as files

    cfg = _cfg(tmp_path / "out", tmp_path / "data")
    path = record_summary(cfg, StageSummary("index", written=3).finish())

    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(files.os, "replace", disk_full)
    with caplog.at_level(logging.WARNING, logger="part_distillation"):
        assert record_summary(cfg, StageSummary("index", written=0, already_done=3).finish()) is None
    assert "summary not saved" in caplog.text and "No space left" in caplog.text
    assert json.loads(path.read_text())["written"] == 3  # the old summary, whole


def test_cpu_time_counts_child_processes_that_ended():
    import subprocess
    import sys

    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass"
    summary = StageSummary("dense_crf")
    subprocess.run([sys.executable, "-c", busy], check=True)
    assert summary.finish().cpu_s >= 0.5  # the child's half second of CPU, though this process idled
