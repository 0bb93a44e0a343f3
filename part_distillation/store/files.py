"""File names of a stage output and writes that readers never see half done.

Every file is created with mode ``0o666`` filtered by the process umask (as ``open``
does), never ``tempfile.mkstemp``'s 0600: teammates sharing an output folder on a
cluster can read what a job wrote.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
from pathlib import Path
from typing import IO, Any, Iterator

#: Shard files: ``00003-of-00060.rec`` (rank 0) and ``00003-of-00060.r01.rec`` (rank 1 of a
#: multi-process job); summaries and key tables share the stem.
SHARD_RE = re.compile(r"^(\d{5})-of-(\d{5})(?:\.r(\d{2,}))?\.rec$")
_tmp_counter = itertools.count()


def shard_name(index: int, num_shards: int, rank: int = 0) -> str:
    """File stem of one shard file: rank 0 keeps the plain name, rank r adds ``.rNN``."""
    stem = f"{index:05d}-of-{num_shards:05d}"
    return stem if rank == 0 else f"{stem}.r{rank:02d}"


def manifest_path(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "manifest.json"


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def create_tmp(path: Path) -> tuple[int, Path]:
    """A new, exclusive temporary file next to ``path`` (mode 0o666 & ~umask): ``(fd, tmp path)``."""
    while True:
        tmp = path.parent / f".{path.name}.{os.getpid()}.{next(_tmp_counter)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def write_tmp(path: Path, data: bytes) -> Path:
    """``data`` in a complete, fsynced temporary file next to ``path``; the caller renames it."""
    fd, tmp = create_tmp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """A file whose content replaces ``path`` when the block completes, never in part.

    Written to a temporary file of its own next to ``path`` (unique per process and call,
    so concurrent writers of the same file never write into one another's), fsynced, then
    ``os.replace``-d: readers, and the last of several writers, see one complete file. On an
    error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    fd, tmp = create_tmp(path)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Readers see the old file or the new one, never a part (:func:`atomic_open`)."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON so readers see the old file or the new one, never a part (tmp + os.replace)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode())
