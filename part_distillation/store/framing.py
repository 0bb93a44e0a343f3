"""Shard file framing: how records become bytes, and how a damaged file is read back.

Shard file format (little endian, no pickle anywhere)
    The file is a sequence of frames ``[magic "PDR1"][u64 payload length]
    [u32 crc32 of payload][payload]``. A payload is
    ``[u32 n][meta JSON][u32 m][values JSON][zero padding to 8][array bytes]``:
    the small *meta* header holds the key, an optional skip reason, the record's class
    (``class``: its ``wnid`` field), ``bad`` (its ``reason`` when its ``ok`` field is
    false) and one entry per array ``[path, kind, dtype, shape, offset, nbytes]``;
    *values* holds the record's other fields with ``null`` where an array goes. Keeping
    the key in its own small header lets resume, ``keys()``, slices and the key table
    skip parsing the values.

Crash safety
    Each record is written with one ``writev`` straight to the kernel (no user-space
    buffer), so a killed process leaves at most one torn frame at the end of the file.
    A reader stops at a torn or CRC-failing *last* frame (a warning names the file and
    byte offset; only DEBUG while a writer holds the shard, where it is a record being
    written); a writer reopening the shard truncates it there. A bad frame followed by
    an intact one is corruption in the middle (found by scanning for the next valid
    frame, which also catches a damaged length field): it raises
    :class:`CorruptShardError`, or with ``on_corrupt="skip"`` is skipped with a warning;
    nothing is truncated then, and :func:`repair_shard` rewrites the shard without it.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import struct
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from part_distillation.store.errors import CorruptShardError, ShardLockedError
from part_distillation.store.files import create_tmp, fsync_dir

logger = logging.getLogger("part_distillation.store")

FORMAT = "part_distillation.store/1"
MAGIC = b"PDR1"
FRAME_HEADER = struct.Struct("<4sQI")  # magic, payload length, crc32(payload)
U32 = struct.Struct("<I")
FRAME_HEADER_SIZE = FRAME_HEADER.size
_READ_CHUNK = 8 << 20


# --------------------------------------------------------------------------- encoding

_LEAF_TYPES = frozenset((str, int, float, bool, type(None)))



def _strip_arrays(obj: Any, path: list, arrays: list) -> Any:
    """Copy of ``obj`` with arrays replaced by None; their ``(path, kind, array)`` go to ``arrays``.

    Leaves are checked inline (no call per leaf): this walk is most of the write cost.
    """
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if type(k) is not str:
                raise TypeError(f"record dict keys must be str, got {k!r} at {_dotted(path)}")
            if type(v) in _LEAF_TYPES:
                out[k] = v
            else:
                path.append(k)
                out[k] = _strip_arrays(v, path, arrays)
                path.pop()
        return out
    if isinstance(obj, (list, tuple)):
        for v in obj:
            if type(v) not in _LEAF_TYPES:
                break
        else:
            return list(obj)
        out_list = []
        for i, v in enumerate(obj):
            path.append(i)
            out_list.append(_strip_arrays(v, path, arrays))
            path.pop()
        return out_list
    if isinstance(obj, np.ndarray):
        kind = "a"
    elif isinstance(obj, np.generic):
        kind, obj = "s", np.asarray(obj)
    elif isinstance(obj, (str, int, float)) or obj is None:  # bool is an int; str/int/float subclasses
        return obj
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        kind, obj = "b", np.frombuffer(bytes(obj), dtype=np.uint8)
    elif type(obj).__module__.startswith("torch") and hasattr(obj, "detach"):
        kind, obj = "a", obj.detach().cpu().numpy()
    else:
        raise TypeError(f"cannot store a {type(obj).__name__} at {_dotted(path)}: use JSON values, "
                        f"numpy arrays or bytes")
    if obj.dtype.hasobject:
        raise TypeError(f"cannot store an object-dtype array at {_dotted(path)}")
    arrays.append((list(path), kind, obj))
    return None


def _dotted(path: Sequence) -> str:
    return ".".join(str(p) for p in path) or "<record>"


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _json_bytes(obj: Any) -> bytes:
    return _ENCODER.encode(obj).encode("utf-8")


def record_class_and_bad(fields: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """What the meta header keeps besides the key: the class (``wnid``) and, for a record
    whose ``ok`` is false, its ``reason``."""
    wnid = fields.get("wnid")
    bad = str(fields.get("reason") or "bad") if fields.get("ok") is False else None
    return (wnid if isinstance(wnid, str) else None), bad


def encode_payload(key: str, fields: Mapping[str, Any], skip_reason: str | None = None) -> bytes:
    """The payload bytes of one record (see the module docstring for the layout)."""
    arrays: list = []
    values = _strip_arrays(dict(fields), [], arrays)
    entries, blobs, offset = [], [], 0
    for path, kind, arr in arrays:
        data = np.ascontiguousarray(arr).tobytes()
        entries.append([path, kind, arr.dtype.str, list(arr.shape), offset, len(data)])
        blobs.append(data)
        pad = -len(data) % 8
        if pad:
            blobs.append(b"\0" * pad)
        offset += len(data) + pad
    meta: dict[str, Any] = {"key": key}
    if skip_reason is not None:
        meta["skip"] = skip_reason
    class_name, bad = record_class_and_bad(fields)
    if class_name is not None:
        meta["class"] = class_name
    if bad is not None:
        meta["bad"] = bad
    if entries:
        meta["arrays"] = entries
    meta_b, values_b = _json_bytes(meta), _json_bytes(values)
    head = b"".join((U32.pack(len(meta_b)), meta_b, U32.pack(len(values_b)), values_b))
    return b"".join((head, b"\0" * (-len(head) % 8), *blobs))


def decode_meta(buf: bytes, pos: int) -> tuple[dict, int]:
    """Meta header of the payload at ``pos``; returns it and the position after it."""
    (n,) = U32.unpack_from(buf, pos)
    return json.loads(buf[pos + 4:pos + 4 + n].decode()), pos + 4 + n


def decode_record(buf: bytes, pos: int, meta: dict, after_meta: int) -> dict:
    """The full record of a payload whose meta header was already parsed."""
    (m,) = U32.unpack_from(buf, after_meta)
    values_end = after_meta + 4 + m
    # str.decode first: json.loads(bytes) decodes with 'surrogatepass', twice as slow.
    fields = json.loads(buf[after_meta + 4:values_end].decode())
    data_start = values_end + (-(values_end - pos) % 8)
    for path, kind, dtype, shape, offset, nbytes in meta.get("arrays", ()):
        start = data_start + offset
        if kind == "b":
            value: Any = buf[start:start + nbytes]
        else:
            dt = np.dtype(dtype)
            count = nbytes // dt.itemsize if dt.itemsize else 0
            arr = (np.frombuffer(buf, dtype=dt, count=count, offset=start).reshape(shape).copy()
                   if count else np.zeros(shape, dtype=dt))
            value = arr[()] if kind == "s" else arr
        parent = fields
        for p in path[:-1]:
            parent = parent[p]
        parent[path[-1]] = value
    return {"key": meta["key"], **fields}


def frame_payload(payload: bytes) -> bytes:
    return FRAME_HEADER.pack(MAGIC, len(payload), zlib.crc32(payload))



# --------------------------------------------------------------------------- scanning

def pread_exact(fd: int, n: int, offset: int) -> bytes:
    """``n`` bytes at ``offset`` (fewer at the end of the file), without an extra copy."""
    first = os.pread(fd, n, offset)
    if len(first) == n or not first:
        return first
    parts, got = [first], len(first)
    while got < n:
        chunk = os.pread(fd, n - got, offset + got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def try_flock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def writer_active(fd: int) -> bool:
    """Whether some process holds the shard's write lock (probe with a shared lock)."""
    if not try_flock(fd, fcntl.LOCK_SH):
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


class ShardScan:
    """Walks the valid frames of one shard file with large reads, checking each CRC.

    Iterating yields ``(offset, buf, payload_pos, payload_len)``; ``buf`` stays valid
    until the next step. Afterwards ``valid_end`` is the end of the last good frame
    and ``tail`` is ``(offset, reason)`` of a trailing torn frame, or None.
    A torn tail is logged at ``tail_log_level`` (DEBUG while a writer holds the lock,
    probed on ``fd``); callers that hold the lock on ``fd`` pass None, since probing
    would convert their lock.
    """

    def __init__(self, path: Path, fd: int, size: int, *, on_corrupt: str = "raise",
                 tail_log_level: int | None = logging.WARNING, start: int = 0):
        if on_corrupt not in ("raise", "skip"):
            raise ValueError(f"on_corrupt must be 'raise' or 'skip', got {on_corrupt!r}")
        self.path, self.fd, self.size = path, fd, size
        self.on_corrupt, self.tail_log_level = on_corrupt, tail_log_level
        self.start = self.valid_end = start
        self.tail: tuple[int, str] | None = None
        self.corrupt: list[tuple[int, str]] = []

    def __iter__(self) -> Iterator[tuple[int, bytes, int, int]]:
        self._buf, self._base = b"", 0
        off, size = self.start, self.size
        while off < size:
            if size - off < FRAME_HEADER_SIZE:
                reason = "incomplete frame header"
            elif off + FRAME_HEADER_SIZE > self._base + len(self._buf) and not self._fill(off, FRAME_HEADER_SIZE):
                reason = "file shrank while being read"
            else:
                magic, length, crc = FRAME_HEADER.unpack_from(self._buf, off - self._base)
                end = off + FRAME_HEADER_SIZE + length
                if magic != MAGIC:
                    reason = "bad magic"
                elif end > size:
                    reason = f"frame of {length} bytes runs past the end of the file ({size} bytes)"
                elif end > self._base + len(self._buf) and not self._fill(off, end - off):
                    reason = "file shrank while being read"
                else:
                    buf, pos = self._buf, off - self._base + FRAME_HEADER_SIZE
                    if zlib.crc32(memoryview(buf)[pos:pos + length]) == crc:
                        yield off, buf, pos, length
                        self.valid_end = off = end
                        continue
                    reason = "CRC mismatch"
            resume_at = self._next_valid_frame(off + 1)
            if resume_at is None:
                self._report_tail(off, reason)
                return
            if self.on_corrupt == "raise":
                raise CorruptShardError(self.path, off, reason)
            logger.warning("skipping corrupt bytes %d..%d in %s (%s)", off, resume_at, self.path, reason)
            self.corrupt.append((off, reason))
            off = resume_at
        self.valid_end = off

    def _fill(self, offset: int, need: int) -> bool:
        """Buffer at least ``need`` bytes from ``offset`` (one large read); False if the file
        shrank under us (a writer truncating a torn tail we also saw)."""
        self._buf = pread_exact(self.fd, min(max(need, _READ_CHUNK), self.size - offset), offset)
        self._base = offset
        return len(self._buf) >= need

    def _report_tail(self, offset: int, reason: str) -> None:
        self.tail = (offset, reason)
        self.valid_end = offset
        if self.tail_log_level is None:
            return
        level = logging.DEBUG if writer_active(self.fd) else self.tail_log_level
        logger.log(level, "%s: ignoring incomplete record at byte offset %d (%s, %d trailing bytes)",
                   self.path, offset, reason, self.size - offset)

    def _next_valid_frame(self, start: int) -> int | None:
        """Offset of the first intact frame at or after ``start`` (the resync after damage)."""
        window = _READ_CHUNK
        pos = start
        while pos < self.size:
            chunk = pread_exact(self.fd, min(window + len(MAGIC) - 1, self.size - pos), pos)
            i = chunk.find(MAGIC)
            while i != -1:
                if self._is_valid_frame(pos + i):
                    return pos + i
                i = chunk.find(MAGIC, i + 1)
            pos += window
        return None

    def _is_valid_frame(self, offset: int) -> bool:
        head = pread_exact(self.fd, FRAME_HEADER_SIZE, offset)
        if len(head) < FRAME_HEADER_SIZE:
            return False
        magic, length, crc = FRAME_HEADER.unpack(head)
        if magic != MAGIC or offset + FRAME_HEADER_SIZE + length > self.size:
            return False
        return zlib.crc32(pread_exact(self.fd, length, offset + FRAME_HEADER_SIZE)) == crc


def scan_file(path: Path, on_corrupt: str = "raise") -> Iterator[tuple[int, bytes, int, int]]:
    """The intact frames of one shard file, read up to its size at open (none if absent)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        yield from ShardScan(path, fd, os.fstat(fd).st_size, on_corrupt=on_corrupt)
    finally:
        os.close(fd)


def repair_shard(path: str | os.PathLike) -> dict:
    """Rewrite a shard with only its intact records, dropping corrupt and torn frames.

    For a shard that raised :class:`CorruptShardError`: every intact record before and
    after the damage is kept; rerunning its job then recomputes the lost keys. Takes
    the shard's write lock, so it refuses while a writer is active.
    """
    path = Path(path)
    fd = os.open(path, os.O_RDWR)
    try:
        if not try_flock(fd, fcntl.LOCK_EX):
            raise ShardLockedError(f"shard {path} is being written by another process; repair it later")
        size = os.fstat(fd).st_size
        scan = ShardScan(path, fd, size, on_corrupt="skip", tail_log_level=None)
        out_fd, tmp = create_tmp(path)
        kept = 0
        try:
            with os.fdopen(out_fd, "wb") as out:
                for _, buf, pos, length in scan:
                    out.write(memoryview(buf)[pos - FRAME_HEADER_SIZE:pos + length])
                    kept += 1
                out.flush()
                os.fsync(out.fileno())
            report = {"path": str(path), "records_kept": kept, "bytes_before": size,
                      "corrupt_offsets": [o for o, _ in scan.corrupt],
                      "torn_tail_offset": scan.tail[0] if scan.tail else None}
            if not scan.corrupt and scan.tail is None:
                report["bytes_after"] = size
                return report
            os.replace(tmp, path)
            fsync_dir(path.parent)
            path.with_suffix(".idx").unlink(missing_ok=True)  # its key table describes the old file
            report["bytes_after"] = os.stat(path).st_size
            logger.warning("repaired %s: kept %d records, dropped corrupt frames at %s and torn tail at %s",
                           path, kept, report["corrupt_offsets"], report["torn_tail_offset"])
            return report
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    finally:
        os.close(fd)


