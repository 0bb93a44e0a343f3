"""Key tables: where each key of one shard file is, kept as arrays instead of strings.

A key table lists every frame of a shard file in file order as five arrays (25 bytes
per frame): the key's 64-bit hash (:func:`key_hash`), the frame offset, the payload
length, the record's class (an index into the table's class names; -1 for none) and
flags (skip marker, bad record). Readers build lookups, slices and duplicate checks
from it without parsing record values or holding key strings.

The writer saves the table next to its shard at close (``00003-of-00060.idx``). A
reader trusts a saved table only for the prefix of the shard it describes (same inode,
size not smaller, and the header of the last frame it lists unchanged on disk); frames
after that prefix are scanned and added, and a stale or damaged table is rebuilt from
the shard. Readers save a table they rebuilt when no writer holds the shard (failures
to save, e.g. a read-only folder, are ignored): the table is a cache, the shard the truth.

Within one shard file the newest frame of a key wins: ``ShardWriter.write(record,
replace=True)`` (or ``skip(..., replace=True)``) appends a frame that supersedes the
earlier one; :attr:`KeyTable.live` is False for superseded frames.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import zlib
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from part_distillation.store.files import atomic_write_bytes
from part_distillation.store.framing import (
    FRAME_HEADER, U32, FRAME_HEADER_SIZE, ShardScan, writer_active, decode_meta, pread_exact,
)

logger = logging.getLogger("part_distillation.store")

TABLE_MAGIC = b"PDI1"
TABLE_VERSION = 1
FLAG_SKIP = 1
FLAG_BAD = 2
NO_CLASS = -1
_ARRAYS = (("hashes", np.uint64), ("offsets", np.uint64), ("lengths", np.uint32),
           ("classes", np.int32), ("flags", np.uint8))


def key_hash(key: str) -> int:
    """The 64-bit hash of a key: the first 8 bytes of ``blake2b(key as UTF-8)``, little endian.

    Stable across processes and Python versions (unlike ``hash()``); slices by key use it.
    """
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "little")


def table_path(shard_path: Path) -> Path:
    return shard_path.with_suffix(".idx")


def frame_key(fd: int, offset: int) -> str:
    """The key of the frame at ``offset`` (reads its header and meta only)."""
    head = pread_exact(fd, FRAME_HEADER_SIZE + 4, offset)
    (n,) = U32.unpack_from(head, FRAME_HEADER_SIZE)
    meta = json.loads(pread_exact(fd, n, offset + FRAME_HEADER_SIZE + 4).decode())
    return meta["key"]


class TableBuilder:
    """Collects the frames of one shard file, in file order, into a :class:`KeyTable`."""

    def __init__(self, base: "KeyTable | None" = None):
        self.hashes, self.offsets = array("Q"), array("Q")
        self.lengths, self.classes, self.flags = array("I"), array("i"), array("B")
        self.class_names: list[str] = []
        self._class_ids: dict[str, int] = {}
        self.last_frame: tuple[int, bytes] | None = None
        if base is not None:
            for name, _ in _ARRAYS:
                getattr(self, name).frombytes(getattr(base, name).tobytes())
            self.class_names = list(base.class_names)
            self._class_ids = {c: i for i, c in enumerate(self.class_names)}
            self.last_frame = base.last_frame

    def add(self, key: str, offset: int, length: int, frame_header: bytes, *, skip: bool,
            class_name: str | None, bad: bool) -> None:
        self.hashes.append(key_hash(key))
        self.offsets.append(offset)
        self.lengths.append(length)
        if class_name is None:
            self.classes.append(NO_CLASS)
        else:
            cid = self._class_ids.get(class_name)
            if cid is None:
                cid = self._class_ids[class_name] = len(self.class_names)
                self.class_names.append(class_name)
            self.classes.append(cid)
        self.flags.append((FLAG_SKIP if skip else 0) | (FLAG_BAD if bad else 0))
        self.last_frame = (offset, bytes(frame_header))

    def add_frame(self, buf: bytes, pos: int, offset: int, length: int, header: bytes | None = None) -> dict:
        """Add the frame whose payload starts at ``buf[pos]`` (its frame header before it, or
        ``header``); returns its meta header."""
        meta, after = decode_meta(buf, pos)
        class_name, bad = meta.get("class"), "bad" in meta
        if "skip" not in meta and "class" not in meta:  # shards written before meta carried them
            (m,) = U32.unpack_from(buf, after)
            values = json.loads(buf[after + 4:after + 4 + m].decode())
            wnid = values.get("wnid")
            class_name = wnid if isinstance(wnid, str) else None
            bad = values.get("ok") is False
        header = buf[pos - FRAME_HEADER_SIZE:pos] if header is None else header
        self.add(meta["key"], offset, length, header, skip="skip" in meta,
                 class_name=class_name, bad=bad)
        return meta

    def table(self, path: Path, covered: int, inode: int) -> "KeyTable":
        arrays = {name: np.frombuffer(getattr(self, name), dtype=dt) if len(getattr(self, name))
                  else np.zeros(0, dt) for name, dt in _ARRAYS}
        return KeyTable(path=path, covered=covered, inode=inode, last_frame=self.last_frame,
                        class_names=list(self.class_names), **arrays)


@dataclass
class KeyTable:
    """The frames of one shard file (see the module docstring); arrays in file order."""

    path: Path
    covered: int
    inode: int
    last_frame: tuple[int, bytes] | None
    class_names: list[str]
    hashes: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    classes: np.ndarray
    flags: np.ndarray
    live: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.hashes)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, name).nbytes for name, _ in _ARRAYS)

    @property
    def is_record(self) -> np.ndarray:
        """Live frames that are records (not skip markers)."""
        return self.live & ((self.flags & FLAG_SKIP) == 0)

    def resolve_live(self, fd: int) -> None:
        """Mark frames superseded by a later frame of the same key (keys compared on hash ties)."""
        live = np.ones(len(self), dtype=bool)
        if len(self) > 1:
            order = np.argsort(self.hashes, kind="stable")
            sorted_h = self.hashes[order]
            tie = np.flatnonzero(sorted_h[1:] == sorted_h[:-1])
            if len(tie):
                groups: dict[int, list[int]] = {}
                for t in tie:
                    groups.setdefault(int(sorted_h[t]), []).extend((int(order[t]), int(order[t + 1])))
                for members in groups.values():
                    newest: dict[str, int] = {}
                    for i in sorted(set(members)):  # file order: later frames win
                        key = frame_key(fd, int(self.offsets[i]))
                        if key in newest:
                            live[newest[key]] = False
                        newest[key] = i
        self.live = live

    # -- the file next to the shard
    def to_bytes(self) -> bytes:
        body = b"".join(np.ascontiguousarray(getattr(self, name)).tobytes() for name, _ in _ARRAYS)
        header = {"version": TABLE_VERSION, "n": len(self), "covered": self.covered, "inode": self.inode,
                  "last_frame": None if self.last_frame is None
                  else [self.last_frame[0], self.last_frame[1].hex()],
                  "classes": self.class_names, "body_crc": zlib.crc32(body)}
        head = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
        pad = -(len(TABLE_MAGIC) + 4 + len(head)) % 8
        return b"".join((TABLE_MAGIC, U32.pack(len(head) + pad), head, b" " * pad, body))

    def save(self) -> None:
        atomic_write_bytes(table_path(self.path), self.to_bytes())

    @classmethod
    def from_bytes(cls, path: Path, data: bytes) -> "KeyTable | None":
        """The table in ``data``, or None if it is not a complete table of this version."""
        try:
            if data[:4] != TABLE_MAGIC:
                return None
            (n_head,) = U32.unpack_from(data, 4)
            header = json.loads(data[8:8 + n_head].decode())
            body = memoryview(data)[8 + n_head:]
            n = header["n"]
            if header["version"] != TABLE_VERSION or zlib.crc32(body) != header["body_crc"]:
                return None
            arrays, pos = {}, 0
            for name, dt in _ARRAYS:
                size = n * np.dtype(dt).itemsize
                arrays[name] = np.frombuffer(body[pos:pos + size], dtype=dt).copy()
                pos += size
            if pos != len(body):
                return None
            lf = header["last_frame"]
            return cls(path=path, covered=header["covered"], inode=header["inode"],
                       last_frame=None if lf is None else (lf[0], bytes.fromhex(lf[1])),
                       class_names=header["classes"], **arrays)
        except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError):
            return None

    def describes(self, fd: int, st: os.stat_result) -> bool:
        """Whether this table still describes a prefix of the open shard file."""
        if self.inode != st.st_ino or self.covered > st.st_size:
            return False
        if self.last_frame is None:
            return self.covered == 0
        offset, header = self.last_frame
        if pread_exact(fd, len(header), offset) != header:
            return False
        _, length, _ = FRAME_HEADER.unpack(header)
        return offset + FRAME_HEADER_SIZE + length == self.covered


def load_table(path: Path, *, on_corrupt: str = "raise", save: bool = True) -> KeyTable | None:
    """The key table of shard file ``path`` up to its current size (None if the file is absent).

    Uses the saved table for the prefix it describes and scans only the rest; saves the
    result when it changed, no writer holds the shard and no frame was corrupt.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        saved = None
        try:
            saved = KeyTable.from_bytes(path, table_path(path).read_bytes())
        except OSError:
            pass
        if saved is not None and not saved.describes(fd, st):
            logger.debug("%s: key table is stale, rebuilding it from the shard", path)
            saved = None
        if saved is not None and saved.covered == st.st_size:
            table = saved
        else:
            builder = TableBuilder(saved)
            scan = ShardScan(path, fd, st.st_size, on_corrupt=on_corrupt,
                              start=saved.covered if saved is not None else 0)
            for offset, buf, pos, length in scan:
                builder.add_frame(buf, pos, offset, length)
            table = builder.table(path, scan.valid_end, st.st_ino)
            if save and not scan.corrupt and not writer_active(fd):
                try:
                    table.save()
                except OSError as e:  # a read-only output: the table is only a cache
                    logger.debug("could not save the key table of %s: %s", path, e)
        table.resolve_live(fd)
        return table
    finally:
        os.close(fd)
