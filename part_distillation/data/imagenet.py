"""ImageNet-style image trees: one folder per class, named by WordNet id.

Two layouts are read:
- ImageNet-1k: ``root/<split>/nXXXXXXXX/*.JPEG`` (``root`` may also be the split folder);
- ImageNet-21k (extracted, no tars): flat class folders ``root/nXXXXXXXX/*.JPEG``.

Listing is deterministic (sorted, independent of filesystem order) and needs no cache:
``os.scandir`` lists ImageNet-1k (1.28 M files) in seconds. Each image gets a stable
``key``, its path relative to the split folder (``n01440764/n01440764_10026.JPEG``),
which is the same whichever of the accepted roots was given; stages use it as the
record id. Class indices follow the sorted wnids, as torchvision's ``ImageFolder`` and
the ImageNet-1k devkit do.

``shard`` splits a listing for parallel jobs, by class (every class wholly in one
shard, which the per-class stages need) or by image.
"""
from __future__ import annotations

import heapq
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Sequence

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

#: Extensions (lower case) of the files listed as images; others are ignored.
IMAGE_EXTENSIONS = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})

#: File names looked for, in this order, when no class-name file is given.
WORDS_FILE_NAMES = ("words.txt", "synsets.txt", "LOC_synset_mapping.txt", "synset_words.txt", "wnids.txt")

_SPLIT_NAMES = ("train", "val", "test")
_WNID = re.compile(r"^n\d{8}$")


@dataclass(frozen=True)
class ImageRecordRef:
    """One image of a tree: enough to find, label and identify it."""

    key: str          #: path relative to the split folder, '/'-separated: the stable id
    path: str         #: absolute path of the file
    wnid: str         #: class folder name (WordNet id)
    class_index: int  #: position of ``wnid`` in the tree's sorted class list


@dataclass(frozen=True)
class ImageTree:
    """A listed tree: its classes (sorted wnids and their names) and its images (sorted by key)."""

    root: Path                          #: the split folder that holds the class folders
    wnids: tuple[str, ...]
    names: tuple[str, ...]              #: readable name per wnid (the wnid when unknown)
    images: tuple[ImageRecordRef, ...]

    def __len__(self) -> int:
        return len(self.images)

    def class_name(self, wnid: str) -> str:
        return self.names[self.wnids.index(wnid)]

    def images_per_class(self) -> dict[str, int]:
        counts = dict.fromkeys(self.wnids, 0)
        for ref in self.images:
            counts[ref.wnid] += 1
        return counts


def list_image_tree(root: PathLike, split: str | None = "train", words_file: PathLike | None = None,
                    classes: Sequence[str] | None = None,
                    extensions: Iterable[str] = IMAGE_EXTENSIONS) -> ImageTree:
    """List the images of an ImageNet-1k or -21k style tree.

    ``split`` picks ``root/<split>`` when that folder exists, else ``root`` itself must
    hold the class folders (21k layout, or a split folder given directly); ``None``
    always uses ``root``. ``words_file`` names the classes (found next to the tree when
    not given, see ``find_words_file``). ``classes`` restricts the tree to these wnids,
    which must all exist. Files are matched by extension, case-insensitively; hidden
    files and sub-folders of class folders are ignored.
    """
    split_dir = resolve_split_dir(root, split)
    exts = frozenset(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    folders = _class_folders(split_dir)
    if classes is not None:
        wanted = list(dict.fromkeys(classes))
        missing = [c for c in wanted if c not in folders]
        if missing:
            raise FileNotFoundError(f"{len(missing)} requested classes have no folder in {split_dir}: "
                                    f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        folders = {c: folders[c] for c in wanted}
    wnids = tuple(sorted(folders))
    if not wnids:
        raise FileNotFoundError(f"no class folders in {split_dir}")

    images: list[ImageRecordRef] = []
    for index, wnid in enumerate(wnids):
        for name in _image_files(folders[wnid], exts):
            images.append(ImageRecordRef(key=f"{wnid}/{name}", path=os.path.join(folders[wnid], name),
                                         wnid=wnid, class_index=index))
    counts = dict.fromkeys(wnids, 0)
    for ref in images:
        counts[ref.wnid] += 1
    empty = [w for w, n in counts.items() if n == 0]
    if empty:
        logger.warning("%d class folders in %s hold no images (e.g. %s)", len(empty), split_dir, empty[0])

    if words_file is None:
        words_file = find_words_file(split_dir)
    known = read_class_names(words_file) if words_file is not None else {}
    unnamed = [w for w in wnids if w not in known]
    if unnamed:
        logger.warning("%d of %d classes have no name%s; their wnid is used (e.g. %s)", len(unnamed), len(wnids),
                       f" in {words_file}" if words_file else " (no words file found)", unnamed[0])
    names = tuple(known.get(w, w) for w in wnids)
    return ImageTree(root=split_dir, wnids=wnids, names=names, images=tuple(images))


def resolve_split_dir(root: PathLike, split: str | None = "train") -> Path:
    """The folder holding the class folders: ``root/<split>`` if it exists, else ``root``."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"image tree root {root} is not a folder")
    if split:
        candidate = root / split
        if candidate.is_dir():
            return candidate
        present = [s for s in _SPLIT_NAMES if (root / s).is_dir()]
        if present:
            raise FileNotFoundError(f"split {split!r} not found in {root} (it has {', '.join(present)})")
    return root


def read_class_names(path: PathLike) -> dict[str, str]:
    """Read ``wnid -> name`` from a words/synset file.

    Accepted lines: ``n01440764<TAB>tench, Tinca tinca`` (ImageNet ``words.txt``),
    ``n01440764 tench, Tinca tinca`` (``LOC_synset_mapping.txt``) or a bare wnid per
    line (the name is then the wnid). The name is the first synonym. Blank lines and
    lines starting with ``#`` are skipped.
    """
    names: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split("\t", 1) if "\t" in line else line.split(None, 1)
            wnid = parts[0].strip()
            synonyms = parts[1].strip() if len(parts) > 1 else ""
            name = synonyms.split(",")[0].strip() or wnid
            if wnid in names and names[wnid] != name:
                logger.warning("%s:%d: %s named again (%r, keeping %r)", path, number, wnid, name, names[wnid])
                continue
            names[wnid] = name
    return names


def find_words_file(split_dir: PathLike) -> Path | None:
    """A class-name file in the split folder or the two folders above it, if any."""
    folder = Path(split_dir)
    for candidate_dir in (folder, folder.parent, folder.parent.parent):
        for name in WORDS_FILE_NAMES:
            if (candidate_dir / name).is_file():
                return candidate_dir / name
    return None


def shard(items: Sequence[ImageRecordRef], index: int, count: int,
          by: Literal["class", "image"] = "class") -> list[ImageRecordRef]:
    """The ``index``-th of ``count`` disjoint shards covering ``items``, sorted by key.

    ``by="class"`` keeps every class in one shard and balances image counts: classes
    go, largest first (ties by wnid), to the shard with the fewest images so far (ties
    to the lowest index). ``by="image"`` deals the images sorted by key round-robin.
    Both depend only on the items' keys and wnids, never on their order or on the
    filesystem, so every job of an array computes the same split.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"shard count must be a positive integer, got {count!r}")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise ValueError(f"shard index must be an integer in [0, {count}), got {index!r}")
    ordered = sorted(items, key=lambda ref: ref.key)
    if by == "image":
        return ordered[index::count]
    if by != "class":
        raise ValueError(f"shard by must be 'class' or 'image', got {by!r}")
    owner = assign_classes_to_shards(_count_by_class(ordered), count)
    return [ref for ref in ordered if owner[ref.wnid] == index]


def assign_classes_to_shards(class_sizes: dict[str, int], count: int) -> dict[str, int]:
    """Map each class to a shard, balancing total size (greedy, largest class first)."""
    heap = [(0, s) for s in range(count)]  # (images so far, shard index): a valid heap as built
    owner: dict[str, int] = {}
    for wnid, size in sorted(class_sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        load, target = heapq.heappop(heap)
        owner[wnid] = target
        heapq.heappush(heap, (load + size, target))
    return owner


def _count_by_class(items: Iterable[ImageRecordRef]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ref in items:
        counts[ref.wnid] = counts.get(ref.wnid, 0) + 1
    return counts


def _class_folders(split_dir: Path) -> dict[str, str]:
    """Non-hidden sub-folders of the split folder; warns when names are not wnids."""
    folders = {}
    with os.scandir(split_dir) as entries:
        for entry in entries:
            if not entry.name.startswith(".") and entry.is_dir():
                folders[entry.name] = entry.path
    odd = sorted(n for n in folders if not _WNID.match(n))
    if odd:
        logger.warning("%d class folders of %s are not named like WordNet ids (e.g. %r)", len(odd), split_dir, odd[0])
    return folders


def _image_files(folder: str, extensions: frozenset[str]) -> list[str]:
    names = []
    with os.scandir(folder) as entries:
        for entry in entries:
            name = entry.name
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in extensions:
                continue
            if entry.is_file():
                names.append(name)
    names.sort()
    return names
