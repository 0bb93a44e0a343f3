"""The bad-input catalogue, run as a user runs the entry point (``run_entry``).

Each bad input ends with its clear one-line message (it names the file or setting and
says what to do, or for a bad image that it is recorded as bad and skipped) and loses
nothing: the records written before it are still there, unchanged, and the store
reopens and reads clean. Each case adds one to ``tally.add("bad_inputs")``.

Most cases share one small image tree indexed once before the bad inputs arrive
(module fixtures): the catalogue costs a few runs of the entry point, not one per case.
The read-only output and the full disk are real file systems: a tmpfs mounted for the
test (remounted read-only; filled up), or, where mounting is not allowed (not root), a
shard that is a link to ``/dev/full`` (every write fails with ENOSPC) and an output
folder that is a file.
"""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from part_distillation.data.synthetic import make_synthetic_dataset
from part_distillation.store import RecordStore
from tests.helpers import run_entry

pytestmark = pytest.mark.integration

INDEX_OUT = Path("pseudo_labels") / "index" / "synthetic_train"


def one_line(result: subprocess.CompletedProcess) -> str:
    """The single line a failed run printed on stderr (no traceback)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def read_all(folder: Path) -> dict:
    """Every record of a store by key (raises on any corrupt frame)."""
    store = RecordStore(folder)
    try:
        return {r["key"]: r for r in store.iter_records(on_corrupt="raise")}
    finally:
        store.close()


def same_records(before: dict, after: dict) -> bool:
    def same(a, b):
        if isinstance(a, np.ndarray):
            return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
        if isinstance(a, dict):
            return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, list):
            return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return a == b
    return all(k in after and same(v, after[k]) for k, v in before.items())


def index(tree: Path, root: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_entry("stage=index", f"data.root={tree}", f"paths.root={root}", f"hydra.run.dir={root}/run",
                     *extra, cwd=root)


def make_tree(path: Path) -> Path:
    make_synthetic_dataset(path, num_classes=2, images_per_class=2, size=48, seed=4)
    return path


# --------------------------------------------------------------------------- bad images and class folders

def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG announcing a huge image with almost no pixel data (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8))
                     + chunk(b"IEND", b""))


def _corrupt(path: Path) -> None:
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
        path, format="JPEG", quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated mid-scan


#: name in the first class folder -> how to make it, whether it indexes as ok
BAD_IMAGES = {
    "corrupt": ("corrupt.JPEG", _corrupt, False),
    "empty": ("empty.JPEG", lambda p: p.write_bytes(b""), False),
    "cmyk": ("cmyk.JPEG", lambda p: Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(p, format="JPEG"), True),
    "16bit": ("deep.png", lambda p: Image.fromarray(np.full((30, 40), 40000, np.uint16)).save(p), True),
    "huge": ("huge.png", lambda p: _png_header_only(p, 40_000, 40_000), False),
}
NON_UTF8 = b"bad\xff\xfename.JPEG"


@pytest.fixture(scope="module")
def bad_tree_run(tmp_path_factory):
    """A tree indexed once, then given every bad image and class folder, then indexed again."""
    base = tmp_path_factory.mktemp("bad_images")
    tree, root = make_tree(base / "tree"), base / "out"
    root.mkdir()
    first = index(tree, root)
    assert first.returncode == 0, first.stderr[-3000:]
    before = read_all(root / INDEX_OUT)
    assert len(before) == 4
    classes = sorted(p for p in (tree / "train").iterdir() if p.is_dir())
    good = next(classes[0].glob("*.JPEG")).read_bytes()
    for name, make, _ in BAD_IMAGES.values():
        make(classes[0] / name)
    with open(os.path.join(os.fsencode(classes[0]), NON_UTF8), "wb") as f:
        f.write(good)
    (tree / "train" / "n99999998").mkdir()                      # a class folder with no images
    (tree / "train" / "n99999999").mkdir()                      # a class the words file does not name
    (tree / "train" / "n99999999" / "x.JPEG").write_bytes(good)
    second = index(tree, root)
    return {"tree": tree, "root": root, "first": first, "second": second, "before": before,
            "after": read_all(root / INDEX_OUT), "class_dir": classes[0]}


def _nothing_lost(run) -> None:
    assert run["second"].returncode == 0, run["second"].stderr[-3000:]
    assert same_records(run["before"], run["after"]), "records written before the bad input changed"


@pytest.mark.parametrize("kind", list(BAD_IMAGES))
def test_bad_image_is_recorded_by_name_and_nothing_is_lost(bad_tree_run, kind, tally):
    name, _, ok = BAD_IMAGES[kind]
    _nothing_lost(bad_tree_run)
    wnid = bad_tree_run["class_dir"].name
    record = bad_tree_run["after"][f"{wnid}/{name}"]
    log = bad_tree_run["second"].stdout + bad_tree_run["second"].stderr
    path = str(bad_tree_run["class_dir"] / name)
    if ok:  # converted to RGB, not refused
        assert record["ok"] and (record["width"], record["height"]) == (40, 30), record
        assert f"bad image: {path}" not in log
    else:
        assert not record["ok"] and record["reason"], record
        lines = [line for line in log.splitlines() if f"bad image: {path}: " in line]
        assert len(lines) == 1, log[-3000:]
        assert record["reason"] in lines[0] and "redo_changed=true" in lines[0]
    tally.add("bad_inputs")


def test_non_utf8_file_name_is_recorded_as_bad_under_a_text_key(bad_tree_run, tally):
    _nothing_lost(bad_tree_run)
    wnid = bad_tree_run["class_dir"].name
    key = f"{wnid}/bad\\xff\\xfename.JPEG"
    assert key in bad_tree_run["after"] and not bad_tree_run["after"][key]["ok"]
    log = bad_tree_run["second"].stdout + bad_tree_run["second"].stderr
    assert [line for line in log.splitlines() if "not an image file:" in line and "bad\\xff\\xfename.JPEG" in line]
    tally.add("bad_inputs")


def test_class_folder_with_no_images_is_named(bad_tree_run, tally):
    _nothing_lost(bad_tree_run)
    log = bad_tree_run["second"].stdout + bad_tree_run["second"].stderr
    assert "class folders in" in log and "hold no images (e.g. n99999998)" in log
    assert "add images or remove the folders" in log
    tally.add("bad_inputs")


def test_class_missing_from_the_words_file_is_named(bad_tree_run, tally):
    _nothing_lost(bad_tree_run)
    log = bad_tree_run["second"].stdout + bad_tree_run["second"].stderr
    words = bad_tree_run["tree"] / "words.txt"
    assert f"have no name in {words}; their wnid is used" in log and f"add them to {words}" in log
    assert bad_tree_run["after"]["n99999999/x.JPEG"]["class_name"] == "n99999999"
    tally.add("bad_inputs")


# --------------------------------------------------------------------------- configuration

@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """A small tree and its index output (4 records)."""
    base = tmp_path_factory.mktemp("indexed")
    tree, root = make_tree(base / "tree"), base / "out"
    root.mkdir()
    result = index(tree, root)
    assert result.returncode == 0, result.stderr[-3000:]
    return tree, root, read_all(root / INDEX_OUT)


@pytest.mark.parametrize("override, named", [
    ("stage.max_pixelz=5", "stage.max_pixelz"),            # an unknown key
    ("+data.colour=red", "data.colour"),                   # an unknown key added with +
    ("shard.count=0", "shard.count"),                      # a value out of range
    ("data.max_pixels=100", "data.max_pixels"),            # the output was made with another config
])
def test_config_error_is_one_line_naming_the_key_and_nothing_runs(indexed, override, named, tally):
    tree, root, before = indexed
    result = index(tree, root, override)
    assert result.returncode == 2
    line = one_line(result)
    assert named in line, line
    if override.startswith("data.max_pixels"):  # says what to do: the flag that starts afresh
        assert "overwrite_config" in line, line
    assert same_records(before, read_all(root / INDEX_OUT))
    tally.add("bad_inputs")


# --------------------------------------------------------------------------- weights

class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


WEIGHTS = {
    "missing": lambda p, m: None,
    "wrong_architecture": lambda p, m: torch.save({"model": {"backbone.conv.weight": torch.zeros(3, 3)}}, p),
    "truncated": lambda p, m: (torch.save({"model": {f"w{i}": torch.zeros(256) for i in range(16)}}, p),
                               p.write_bytes(p.read_bytes()[:1000])),
    "runs_code_pth": lambda p, m: torch.save({"model": {}, "x": _RunsCode(m)}, p),
    "runs_code_pkl": lambda p, m: p.write_bytes(pickle.dumps({"model": OrderedDict(), "x": _RunsCode(m)})),
}


@pytest.mark.parametrize("kind", list(WEIGHTS))
def test_bad_weight_file_is_one_line_naming_it_and_never_runs_code(uninterrupted, tmp_path, kind, tally):
    """Proposal learning initialised from ``model.weights`` (the tiny Mask2Former) on the
    demo's dense-CRF records."""
    weights = tmp_path / ("weights.pkl" if kind.endswith("pkl") else "weights.pth")
    marker = tmp_path / "code_ran"
    WEIGHTS[kind](weights, marker)
    records = uninterrupted.root / "pseudo_labels/part_labels/proposal_generation_dcrf/synthetic_train"
    before = read_all(records)
    result = run_entry("stage=proposal_learning", "experiment=demo", "model=mask2former_tiny",
                       f"paths.root={uninterrupted.root}",
                       f"stage.output={tmp_path}/run_out", f"hydra.run.dir={tmp_path}/run",
                       f"model.weights={weights}", cwd=tmp_path)
    assert result.returncode == (2 if kind == "missing" else 1), result.stderr[-3000:]
    line = one_line(result)
    assert str(weights) in line, line
    assert ("weights/README.md" in line) or ("Do not load it" in line), line  # what to do
    if kind.startswith("runs_code"):
        assert "may execute code" in line and not marker.exists()
    assert same_records(before, read_all(records))
    tally.add("bad_inputs")


# --------------------------------------------------------------------------- read-only output, full disk

@pytest.fixture()
def small_fs(tmp_path):
    """A 512 KiB tmpfs mounted at ``tmp_path/fs`` (None when this user may not mount)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_read_only_output_is_one_line_and_nothing_is_lost(tmp_path, small_fs, tally):
    tree = make_tree(tmp_path / "tree")
    if small_fs is None:  # not root: an output folder that is a file cannot be written either
        root = tmp_path / "a_file"
        root.write_text("x")
        result = index(tree, root)
        assert result.returncode == 2 and str(root) in one_line(result)
        tally.add("bad_inputs")
        return
    root = small_fs
    assert index(tree, root).returncode == 0
    before = read_all(root / INDEX_OUT)
    shutil.copy(next((tree / "train").glob("*/*.JPEG")), next((tree / "train").glob("*")) / "new.JPEG")
    subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)
    try:
        result = index(tree, root)
        assert result.returncode in (1, 2)
        line = one_line(result)
        assert str(root) in line and ("read-only" in line or "not writable" in line), line
        assert "stage.output" in line or "paths.root" in line, line  # what to do: write elsewhere
        assert same_records(before, read_all(root / INDEX_OUT))
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(root)], check=True)
    again = index(tree, root)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(read_all(root / INDEX_OUT)) == 5
    tally.add("bad_inputs")


def test_full_disk_ends_in_one_line_then_store_reopens_clean_and_rerun_completes(tmp_path, small_fs, tally):
    tree = make_tree(tmp_path / "tree")
    folder = next(p for p in (tree / "train").iterdir() if p.is_dir())
    image = next(folder.glob("*.JPEG"))
    if small_fs is None:  # not root: every write of the shard fails with ENOSPC
        root = tmp_path / "out"
        root.mkdir()
        assert index(tree, root).returncode == 0
        before = read_all(root / INDEX_OUT)
        shards = root / INDEX_OUT / "shards"
        saved = {p.name: p.read_bytes() for p in shards.iterdir()}
        for p in shards.iterdir():
            p.unlink()
        (shards / "00000-of-00001.rec").symlink_to("/dev/full")
        shutil.copy(image, folder / "new.JPEG")
        result = index(tree, root)
        assert result.returncode == 1 and "disk is full" in one_line(result)
        (shards / "00000-of-00001.rec").unlink()
        for name, data in saved.items():
            (shards / name).write_bytes(data)
        assert same_records(before, read_all(root / INDEX_OUT))
        assert index(tree, root).returncode == 0 and len(read_all(root / INDEX_OUT)) == 5
        tally.add("bad_inputs")
        return
    root = small_fs
    assert index(tree, root).returncode == 0
    before = read_all(root / INDEX_OUT)
    for i in range(60):  # 60 more records: ~20 KiB of shard
        shutil.copy(image, folder / f"more_{i:02d}.JPEG")
    stat = os.statvfs(root)
    filler = root / "filler"
    with open(filler, "wb") as f:  # leave one page free
        f.write(b"\0" * max(0, (stat.f_bavail - 1) * stat.f_frsize))
    result = index(tree, root)
    assert result.returncode == 1, result.stderr[-3000:]
    line = one_line(result)
    assert "disk is full" in line and "rerun" in line and str(root) in line, line
    after = read_all(root / INDEX_OUT)  # reopens clean: every frame intact (a torn tail is dropped)
    assert same_records(before, after) and 4 <= len(after) < 64
    filler.unlink()
    again = index(tree, root)
    assert again.returncode == 0, again.stderr[-3000:]
    final = read_all(root / INDEX_OUT)
    assert len(final) == 64 and same_records(after, final)
    tally.add("bad_inputs")
