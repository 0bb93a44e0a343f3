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

Which wnids are classes comes from the class list, not from whatever is on disk: a
synset list (``LOC_synset_mapping.txt``, ``synset_words.txt``, ``wnids.txt``: one line
per class of the dataset) fixes the classes and their indices even when folders are
missing or extra; without one, the classes are the class folders, but a directory
symlink that points back into the tree, a folder name that is not valid UTF-8 and (when a
words file is present) a folder it does not name are skipped, logged and counted
(``ImageTree.skipped``), so they can never shift the indices of the real classes.

A crawled tree holds more than images. Entries with an image extension that cannot be
read as a file (a dangling symlink, a symlink loop, a FIFO or device, a directory named
``x.JPEG``, a name that is not valid UTF-8) never stop the listing: each becomes an
``ImageRecordRef`` with ``problem`` set (``ImageTree.rejected``) that the ``index`` stage
records as bad with that reason. A name that is not valid UTF-8 gets a key that is valid
text: its bytes with the undecodable ones written ``\\xNN`` (``printable_name``).

``shard`` splits a listing for parallel jobs, by class (every class wholly in one
shard, which the per-class stages need) or by image, by the one rule of ``store/sharding.py``.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Sequence

from part_distillation.store.sharding import shard_items

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

#: Extensions (lower case) of the files listed as images; others are ignored.
IMAGE_EXTENSIONS = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})

#: File names looked for, in this order, when no class-name file is given.
WORDS_FILE_NAMES = ("words.txt", "synsets.txt", "LOC_synset_mapping.txt", "synset_words.txt", "wnids.txt")

#: Of those, the files that list exactly the classes of one dataset (ImageNet-1k's
#: devkit files): their wnids are the classes. ``words.txt`` names all of WordNet.
CLASS_LIST_FILE_NAMES = frozenset({"LOC_synset_mapping.txt", "synset_words.txt", "wnids.txt"})

LAYOUTS = ("expected class folders named by WordNet id holding image files: ImageNet-1k "
           "<root>/train/nXXXXXXXX/*.JPEG (data=in1k, data.split=train) or ImageNet-21k "
           "<root>/nXXXXXXXX/*.JPEG (data=in22k, data.split=null)")


class ImageTreeError(FileNotFoundError):
    """The image tree is missing or has no usable layout; the message names the path."""

_SPLIT_NAMES = ("train", "val", "test")
_WNID = re.compile(r"^n\d{8}$")


@dataclass(frozen=True)
class ImageRecordRef:
    """One image of a tree: enough to find, label and identify it."""

    key: str          #: path relative to the split folder, '/'-separated: the stable id (valid text)
    path: str         #: absolute path of the file (for a ``problem`` entry: printable text)
    wnid: str         #: class folder name (WordNet id)
    class_index: int  #: position of ``wnid`` in the tree's sorted class list
    problem: str = ""  #: why this entry cannot be read as an image file ("" for a listed image)


@dataclass(frozen=True)
class ImageTree:
    """A listed tree: its classes (sorted wnids and their names) and its images (sorted by key)."""

    root: Path                          #: the split folder that holds the class folders
    wnids: tuple[str, ...]
    names: tuple[str, ...]              #: readable name per wnid (the wnid when unknown)
    images: tuple[ImageRecordRef, ...]
    #: entries with an image extension that are not readable files (``problem`` set), by key
    rejected: tuple[ImageRecordRef, ...] = ()
    #: (printable path, reason) of folders and links skipped while looking for classes
    skipped: tuple[tuple[str, str], ...] = ()

    def __len__(self) -> int:
        return len(self.images)

    def class_name(self, wnid: str) -> str:
        return self.names[self.wnids.index(wnid)]

    def images_per_class(self) -> dict[str, int]:
        counts = dict.fromkeys(self.wnids, 0)
        for ref in self.images:
            counts[ref.wnid] += 1
        return counts


@dataclass(frozen=True)
class ClassList:
    """A tree's classes without its images: what ``list_image_tree`` would index them as."""

    root: Path                          #: the split folder that holds the class folders
    wnids: tuple[str, ...]              #: sorted; position = the global class index
    names: tuple[str, ...]              #: readable name per wnid (the wnid when unknown)

    def __len__(self) -> int:
        return len(self.wnids)


def list_classes(root: PathLike, split: str | None = "train", words_file: PathLike | None = None,
                 classes: Sequence[str] | None = None) -> ClassList:
    """The classes of a tree, in the order (= class index) ``list_image_tree`` gives them,
    from the class list and one listing of the split folder: no class folder is opened, so
    it costs the same for ImageNet-21k's 14 M images as for a tiny tree."""
    split_dir, words_file, known = _split_and_words(root, split, words_file)
    wnids, _, _ = _classes(split_dir, words_file, known, classes)
    return ClassList(root=split_dir, wnids=wnids, names=tuple(known.get(w, w) for w in wnids))


def _split_and_words(root: PathLike, split: str | None, words_file: PathLike | None):
    split_dir = resolve_split_dir(root, split)
    if words_file is None:
        words_file = find_words_file(split_dir)
    elif not Path(words_file).is_file():
        raise ImageTreeError(f"class-name file {words_file} (data.words_file) does not exist; set "
                             f"data.words_file=null to look for words.txt or LOC_synset_mapping.txt next to the tree")
    known = read_class_names(words_file) if words_file is not None else {}
    return split_dir, words_file, known


def _classes(split_dir: Path, words_file: PathLike | None, known: dict[str, str],
             classes: Sequence[str] | None) -> tuple[tuple[str, ...], dict[str, str], list[tuple[str, str]]]:
    """(sorted class wnids, class folders by name, skipped folders) of a split folder (see the module notes)."""
    skipped: list[tuple[str, str]] = []
    folders = _class_folders(split_dir, skipped)
    if classes is not None:
        wanted = list(dict.fromkeys(classes))
        missing = [c for c in wanted if c not in folders]
        if missing:
            raise ImageTreeError(f"{len(missing)} requested classes have no folder in {split_dir}: "
                                 f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        wnids = tuple(sorted(wanted))
    elif words_file is not None and Path(words_file).name in CLASS_LIST_FILE_NAMES:
        wnids = tuple(sorted(known))
        absent = [w for w in wnids if w not in folders]
        if absent:
            logger.warning("%d of the %d classes listed in %s have no folder in %s (e.g. %s); their indices "
                           "are kept", len(absent), len(wnids), words_file, split_dir, absent[0])
    elif known:
        wnids = tuple(sorted(w for w in folders if w in known or _WNID.match(w)))
    else:
        wnids = tuple(sorted(folders))
    for name in sorted(set(folders) - set(wnids)):
        skipped.append((folders[name], f"folder {name!r} is not a class of "
                                       f"{words_file if words_file is not None else 'the class list'}"))
    for path, reason in skipped:
        logger.warning("skipped while listing classes: %s: %s", path, reason)
    return wnids, folders, skipped


def list_image_tree(root: PathLike, split: str | None = "train", words_file: PathLike | None = None,
                    classes: Sequence[str] | None = None,
                    extensions: Iterable[str] = IMAGE_EXTENSIONS) -> ImageTree:
    """List the images of an ImageNet-1k or -21k style tree.

    ``split`` picks ``root/<split>`` when that folder exists, else ``root`` itself must
    hold the class folders (21k layout, or a split folder given directly); ``None``
    always uses ``root``. ``words_file`` names the classes (found next to the tree when
    not given, see ``find_words_file``); a synset list fixes the classes themselves (see
    the module notes). ``classes`` restricts the tree to these wnids, which must all
    exist. Files are matched by extension, case-insensitively; hidden files and
    sub-folders of class folders are ignored. Raises ``ImageTreeError`` naming the path
    and the layout expected when the tree holds no images. ``list_classes`` gives the
    classes alone, without listing the images.
    """
    split_dir, words_file, known = _split_and_words(root, split, words_file)
    exts = frozenset(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    wnids, folders, skipped = _classes(split_dir, words_file, known, classes)

    images: list[ImageRecordRef] = []
    rejected: list[ImageRecordRef] = []
    for index, wnid in enumerate(wnids):
        if wnid not in folders:
            continue
        for name, problem in _image_files(folders[wnid], exts, skipped):
            if problem:
                shown = printable_name(name)
                ref = ImageRecordRef(key=f"{wnid}/{shown}", path=os.path.join(folders[wnid], shown),
                                     wnid=wnid, class_index=index, problem=problem)
                logger.warning("not an image file: %s: %s", ref.path, problem)
                rejected.append(ref)
            else:
                images.append(ImageRecordRef(key=f"{wnid}/{name}", path=os.path.join(folders[wnid], name),
                                             wnid=wnid, class_index=index))
    if not images and not rejected:
        raise ImageTreeError(f"no images found in {split_dir}: {LAYOUTS}")
    counts = dict.fromkeys(wnids, 0)
    for ref in images:
        counts[ref.wnid] += 1
    empty = [w for w, n in counts.items() if n == 0]
    if empty:
        logger.warning("%d class folders in %s hold no images (e.g. %s): their classes keep their index but get "
                       "no records; add images or remove the folders", len(empty), split_dir, empty[0])
    unnamed = [w for w in wnids if w not in known]
    if unnamed:
        logger.warning("%d of %d classes have no name%s; their wnid is used (e.g. %s): add them to %s to name "
                       "them", len(unnamed), len(wnids), f" in {words_file}" if words_file else " (no words file found)",
                       unnamed[0], words_file if words_file else "a words.txt next to the class folders")
    names = tuple(known.get(w, w) for w in wnids)
    return ImageTree(root=split_dir, wnids=wnids, names=names, images=tuple(images),
                     rejected=tuple(rejected), skipped=tuple(skipped))


def check_image_tree(root: PathLike, split: str | None = "train", words_file: PathLike | None = None,
                     extensions: Iterable[str] = IMAGE_EXTENSIONS) -> Path:
    """Check cheaply, before any job starts, that ``root`` holds an image tree; return its split folder.

    Looks only until it finds one image (a full listing of ImageNet-21k takes minutes).
    Raises ``ImageTreeError`` naming the path and the layout expected.
    """
    split_dir = resolve_split_dir(root, split)
    if words_file is not None and not Path(words_file).is_file():
        raise ImageTreeError(f"class-name file {words_file} (data.words_file) does not exist; set "
                             f"data.words_file=null to look for words.txt or LOC_synset_mapping.txt next to the tree")
    exts = frozenset(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    for folder in sorted(_class_folders(split_dir, []).values()):
        try:
            with os.scandir(folder) as entries:
                if any(os.path.splitext(e.name)[1].lower() in exts and not e.name.startswith(".") for e in entries):
                    return split_dir
        except OSError:
            continue
    raise ImageTreeError(f"no images found in {split_dir}: {LAYOUTS}")


def printable_name(name: str) -> str:
    """``name`` as valid text: undecodable bytes of a file name (surrogate escapes) as ``\\xNN``."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")


def resolve_split_dir(root: PathLike, split: str | None = "train") -> Path:
    """The folder holding the class folders: ``root/<split>`` if it exists, else ``root``."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise ImageTreeError(f"image tree root {root} (data.root) "
                             f"{'is not a folder' if root.exists() else 'does not exist'}: {LAYOUTS}")
    present = [s for s in _SPLIT_NAMES if (root / s).is_dir()]
    if split:
        candidate = root / split
        if candidate.is_dir():
            return candidate
        if present:
            raise ImageTreeError(f"split {split!r} not found in {root} (it has {', '.join(present)})")
    elif present and not any(_WNID.match(n) for n in os.listdir(root)):
        raise ImageTreeError(f"{root} looks like an ImageNet-1k tree (it has {', '.join(present)}/) but "
                             f"data.split is null: set data.split={present[0]} (data=in1k), or point data.root "
                             f"at a folder of class folders nXXXXXXXX/")
    return root


def read_class_names(path: PathLike) -> dict[str, str]:
    """Read ``wnid -> name`` from a words/synset file.

    Accepted lines: ``n01440764<TAB>tench, Tinca tinca`` (ImageNet ``words.txt``),
    ``n01440764 tench, Tinca tinca`` (``LOC_synset_mapping.txt``) or a bare wnid per
    line (the name is then the wnid). The name is the first synonym. Blank lines and
    lines starting with ``#`` are skipped.
    """
    names: dict[str, str] = {}
    for number, line in enumerate(_read_text(path).splitlines(), 1):
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


def _read_text(path: PathLike) -> str:
    """A words file's text: UTF-8 (a byte-order mark is dropped), else Latin-1 with a warning."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        logger.warning("%s is not UTF-8 (byte %d); reading it as Latin-1", path, exc.start)
        return data.decode("latin-1")


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
    """The ``index``-th of ``count`` disjoint shards covering ``items``, sorted by key, by the
    one sharding rule (``store/sharding.py``): ``by="class"`` keeps every class in one shard
    and balances image counts, ``by="image"`` goes by key hash. Both depend only on the items'
    keys and wnids, never on their order or on the filesystem, so every job of an array
    computes the same split."""
    ordered = sorted(items, key=lambda ref: ref.key)
    return shard_items(ordered, index, count, by, key=lambda ref: ref.key, cls=lambda ref: ref.wnid)


def _class_folders(split_dir: Path, skipped: list[tuple[str, str]]) -> dict[str, str]:
    """Non-hidden sub-folders of the split folder that can be classes; others go to ``skipped``.

    A directory symlink is followed unless it points back into the tree (it would
    duplicate a class or add an empty one); a loop or a dangling link is skipped.
    """
    folders = {}
    inside = os.path.realpath(split_dir)
    with os.scandir(split_dir) as entries:
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            if printable_name(name) != name:
                skipped.append((os.path.join(split_dir, printable_name(name)), "folder name is not valid UTF-8"))
                continue
            if entry.is_symlink():
                problem = _stat_problem(entry.path, want_dir=True)
                if problem is None:
                    target = os.path.realpath(entry.path)
                    if target == inside or target.startswith(inside + os.sep):
                        problem = f"symbolic link into the tree itself (to {target})"
                if problem:
                    if problem != "not a folder":
                        skipped.append((entry.path, problem))
                    continue
            elif not entry.is_dir(follow_symlinks=False):
                continue
            folders[name] = entry.path
    odd = sorted(n for n in folders if not _WNID.match(n))
    if odd:
        logger.warning("%d class folders of %s are not named like WordNet ids (e.g. %r)", len(odd), split_dir, odd[0])
    return folders


def _stat_problem(path: str, want_dir: bool = False) -> str | None:
    """Why ``path`` (following links) is not a regular file (or a folder), or None."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        try:
            return f"dangling symbolic link (to {os.readlink(path)})"
        except OSError:
            return "vanished while listing"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
        return f"cannot stat: {exc.strerror or exc}"
    if want_dir:
        return None if stat.S_ISDIR(mode) else "not a folder"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory, not an image file"
    kind = ("FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode)
            else "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special file")
    return f"not a regular file ({kind})"


def _image_files(folder: str, extensions: frozenset[str],
                 skipped: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(name, problem) of the entries of ``folder`` with an image extension, sorted by printable name.

    ``problem`` is "" for a regular file. A folder that cannot be read is logged and
    recorded in ``skipped``, not raised.
    """
    found = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith(".") or os.path.splitext(name)[1].lower() not in extensions:
                    continue
                if not entry.is_symlink() and entry.is_file(follow_symlinks=False):
                    problem = ""  # the common case: no extra system call
                else:
                    problem = _stat_problem(entry.path) or ""
                if not problem and printable_name(name) != name:
                    problem = f"file name is not valid UTF-8 ({os.fsencode(name)!r})"
                found.append((name, problem))
    except OSError as exc:
        skipped.append((folder, f"cannot list the folder: {exc.strerror or exc}"))
        logger.warning("cannot list %s: %s", folder, exc.strerror or exc)
    found.sort(key=lambda item: printable_name(item[0]))
    return found
