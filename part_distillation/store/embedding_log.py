"""Append-only embedding files with a crash-recovery log (stage 5's cluster pass).

The cluster pass appends each image's embeddings to its object class's file; the log says
which keys are complete and how long each file was then, so a killed job resumes exactly.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from part_distillation.store.errors import ConfigMismatchError
from part_distillation.store.files import atomic_write_bytes


class EmbeddingFile:
    """Append-only float32 rows of width ``dim`` in one file (one object class).

    ``append`` writes and returns the file's byte length afterwards; ``truncate(length)``
    drops rows written after a committed length (resume after a kill); ``read()`` maps
    the rows copy-on-write (nothing is copied into memory unless written to).
    """

    def __init__(self, path: str | os.PathLike, dim: int):
        self.path = Path(path)
        self.dim = int(dim)
        self.row_bytes = 4 * self.dim

    def __len__(self) -> int:
        return self.path.stat().st_size // self.row_bytes if self.path.exists() else 0

    def append(self, rows) -> int:
        rows = rows.detach().cpu().numpy() if hasattr(rows, "detach") else np.asarray(rows)
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"{self.path}: rows must be (N, {self.dim}), got {rows.shape}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            f.write(rows.tobytes())
            f.flush()
            os.fsync(f.fileno())
            return f.tell()

    def truncate(self, length: int) -> None:
        if self.path.exists() and self.path.stat().st_size != length:
            with open(self.path, "r+b") as f:
                f.truncate(length)

    def read(self) -> np.ndarray:
        n = len(self)
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.memmap(self.path, dtype=np.float32, mode="c", shape=(n, self.dim))  # copy-on-write: no copy


class EmbeddingLog:
    """A job's embeddings per class, resumable after a kill: ``class_<c>.f32`` files
    (:class:`EmbeddingFile`) and ``progress.tsv``, one line per finished key with its class
    file's committed length; opening it keeps the complete lines and cuts every class file
    back to its committed length, so a kill loses at most the key being written.

    ``owner`` names what the embeddings came from (stage 5: the proposal checkpoint); a folder
    made by another owner is refused."""

    def __init__(self, folder: Path, owner: str | os.PathLike):
        owner = str(owner)
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        marker = folder / "checkpoint.txt"
        if marker.exists() and marker.read_text().strip() != owner:
            raise ConfigMismatchError(f"{folder} was made with checkpoint {marker.read_text().strip()}, this run "
                                      f"uses {owner}: delete {folder} (and the output) or set stage.checkpoint to it")
        if not marker.exists():
            atomic_write_bytes(marker, f"{owner}\n".encode())
        self.progress = folder / "progress.tsv"
        self.done: set[str] = set()
        self.lengths: dict[int, int] = {}
        self.dim: int | None = None
        self.recover()

    def recover(self) -> None:
        """Keep the complete log lines; cut every class file back to its committed length."""
        lines = []
        if self.progress.exists():
            for line in self.progress.read_text().splitlines(keepends=True):
                fields = line.rstrip("\n").split("\t")
                if not line.endswith("\n") or len(fields) != 4:
                    break
                key, cls, length, dim = fields[0], int(fields[1]), int(fields[2]), int(fields[3])
                self.done.add(key)
                self.lengths[cls] = length
                self.dim = dim or self.dim
                lines.append(line)
            atomic_write_bytes(self.progress, "".join(lines).encode())
        for path in self.folder.glob("class_*.f32"):
            cls = int(path.stem.split("_")[1])
            length = self.lengths.get(cls, 0)
            if path.stat().st_size != length:
                with open(path, "r+b") as f:
                    f.truncate(length)

    def file(self, cls: int, dim: int) -> EmbeddingFile:
        return EmbeddingFile(self.folder / f"class_{cls}.f32", dim)

    def add(self, key: str, cls: int, embeddings) -> None:
        """Append ``key``'s (N, D) embeddings (array or tensor) to class ``cls`` and log the key."""
        if len(embeddings):
            self.dim = int(embeddings.shape[1])
            length = self.file(cls, self.dim).append(embeddings)
        else:
            length = self.lengths.get(cls, 0)
        self.lengths[cls] = length
        with open(self.progress, "a") as f:
            f.write(f"{key}\t{cls}\t{length}\t{self.dim or 0}\n")
            f.flush()
            os.fsync(f.fileno())
        self.done.add(key)


__all__ = ["EmbeddingFile", "EmbeddingLog"]
