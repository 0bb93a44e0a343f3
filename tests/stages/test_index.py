"""The `index` stage end to end, through the real entry point."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from part_distillation.data.synthetic import make_synthetic_dataset
from part_distillation.store import RecordStore
from tests.helpers import kill_entry_after_first_record, run_entry

REPO = Path(__file__).resolve().parents[2]


def _index_overrides(data_root: Path, out_root: Path, *extra: str) -> list[str]:
    return ["stage=index", f"data.root={data_root}", f"paths.root={out_root}",
            f"hydra.run.dir={out_root}/run", *extra]


def _records(out_root: Path) -> dict[str, dict]:
    store = RecordStore(out_root / "pseudo_labels" / "index" / "synthetic_train")
    return {r["key"]: {k: v for k, v in r.items()} for r in store.iter_records()}


@pytest.fixture(scope="module")
def tree_with_bad_files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    made = make_synthetic_dataset(root, num_classes=3, images_per_class=40, size=96, seed=3)
    first_class = made.image_dir / made.wnids[0]
    (first_class / "zero_bytes.JPEG").write_bytes(b"")
    (first_class / "not_an_image.JPEG").write_text("this is text")
    good = next(iter(sorted(first_class.glob("*.JPEG"))))
    data = good.read_bytes()
    (first_class / "truncated.JPEG").write_bytes(data[: len(data) // 2])
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(first_class / "gray.png")
    return root


@pytest.mark.integration
def test_index_records_every_image_and_flags_bad_ones(tree_with_bad_files, tmp_path):
    result = run_entry(*_index_overrides(tree_with_bad_files, tmp_path), check=True)
    records = _records(tmp_path)
    assert len(records) == 3 * 40 + 4
    bad = {k.split("/")[-1] for k, r in records.items() if not r["ok"]}
    assert bad == {"zero_bytes.JPEG", "not_an_image.JPEG", "truncated.JPEG"}
    gray = next(r for k, r in records.items() if k.endswith("gray.png"))
    assert (gray["height"], gray["width"], gray["ok"]) == (20, 30, True)
    assert all(r["reason"] for r in records.values() if not r["ok"])
    assert {r["class_index"] for r in records.values()} == {0, 1, 2}
    assert "skipped: bad_image: 3" in result.stderr + result.stdout


@pytest.mark.integration
def test_index_sharded_outputs_cover_the_tree_once(tree_with_bad_files, tmp_path):
    for index in range(3):
        run_entry(*_index_overrides(tree_with_bad_files, tmp_path, "shard.count=3", f"shard.index={index}",
                                     "shard.by=image"), check=True)
    store = RecordStore(tmp_path / "pseudo_labels" / "index" / "synthetic_train")
    keys = store.keys()
    assert len(keys) == len(set(keys)) == 3 * 40 + 4
    assert store.num_shards == 3 and len(store.shard_paths()) == 3


@pytest.mark.integration
def test_rerun_with_other_config_is_refused_and_output_kept(tree_with_bad_files, tmp_path):
    run_entry(*_index_overrides(tree_with_bad_files, tmp_path), check=True)
    before = _records(tmp_path)
    refused = run_entry(*_index_overrides(tree_with_bad_files, tmp_path, "data.max_pixels=100"))
    assert refused.returncode != 0
    assert "data.max_pixels" in refused.stderr
    assert _records(tmp_path) == before


@pytest.mark.integration
def test_kill_9_midway_then_rerun_equals_uninterrupted_run(tree_with_bad_files, tmp_path):
    reference = tmp_path / "reference"
    run_entry(*_index_overrides(tree_with_bad_files, reference), check=True)
    expected = _records(reference)

    killed = tmp_path / "killed"
    shard = killed / "pseudo_labels" / "index" / "synthetic_train" / "shards" / "00000-of-00001.rec"
    assert kill_entry_after_first_record(*_index_overrides(tree_with_bad_files, killed), shards=shard.parent)
    partial = shard.stat().st_size if shard.exists() else 0

    run_entry(*_index_overrides(tree_with_bad_files, killed), check=True)
    assert _records(killed).keys() == expected.keys()
    for key, record in _records(killed).items():
        want = dict(expected[key])
        got = dict(record)
        assert got == want, key
    assert 0 < partial < shard.stat().st_size, "the kill did not land midway"


@pytest.mark.integration
def test_crawl_junk_is_recorded_as_bad_and_a_rerun_goes_past_it(tmp_path):
    root = tmp_path / "data"
    made = make_synthetic_dataset(root, num_classes=2, images_per_class=3, size=48, seed=1)
    folder = made.image_dir / made.wnids[1]
    (folder / "loop.JPEG").symlink_to("loop.JPEG")
    (folder / "gone.JPEG").symlink_to("missing.JPEG")
    os.mkfifo(folder / "pipe.JPEG")
    (folder / "dir.JPEG").mkdir()
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.JPEG"), "wb") as f:
        f.write(b"x")
    (made.image_dir / "n00000001").symlink_to(made.image_dir / made.wnids[1])
    out = tmp_path / "out"
    first = run_entry(*_index_overrides(root, out), timeout=120)
    assert first.returncode == 0, first.stderr[-3000:]
    records = _records(out)
    assert len(records) == 2 * 3 + 5
    bad = {k: r["reason"] for k, r in records.items() if not r["ok"]}
    assert set(bad) == {f"{made.wnids[1]}/{n}" for n in ("loop.JPEG", "gone.JPEG", "pipe.JPEG", "dir.JPEG",
                                                         "caf\\xe9.JPEG")}
    assert all(bad.values())
    assert {r["class_index"] for r in records.values()} == {0, 1}  # the in-tree link added no class
    log = first.stdout + first.stderr
    assert "bad_image: 5" in log and "caf\\xe9.JPEG" in log  # whole-shard count of bad records
    second = run_entry(*_index_overrides(root, out), timeout=120)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "11 already done" in second.stdout + second.stderr


@pytest.mark.integration
def test_in1k_config_reads_loc_synset_mapping_when_there_is_no_words_txt(tmp_path):
    root = tmp_path / "imagenet"
    made = make_synthetic_dataset(root, num_classes=2, images_per_class=2, size=48, seed=2)
    (root / "words.txt").unlink()
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} class {w[-2:]}, other\n" for w in made.wnids))
    out = tmp_path / "out"
    result = run_entry("stage=index", "data=in1k", f"data.root={root}", f"paths.root={out}",
                       f"hydra.run.dir={out}/run", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    store = RecordStore(out / "pseudo_labels" / "index" / "imagenet_1k_train")
    names = {r["class_name"] for r in store.iter_records()}
    assert names == {f"class {w[-2:]}" for w in made.wnids}
