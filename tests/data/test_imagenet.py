"""ImageNet-style trees: both layouts, class names, and deterministic sharding."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

from part_distillation.data.imagenet import (ImageRecordRef, ImageTreeError, check_image_tree, list_image_tree,
                                             read_class_names, resolve_split_dir, shard)
from part_distillation.store.sharding import assign_classes_to_shards, key_shard

# class -> number of images (uneven on purpose)
CLASSES = {"n01440764": 5, "n01443537": 3, "n01484850": 1, "n01491361": 4, "n01494475": 2}
NAMES = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark",
         "n01491361": "tiger shark", "n01494475": "hammerhead"}


def _make_tree(split_dir):
    """Class folders with images (mixed-case extensions) and junk that must be ignored."""
    for wnid, count in CLASSES.items():
        folder = split_dir / wnid
        folder.mkdir(parents=True)
        for k in range(count):
            ext = [".JPEG", ".jpg", ".png", ".Jpeg"][k % 4]
            (folder / f"{wnid}_{k:04d}{ext}").write_bytes(b"x")  # listing never decodes
        (folder / "notes.txt").write_text("not an image")
        (folder / ".hidden.JPEG").write_bytes(b"x")
        (folder / "._appledouble.JPEG").write_bytes(b"x")
        (folder / "sub").mkdir()
        (folder / "sub" / "nested.JPEG").write_bytes(b"x")
    (split_dir / ".cache").mkdir()
    (split_dir / "README.txt").write_text("top-level file, not a class")


def _words(path, tab=True, extra=True):
    """A words file; ``extra`` adds a wnid with no folder (words.txt names all of WordNet)."""
    sep = "\t" if tab else " "
    path.write_text("".join(f"{w}{sep}{n}, other synonym\n" for w, n in NAMES.items())
                    + ("n99999999\tunused\n" if extra else ""))
    return path


def test_imagenet_1k_layout(tmp_path):
    _make_tree(tmp_path / "train")
    (tmp_path / "val").mkdir()
    _words(tmp_path / "LOC_synset_mapping.txt", tab=False, extra=False)
    tree = list_image_tree(tmp_path, split="train")
    assert tree.root == (tmp_path / "train").resolve()
    assert tree.wnids == tuple(sorted(CLASSES))
    assert tree.names == tuple(NAMES[w] for w in sorted(CLASSES))
    assert len(tree) == sum(CLASSES.values())
    assert tree.images_per_class() == CLASSES
    keys = [ref.key for ref in tree.images]
    assert keys == sorted(keys)
    first = tree.images[0]
    assert first == ImageRecordRef(key="n01440764/n01440764_0000.JPEG",
                                   path=str((tmp_path / "train" / "n01440764" / "n01440764_0000.JPEG").resolve()),
                                   wnid="n01440764", class_index=0)
    assert all(tree.wnids[ref.class_index] == ref.wnid for ref in tree.images)
    assert not any("nested" in k or "hidden" in k or "apple" in k or k.endswith(".txt") for k in keys)
    assert tree.class_name("n01484850") == "great white shark"


def test_split_folder_given_directly_has_the_same_keys(tmp_path):
    _make_tree(tmp_path / "train")
    _words(tmp_path / "words.txt")
    from_root = list_image_tree(tmp_path, split="train")
    from_split = list_image_tree(tmp_path / "train", split="train")
    assert from_split == from_root


def test_imagenet_21k_flat_layout(tmp_path):
    _make_tree(tmp_path)
    words = _words(tmp_path / "elsewhere.txt")
    tree = list_image_tree(tmp_path, split="train", words_file=words)
    assert tree.root == tmp_path.resolve()
    assert tree.wnids == tuple(sorted(CLASSES))
    assert tree.names[0] == "tench"
    assert len(tree) == sum(CLASSES.values())


def test_missing_split_among_others_is_an_error(tmp_path):
    (tmp_path / "train" / "n01440764").mkdir(parents=True)
    (tmp_path / "val").mkdir()
    with pytest.raises(FileNotFoundError, match="split 'test' not found"):
        resolve_split_dir(tmp_path, "test")


def test_unknown_names_fall_back_to_wnid_with_a_warning(tmp_path, caplog):
    _make_tree(tmp_path / "train")
    with caplog.at_level(logging.WARNING):
        tree = list_image_tree(tmp_path)
    assert tree.names == tree.wnids
    assert "no name" in caplog.text


def test_class_subset(tmp_path):
    _make_tree(tmp_path / "train")
    tree = list_image_tree(tmp_path, classes=["n01491361", "n01440764"])
    assert tree.wnids == ("n01440764", "n01491361")
    assert {ref.class_index for ref in tree.images} == {0, 1}
    with pytest.raises(FileNotFoundError, match="n00000000"):
        list_image_tree(tmp_path, classes=["n00000000"])


def test_read_class_names_formats(tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("# comment\n\nn01440764\ttench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n"
                     "n02084071\n n02085620\tChihuahua\n")
    assert read_class_names(words) == {"n01440764": "tench", "n01443537": "goldfish", "n02084071": "n02084071",
                                       "n02085620": "Chihuahua"}


# ----------------------------------------------------------------------------- sharding

def _refs(sizes: dict[str, int]) -> list[ImageRecordRef]:
    wnids = sorted(sizes)
    return [ImageRecordRef(f"{w}/{w}_{k:04d}.JPEG", f"/d/{w}/{k}", w, wnids.index(w))
            for w in wnids for k in range(sizes[w])]


@pytest.mark.parametrize("by", ["class", "image"])
@pytest.mark.parametrize("count", [1, 3, 7, 40])
def test_shards_are_disjoint_covering_and_order_independent(by, count):
    sizes = {f"n{10000000 + 37 * k:08d}": 1 + (k * 7919) % 23 for k in range(30)}
    refs = _refs(sizes)
    shards = [shard(refs, i, count, by=by) for i in range(count)]
    keys = [ref.key for s in shards for ref in s]
    assert sorted(keys) == sorted(ref.key for ref in refs)          # covering
    assert len(keys) == len(set(keys))                              # disjoint
    assert all([r.key for r in s] == sorted(r.key for r in s) for s in shards)
    shuffled = list(reversed(refs[::2])) + refs[1::2]
    assert [shard(shuffled, i, count, by=by) for i in range(count)] == shards  # input order does not matter


def test_by_class_keeps_each_class_in_one_shard_and_balances():
    sizes = {f"n{20000000 + k:08d}": 10 + (k * 37) % 50 for k in range(100)}
    refs = _refs(sizes)
    shards = [shard(refs, i, 8, by="class") for i in range(8)]
    owner = {}
    for index, s in enumerate(shards):
        for ref in s:
            assert owner.setdefault(ref.wnid, index) == index
    loads = [len(s) for s in shards]
    assert max(loads) - min(loads) <= max(sizes.values())  # greedy bound
    assert max(loads) < 1.05 * sum(loads) / 8


def test_by_image_goes_by_key_hash_whatever_else_is_listed():
    refs = _refs({"n00000002": 3, "n00000001": 40})
    for i in range(3):
        assert all(key_shard(r.key, 3) == i for r in shard(refs, i, 3, by="image"))
    # an image keeps its shard when the tree gains images (a resumed run keeps its work)
    grown = _refs({"n00000002": 9, "n00000001": 40})
    assert set(r.key for r in shard(refs, 1, 3, by="image")) <= set(r.key for r in shard(grown, 1, 3, by="image"))


def test_more_shards_than_classes_leaves_some_empty():
    refs = _refs({"n00000001": 2, "n00000002": 5})
    shards = [shard(refs, i, 4) for i in range(4)]
    assert sorted(len(s) for s in shards) == [0, 0, 2, 5]


def test_assignment_is_stable():
    assert assign_classes_to_shards({"a": 5, "b": 5, "c": 1, "d": 9}, 2) == {"d": 0, "a": 1, "b": 1, "c": 0}


@pytest.mark.parametrize("index,count", [(-1, 3), (3, 3), (0, 0), (1.0, 3), (True, 3), (0, "2")])
def test_bad_shard_arguments(index, count):
    with pytest.raises(ValueError, match="shard"):
        shard(_refs({"n00000001": 2}), index, count)


def test_bad_shard_mode():
    with pytest.raises(ValueError, match="'class' or 'image'"):
        shard(_refs({"n00000001": 2}), 0, 2, by="wnid")


# ------------------------------------------------------------------ what a crawled tree holds

def _crawl_junk(folder):
    """Entries with an image extension that are not readable image files."""
    (folder / "loop.JPEG").symlink_to("loop.JPEG")
    (folder / "gone.JPEG").symlink_to("missing.JPEG")
    os.mkfifo(folder / "pipe.JPEG")
    (folder / "dir.JPEG").mkdir()
    non_utf8 = os.path.join(os.fsencode(folder), b"caf\xe9.JPEG")
    with open(non_utf8, "wb") as f:
        f.write(b"x")


def test_crawl_junk_is_rejected_with_reasons_and_never_stops_the_listing(tmp_path, caplog):
    _make_tree(tmp_path / "train")
    first = tmp_path / "train" / "n01440764"
    _crawl_junk(first)
    with caplog.at_level(logging.WARNING):
        tree = list_image_tree(tmp_path, split="train")
    assert len(tree) == sum(CLASSES.values())  # the images are untouched
    reasons = {ref.key: ref.problem for ref in tree.rejected}
    assert reasons.keys() == {"n01440764/loop.JPEG", "n01440764/gone.JPEG", "n01440764/pipe.JPEG",
                              "n01440764/dir.JPEG", "n01440764/caf\\xe9.JPEG"}
    assert "loop" in reasons["n01440764/loop.JPEG"]
    assert "dangling" in reasons["n01440764/gone.JPEG"] and "missing.JPEG" in reasons["n01440764/gone.JPEG"]
    assert "FIFO" in reasons["n01440764/pipe.JPEG"]
    assert "directory" in reasons["n01440764/dir.JPEG"]
    assert "UTF-8" in reasons["n01440764/caf\\xe9.JPEG"]
    for ref in tree.rejected:
        ref.key.encode("utf-8"), ref.path.encode("utf-8")  # valid text: a record store can write them
        assert ref.class_index == 0 and ref.path in caplog.text
    assert all(not ref.problem for ref in tree.images)


def test_directory_symlinks_into_the_tree_do_not_shift_class_indices(tmp_path, caplog):
    _make_tree(tmp_path / "train")
    expected = list_image_tree(tmp_path, split="train")
    split = tmp_path / "train"
    (split / "n00000001").symlink_to(split / "n01443537")        # would duplicate a class, first in order
    (split / "n01440765").symlink_to(split / "n01440764" / "sub")  # would add an empty class
    (split / "n01440766").symlink_to(split / "n01440766")          # a loop
    (split / "n01440767").symlink_to(tmp_path / "nowhere")         # dangling
    with caplog.at_level(logging.WARNING):
        tree = list_image_tree(tmp_path, split="train")
    assert (tree.wnids, tree.images) == (expected.wnids, expected.images)
    skipped = dict(tree.skipped)
    assert {Path(p).name for p in skipped} == {"n00000001", "n01440765", "n01440766", "n01440767"}
    assert "into the tree" in skipped[str(split / "n00000001")]
    assert "loop" in skipped[str(split / "n01440766")]
    assert "dangling" in skipped[str(split / "n01440767")]
    assert "n00000001" in caplog.text


def test_a_class_folder_linked_from_outside_the_tree_is_a_class(tmp_path):
    _make_tree(tmp_path / "train")
    elsewhere = tmp_path / "elsewhere" / "n09999999"
    elsewhere.mkdir(parents=True)
    (elsewhere / "a.JPEG").write_bytes(b"x")
    (tmp_path / "train" / "n09999999").symlink_to(elsewhere)
    tree = list_image_tree(tmp_path, split="train")
    assert tree.wnids[-1] == "n09999999" and tree.images_per_class()["n09999999"] == 1


def test_a_synset_list_fixes_the_classes_whatever_is_on_disk(tmp_path):
    _make_tree(tmp_path / "train")
    _words(tmp_path / "LOC_synset_mapping.txt", tab=False, extra=False)
    full = list_image_tree(tmp_path, split="train")
    shutil.rmtree(tmp_path / "train" / "n01443537")         # a class missing on disk
    (tmp_path / "train" / "n01440000").mkdir()               # a folder the list does not name
    (tmp_path / "train" / "n01440000" / "x.JPEG").write_bytes(b"x")
    tree = list_image_tree(tmp_path, split="train")
    assert tree.wnids == full.wnids
    assert {ref.key: ref.class_index for ref in tree.images} == \
        {ref.key: ref.class_index for ref in full.images if ref.wnid != "n01443537"}
    assert any(Path(p).name == "n01440000" for p, _ in tree.skipped)


@pytest.mark.parametrize("encoding", ["latin-1", "utf-8-sig"])
def test_words_file_in_latin1_or_with_a_bom(tmp_path, encoding):
    words = tmp_path / "words.txt"
    words.write_bytes("n01440764\tcrème brûlée, dessert\nn01443537\tgoldfish\n".encode(encoding))
    assert read_class_names(words) == {"n01440764": "crème brûlée", "n01443537": "goldfish"}


def test_loc_synset_mapping_is_found_when_there_is_no_words_txt(tmp_path):
    _make_tree(tmp_path / "train")
    _words(tmp_path / "LOC_synset_mapping.txt", tab=False, extra=False)
    assert list_image_tree(tmp_path, split="train").names == tuple(NAMES[w] for w in sorted(CLASSES))


def test_a_missing_words_file_that_was_asked_for_is_an_error(tmp_path):
    _make_tree(tmp_path / "train")
    with pytest.raises(ImageTreeError, match="nope.txt"):
        list_image_tree(tmp_path, split="train", words_file=tmp_path / "nope.txt")


def test_split_null_on_an_imagenet_1k_tree_is_an_error_naming_the_setting(tmp_path):
    _make_tree(tmp_path / "train")
    (tmp_path / "val").mkdir()
    with pytest.raises(ImageTreeError) as err:
        list_image_tree(tmp_path, split=None)
    assert str(tmp_path) in str(err.value) and "data.split=train" in str(err.value)
    with pytest.raises(ImageTreeError):
        check_image_tree(tmp_path, split=None)


@pytest.mark.parametrize("make", ["nothing", "empty_classes", "missing"])
def test_a_tree_without_images_is_an_error_naming_the_path_and_layout(tmp_path, make):
    root = tmp_path / "tree"
    if make != "missing":
        root.mkdir()
    if make == "empty_classes":
        (root / "n01440764").mkdir()
        (root / "n01440764" / "notes.txt").write_text("x")
    for call in (list_image_tree, check_image_tree):
        with pytest.raises(ImageTreeError) as err:
            call(root, split=None)
        assert str(root) in str(err.value) and "nXXXXXXXX" in str(err.value)


def test_check_image_tree_accepts_a_tree_with_images(tmp_path):
    _make_tree(tmp_path / "train")
    assert check_image_tree(tmp_path, split="train") == (tmp_path / "train").resolve()


@pytest.mark.parametrize("words", [None, "words.txt", "LOC_synset_mapping.txt"])
def test_list_classes_gives_the_tree_listing_classes_without_opening_a_class_folder(tmp_path, monkeypatch, words):
    """Same wnids (= class indices) and names as ``list_image_tree`` (a synset list keeps a class
    with no folder; words.txt drops a folder it does not name), from one listing of the split
    folder: scanning any class folder would fail here."""
    from part_distillation.data import imagenet
    from part_distillation.data.imagenet import list_classes

    _make_tree(tmp_path / "train")
    (tmp_path / "train" / "n00000001").mkdir()  # an extra class folder
    (tmp_path / "train" / "n00000001" / "a.JPEG").write_bytes(b"x")
    if words == "words.txt":
        _words(tmp_path / words)
        (tmp_path / "train" / "not_a_class").mkdir()
    elif words:
        _words(tmp_path / words, tab=False, extra=True)  # n99999999 listed without a folder
    tree = list_image_tree(tmp_path, split="train")
    split_dir = tmp_path / "train"
    real_scandir = os.scandir
    scanned = []

    def scandir(path="."):
        scanned.append(Path(path))
        if Path(path) != split_dir:
            raise AssertionError(f"list_classes opened {path}")
        return real_scandir(path)

    monkeypatch.setattr(imagenet.os, "scandir", scandir)
    classes = list_classes(tmp_path, split="train")
    assert classes.wnids == tree.wnids and classes.names == tree.names and len(classes) == len(tree.wnids)
    assert scanned == [split_dir] and classes.root == split_dir
    expected = {None: sorted(CLASSES) + ["n00000001"], "words.txt": sorted(CLASSES) + ["n00000001"],
                "LOC_synset_mapping.txt": sorted(CLASSES) + ["n99999999"]}[words]
    assert list(classes.wnids) == sorted(expected)
