"""The record store: how one stage hands per-image results to the next.

A stage output is a directory::

    <output>/manifest.json                      stage, config, fingerprint, shard count
    <output>/shards/00003-of-00060.rec          records of job 3 (append-only)
    <output>/shards/00003-of-00060.summary.json counts written by job 3 at close

Each job appends only to its own shard, so the file count grows with the number of
shards, never with the number of images, and no two processes ever write one file.

Record
    A dict with a non-empty string ``"key"`` (a stable image id, e.g. the path relative
    to the image root) and any JSON values (str, int, float, bool, None, lists,
    str-keyed dicts), numpy arrays and numpy scalars (dtype and shape kept), ``bytes``
    and torch tensors (read back as numpy arrays), nested freely. Tuples come back as
    lists. COCO RLE masks are plain dicts ``{"size": [h, w], "counts": str}``.

Shard file format (little endian, no pickle anywhere)
    The file is a sequence of frames ``[magic "PDR1"][u64 payload length]
    [u32 crc32 of payload][payload]``. A payload is
    ``[u32 n][meta JSON][u32 m][values JSON][zero padding to 8][array bytes]``:
    the small *meta* header holds the key, an optional skip reason and one entry per
    array ``[path, kind, dtype, shape, offset, nbytes]``; *values* holds the record's
    other fields with ``null`` where an array goes. Keeping the key in its own small
    header lets resume, ``keys()`` and the index skip parsing the values.

Crash safety
    Each record is written with one ``writev`` straight to the kernel (no user-space
    buffer), so a killed process leaves at most one torn frame at the end of the file;
    ``fsync`` runs every ``fsync_every`` records and at close. A reader stops at a torn
    or CRC-failing *last* frame (a warning names the file and byte offset; only DEBUG
    while a writer holds the shard, where it is a record being written); a writer
    reopening the shard truncates it there. A bad frame followed by an intact one is
    corruption in the middle (found by scanning for the next valid frame, which also
    catches a damaged length field): it raises :class:`CorruptShardError`, or with
    ``on_corrupt="skip"`` is skipped with a warning; nothing is truncated then, and
    :func:`repair_shard` rewrites the shard without it. One writer per shard is enforced
    with an exclusive ``fcntl.flock`` on the shard file itself (no separate lock file to
    go stale; on Lustre mount with ``-o flock``).

Resume
    ``writer.has(key)`` / ``writer.done_keys`` are the keys complete in the shard:
    records and skip markers (``writer.skip(key, reason)`` for images that give no
    record, so a rerun does not retry them; readers never yield skip markers).

Duplicate keys
    A writer refuses a key already in its shard (:class:`DuplicateKeyError`; check
    ``writer.has(key)`` first), so a shard never holds a key twice. If two shards hold
    the same key (jobs given overlapping slices), readers yield the first one in shard
    order and warn.

Manifest
    The first writer creates ``manifest.json`` (stage, resolved config, fingerprint,
    code version, shard count, time) atomically; later writers compare. A different
    config is refused naming the differing dotted keys unless ``overwrite_config=True``;
    keys matching ``DEFAULT_IGNORE_KEYS`` or the caller's ``ignore_keys`` do not count.
    A different shard count is always refused. Writers never touch the manifest after
    that: each writes its own ``.summary.json`` at close.
"""
from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import fnmatch
import functools
import hashlib
import json
import logging
import os
import re
import struct
import subprocess
import tempfile
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence, Set
from pathlib import Path
from typing import Any

import numpy as np

from part_distillation.masks import rle_area, rle_to_bbox
from part_distillation.store.schemas import RecordSchema

logger = logging.getLogger(__name__)

FORMAT = "part_distillation.store/1"
MAGIC = b"PDR1"
_FRAME = struct.Struct("<4sQI")  # magic, payload length, crc32(payload)
_U32 = struct.Struct("<I")
FRAME_HEADER_SIZE = _FRAME.size
_READ_CHUNK = 8 << 20
_SHARD_RE = re.compile(r"^(\d{5})-of-(\d{5})\.rec$")

#: Config keys (dotted ``fnmatch`` patterns) never counted in the fingerprint: where
#: and how a job runs, not what it computes. Added to the caller's ``ignore_keys``.
DEFAULT_IGNORE_KEYS: tuple[str, ...] = (
    "hydra", "launcher", "paths",
    "shard_index", "*.shard_index", "num_shards", "*.num_shards",
    "overwrite_config", "*.overwrite_config",
)


class StoreError(Exception):
    """Any refusal of the record store."""


class CorruptShardError(StoreError):
    """A frame that fails its checks is followed by valid frames: real corruption."""

    def __init__(self, path: Path, offset: int, reason: str):
        self.path, self.offset, self.reason = Path(path), offset, reason
        super().__init__(
            f"corrupt record in {path} at byte offset {offset}: {reason}; the records after it are "
            f"intact. Read with on_corrupt='skip' to skip it, or rewrite the shard without it with "
            f"part_distillation.store.repair_shard({str(path)!r}) and rerun its job to recompute the lost record")


class ConfigMismatchError(StoreError):
    """The output was made with a different config or stage."""


class ShardCountMismatchError(StoreError):
    """The output was made with a different number of shards."""


class ShardLockedError(StoreError):
    """Another process is writing this shard."""


class DuplicateKeyError(StoreError, KeyError):
    """The key is already in this shard."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


# --------------------------------------------------------------------------- paths

def shard_name(index: int, num_shards: int) -> str:
    return f"{index:05d}-of-{num_shards:05d}"


def manifest_path(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "manifest.json"


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Package version plus the git commit (``0.1.0+g1a2b3c4``, ``.dirty`` if modified)."""
    from part_distillation import __version__

    repo = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty=.dirty",
                              "--abbrev=12", "--match", "NO_TAGS"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return __version__
    commit = out.stdout.strip()
    return f"{__version__}+g{commit}" if out.returncode == 0 and commit else __version__


_code_version = code_version  # the writer's argument of the same name shadows it


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
    if entries:
        meta["arrays"] = entries
    meta_b, values_b = _json_bytes(meta), _json_bytes(values)
    head = b"".join((_U32.pack(len(meta_b)), meta_b, _U32.pack(len(values_b)), values_b))
    return b"".join((head, b"\0" * (-len(head) % 8), *blobs))


def _decode_meta(buf: bytes, pos: int) -> tuple[dict, int]:
    """Meta header of the payload at ``pos``; returns it and the position after it."""
    (n,) = _U32.unpack_from(buf, pos)
    return json.loads(buf[pos + 4:pos + 4 + n].decode()), pos + 4 + n


def _decode_record(buf: bytes, pos: int, meta: dict, after_meta: int) -> dict:
    """The full record of a payload whose meta header was already parsed."""
    (m,) = _U32.unpack_from(buf, after_meta)
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


def _frame(payload: bytes) -> bytes:
    return _FRAME.pack(MAGIC, len(payload), zlib.crc32(payload))


# --------------------------------------------------------------------------- scanning

def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    parts, got = [], 0
    while got < n:
        chunk = os.pread(fd, n - got, offset + got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _try_flock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _writer_active(fd: int) -> bool:
    """Whether some process holds the shard's write lock (probe with a shared lock)."""
    if not _try_flock(fd, fcntl.LOCK_SH):
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


class _ShardScan:
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
        self._buf, self._base = b"", self.start
        off, size = self.start, self.size
        while off < size:
            if size - off < FRAME_HEADER_SIZE:
                reason = "incomplete frame header"
            elif off + FRAME_HEADER_SIZE > self._base + len(self._buf) and not self._fill(off, FRAME_HEADER_SIZE):
                reason = "file shrank while being read"
            else:
                magic, length, crc = _FRAME.unpack_from(self._buf, off - self._base)
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
        self._buf = _pread_exact(self.fd, min(max(need, _READ_CHUNK), self.size - offset), offset)
        self._base = offset
        return len(self._buf) >= need

    def _report_tail(self, offset: int, reason: str) -> None:
        self.tail = (offset, reason)
        self.valid_end = offset
        if self.tail_log_level is None:
            return
        level = logging.DEBUG if _writer_active(self.fd) else self.tail_log_level
        logger.log(level, "%s: ignoring incomplete record at byte offset %d (%s, %d trailing bytes)",
                   self.path, offset, reason, self.size - offset)

    def _next_valid_frame(self, start: int) -> int | None:
        """Offset of the first intact frame at or after ``start`` (the resync after damage)."""
        window = _READ_CHUNK
        pos = start
        while pos < self.size:
            chunk = _pread_exact(self.fd, min(window + len(MAGIC) - 1, self.size - pos), pos)
            i = chunk.find(MAGIC)
            while i != -1:
                if self._is_valid_frame(pos + i):
                    return pos + i
                i = chunk.find(MAGIC, i + 1)
            pos += window
        return None

    def _is_valid_frame(self, offset: int) -> bool:
        head = _pread_exact(self.fd, FRAME_HEADER_SIZE, offset)
        if len(head) < FRAME_HEADER_SIZE:
            return False
        magic, length, crc = _FRAME.unpack(head)
        if magic != MAGIC or offset + FRAME_HEADER_SIZE + length > self.size:
            return False
        return zlib.crc32(_pread_exact(self.fd, length, offset + FRAME_HEADER_SIZE)) == crc


def _scan_file(path: Path, on_corrupt: str = "raise") -> Iterator[tuple[int, bytes, int, int]]:
    """The intact frames of one shard file, read up to its size at open (none if absent)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        yield from _ShardScan(path, fd, os.fstat(fd).st_size, on_corrupt=on_corrupt)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- manifest

def _normalise_config(config: Mapping[str, Any]) -> dict:
    try:
        return json.loads(json.dumps(config, sort_keys=True))
    except (TypeError, ValueError) as e:
        raise TypeError("the config must be a JSON-able dict (convert an OmegaConf config with "
                        f"OmegaConf.to_container(cfg, resolve=True)): {e}") from None


def _strip_keys(config: Any, patterns: Sequence[str], prefix: str = "") -> Any:
    if not isinstance(config, dict):
        return config
    out = {}
    for k, v in config.items():
        dotted = f"{prefix}{k}"
        if any(fnmatch.fnmatchcase(dotted, p) for p in patterns):
            continue
        out[k] = _strip_keys(v, patterns, dotted + ".")
    return out


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(config, dict) or not config:
        return {prefix.rstrip("."): config} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in config.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def config_fingerprint(config: Mapping[str, Any], ignore_keys: Iterable[str] = ()) -> str:
    """Short sha256 of the config without the ignored keys (dotted fnmatch patterns)."""
    patterns = tuple(DEFAULT_IGNORE_KEYS) + tuple(ignore_keys)
    stripped = _strip_keys(_normalise_config(config), patterns)
    return hashlib.sha256(json.dumps(stripped, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], ignore_keys: Iterable[str] = ()) -> list[str]:
    """Dotted paths whose values differ between two configs, ignored keys left out."""
    patterns = tuple(DEFAULT_IGNORE_KEYS) + tuple(ignore_keys)
    a = _flatten(_strip_keys(_normalise_config(old), patterns))
    b = _flatten(_strip_keys(_normalise_config(new), patterns))
    return sorted(k for k in a.keys() | b.keys() if a.get(k, _MISSING) != b.get(k, _MISSING))


_MISSING = object()


def _fsync_dir(path: Path) -> None:
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


def _write_tmp(path: Path, data: bytes) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON so readers see the old file or the new one, never a part (tmp + os.replace)."""
    path = Path(path)
    tmp = _write_tmp(path, (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_manifest(output_dir: str | os.PathLike) -> dict:
    path = manifest_path(output_dir)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"{output_dir} is not a stage output: {path} is missing") from None
    except json.JSONDecodeError as e:
        raise StoreError(f"{path} is not valid JSON: {e}") from None


def _format_value(flat: dict, key: str) -> str:
    v = flat.get(key, _MISSING)
    return "<absent>" if v is _MISSING else json.dumps(v)


def ensure_manifest(output_dir: str | os.PathLike, *, stage: str, config: Mapping[str, Any],
                    num_shards: int, code_version: str, ignore_keys: Iterable[str] = (),
                    overwrite_config: bool = False) -> dict:
    """Create the output's manifest, or check that it matches this run; returns it.

    Safe with many jobs starting at once: the file is created with ``os.link`` of a
    complete temporary file, so exactly one job creates it and the rest compare.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config = _normalise_config(config)
    ignore_keys = list(ignore_keys)
    manifest = {
        "format": FORMAT,
        "stage": stage,
        "config": config,
        "config_fingerprint": config_fingerprint(config, ignore_keys),
        "ignore_keys": sorted(set(DEFAULT_IGNORE_KEYS) | set(ignore_keys)),
        "code_version": code_version,
        "num_shards": int(num_shards),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    path = manifest_path(output_dir)
    tmp = _write_tmp(path, (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode())
    try:
        try:
            os.link(tmp, path)
            created = True
        except FileExistsError:
            created = False
        except OSError as e:  # no hard links on this file system: replace unless present
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            created = not path.exists()
            if created:
                os.replace(tmp, path)
        if created:
            _fsync_dir(output_dir)
            logger.info("created %s (stage %s, %d shards)", path, stage, num_shards)
            return manifest
        existing = read_manifest(output_dir)
        if existing.get("num_shards") != num_shards:
            raise ShardCountMismatchError(
                f"{output_dir} was made with num_shards={existing.get('num_shards')}, this run asks for "
                f"num_shards={num_shards}; shard files would overlap. Use num_shards="
                f"{existing.get('num_shards')} or a new output directory")
        problems = []
        if existing.get("stage") != stage:
            problems.append(f"stage: {existing.get('stage')!r} (existing) != {stage!r} (this run)")
        ignore = set(existing.get("ignore_keys", ())) | set(ignore_keys)
        diff = config_diff(existing.get("config", {}), config, ignore)
        if diff:
            old = _flatten(_strip_keys(existing.get("config", {}), tuple(ignore)))
            new = _flatten(_strip_keys(config, tuple(ignore)))
            problems += [f"{k}: {_format_value(old, k)} (existing) != {_format_value(new, k)} (this run)"
                         for k in diff]
        if not problems:
            if existing.get("code_version") != code_version:
                logger.info("%s was created by code %s, this run is %s", output_dir,
                            existing.get("code_version"), code_version)
            return existing
        if not overwrite_config:
            raise ConfigMismatchError(
                f"{output_dir} was made with a different config; differing keys: {', '.join(diff) or 'stage'}\n  "
                + "\n  ".join(problems)
                + "\nUse a new output directory, or force writing into this one with overwrite_config=True "
                  "(stage option overwrite_config=true; records already written are kept)")
        logger.warning("overwriting the config of %s (differing: %s)", output_dir, ", ".join(diff) or "stage")
        os.replace(tmp, path)
        _fsync_dir(output_dir)
        return manifest
    finally:
        if tmp.exists():
            tmp.unlink()


# --------------------------------------------------------------------------- writer

class _KeysView(Set):
    """Read-only live view of a writer's done keys (no copy)."""

    def __init__(self, keys: set):
        self._keys = keys

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class ShardWriter:
    """Appends records to one shard of a stage output; the only writer of that shard.

    Opening checks (or creates) the manifest, takes the shard's lock, and reads the
    keys already complete so a rerun can skip them (``has(key)``); a torn last record
    from a crash is truncated away. Use as a context manager: ``close()`` fsyncs and
    writes the shard's summary.
    """

    def __init__(self, output_dir: str | os.PathLike, shard_index: int, num_shards: int, *,
                 stage: str, config: Mapping[str, Any], code_version: str | None = None,
                 ignore_keys: Iterable[str] = (), overwrite_config: bool = False,
                 fsync_every: int = 256, on_corrupt: str = "raise", schema: "RecordSchema | None" = None):
        if not isinstance(num_shards, int) or num_shards < 1:
            raise ValueError(f"num_shards must be a positive int, got {num_shards!r}")
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index must be in [0, {num_shards}), got {shard_index}")
        if fsync_every < 1:
            raise ValueError("fsync_every must be >= 1")
        self.output_dir = Path(output_dir)
        self.shard_index, self.num_shards = shard_index, num_shards
        self.code_version = code_version if code_version is not None else _code_version()
        self.fsync_every = fsync_every
        self.schema = schema
        self.manifest = ensure_manifest(self.output_dir, stage=stage, config=config, num_shards=num_shards,
                                        code_version=self.code_version, ignore_keys=ignore_keys,
                                        overwrite_config=overwrite_config)
        shards = self.output_dir / "shards"
        shards.mkdir(exist_ok=True)
        name = shard_name(shard_index, num_shards)
        self.path = shards / f"{name}.rec"
        self.summary_path = shards / f"{name}.summary.json"
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._lock()
            self._done: set[str] = set()
            self._records = 0
            self._skipped: dict[str, int] = {}
            self._end = self._recover(on_corrupt)
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise
        self.resumed_records = self._records
        self.resumed_skipped = sum(self._skipped.values())
        self.written_this_run = 0
        self.skipped_this_run = 0
        self._unsynced = 0
        os.lseek(self._fd, self._end, os.SEEK_SET)
        if self._done:
            logger.info("resuming %s: %d keys already done", self.path, len(self._done))

    def _lock(self, patience_s: float = 2.0) -> None:
        """Take the exclusive lock; wait briefly while only readers probe it (shared locks)."""
        deadline = time.monotonic() + patience_s
        while True:
            if _try_flock(self._fd, fcntl.LOCK_EX):
                return
            if not _try_flock(self._fd, fcntl.LOCK_SH):
                break  # an exclusive holder: another writer
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        raise ShardLockedError(
            f"shard {self.path} is locked by another process that is writing it; two jobs must not "
            f"write the same shard (check shard_index={self.shard_index} and num_shards="
            f"{self.num_shards}, or wait for the other job to finish)")

    def _recover(self, on_corrupt: str) -> int:
        """Read the done keys; truncate a torn tail. Returns the append offset."""
        size = os.fstat(self._fd).st_size
        scan = _ShardScan(self.path, self._fd, size, on_corrupt=on_corrupt, tail_log_level=None)
        for _, buf, pos, _length in scan:
            meta, _ = _decode_meta(buf, pos)
            self._count(meta["key"], meta.get("skip"))
        if scan.tail is not None:
            offset, reason = scan.tail
            logger.warning("%s: truncating incomplete last record at byte offset %d (%s, %d bytes)",
                           self.path, offset, reason, size - offset)
            os.ftruncate(self._fd, offset)
            os.fsync(self._fd)
        return scan.valid_end if scan.tail is not None else size

    def _count(self, key: str, skip_reason: str | None) -> None:
        self._done.add(key)
        if skip_reason is None:
            self._records += 1
        else:
            self._skipped[skip_reason] = self._skipped.get(skip_reason, 0) + 1

    # -- queries
    def has(self, key: str) -> bool:
        """Whether ``key`` is already complete in this shard (written or skipped)."""
        return key in self._done

    @property
    def done_keys(self) -> Set[str]:
        """Keys complete in this shard, written or skipped (a live read-only view)."""
        return _KeysView(self._done)

    # -- writing
    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record; it is complete on disk (page cache) when this returns."""
        key = record.get("key") if isinstance(record, Mapping) else None
        if not isinstance(key, str) or not key:
            raise ValueError("a record must be a dict with a non-empty str 'key'")
        if self.schema is not None:
            self.schema.check(record)
        fields = {k: v for k, v in record.items() if k != "key"}
        self._append(key, encode_payload(key, fields), None)

    def skip(self, key: str, reason: str) -> None:
        """Mark ``key`` as done without a record (e.g. 'no_detections'), so reruns skip it too."""
        if not isinstance(key, str) or not key:
            raise ValueError("key must be a non-empty str")
        if not isinstance(reason, str) or not reason:
            raise ValueError("reason must be a non-empty str")
        self._append(key, encode_payload(key, {}, reason), reason)

    def _append(self, key: str, payload: bytes, skip_reason: str | None) -> None:
        if self._fd is None:
            raise StoreError(f"writer of {self.path} is closed")
        if key in self._done:
            raise DuplicateKeyError(f"key {key!r} is already in {self.path}; check writer.has(key) "
                                    f"before computing a record")
        header = _frame(payload)
        total = len(header) + len(payload)
        try:
            written = os.writev(self._fd, [header, payload])
            if written < total:
                rest = memoryview(header + payload)[written:]
                while rest:
                    rest = rest[os.write(self._fd, rest):]
        except BaseException:
            # Leave no torn record behind us in this process.
            os.ftruncate(self._fd, self._end)
            os.lseek(self._fd, self._end, os.SEEK_SET)
            raise
        self._end += total
        self._count(key, skip_reason)
        if skip_reason is None:
            self.written_this_run += 1
        else:
            self.skipped_this_run += 1
        self._unsynced += 1
        if self._unsynced >= self.fsync_every:
            self.flush()

    def flush(self) -> None:
        """fsync the shard: what was written survives a power loss."""
        if self._fd is not None and self._unsynced:
            os.fsync(self._fd)
            self._unsynced = 0

    def summary(self, status: str = "closed") -> dict:
        """What this shard holds now and what this run added (written at close)."""
        return {
            "shard_index": self.shard_index,
            "num_shards": self.num_shards,
            "records": self._records,
            "skipped": dict(sorted(self._skipped.items())),
            "written_this_run": self.written_this_run,
            "skipped_this_run": self.skipped_this_run,
            "resumed_records": self.resumed_records,
            "resumed_skipped": self.resumed_skipped,
            "bytes": self._end,
            "status": status,
            "code_version": self.code_version,
            "closed": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }

    def close(self, status: str = "closed") -> None:
        """fsync, write the shard summary atomically, release the lock. Idempotent."""
        if self._fd is None:
            return
        try:
            self._unsynced = max(self._unsynced, 1)
            self.flush()
            atomic_write_json(self.summary_path, self.summary(status))
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("closed" if exc_type is None else f"error: {exc_type.__name__}")

    def __repr__(self) -> str:
        return f"ShardWriter({str(self.path)!r}, records={self._records})"


def repair_shard(path: str | os.PathLike) -> dict:
    """Rewrite a shard with only its intact records, dropping corrupt and torn frames.

    For a shard that raised :class:`CorruptShardError`: every intact record before and
    after the damage is kept; rerunning its job then recomputes the lost keys. Takes
    the shard's write lock, so it refuses while a writer is active.
    """
    path = Path(path)
    fd = os.open(path, os.O_RDWR)
    try:
        if not _try_flock(fd, fcntl.LOCK_EX):
            raise ShardLockedError(f"shard {path} is being written by another process; repair it later")
        size = os.fstat(fd).st_size
        scan = _ShardScan(path, fd, size, on_corrupt="skip", tail_log_level=None)
        out_fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
            _fsync_dir(path.parent)
            report["bytes_after"] = os.stat(path).st_size
            logger.warning("repaired %s: kept %d records, dropped corrupt frames at %s and torn tail at %s",
                           path, kept, report["corrupt_offsets"], report["torn_tail_offset"])
            return report
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- reader

def _warn_duplicate(key: str, path: Path, offset: int) -> None:
    logger.warning("duplicate key %r in %s at byte offset %d ignored (an earlier shard has it; first wins)",
                   key, path, offset)


class RecordStore:
    """Reads one stage output: all shards in index order, each record once.

    Safe while writers append: each shard is read up to its size when opened, so a
    reader sees only complete records.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self._index: dict[str, tuple[Path, int, int]] | None = None

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    @property
    def num_shards(self) -> int:
        return int(self.manifest["num_shards"])

    def shard_path(self, index: int) -> Path:
        return self.path / "shards" / f"{shard_name(index, self.num_shards)}.rec"

    def shard_paths(self) -> list[Path]:
        """Existing shard files of this output, in shard-index order."""
        n = self.num_shards
        found = []
        for p in (self.path / "shards").glob(f"*-of-{n:05d}.rec"):
            m = _SHARD_RE.match(p.name)
            if m and int(m.group(1)) < n:
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def _paths(self, shards: Iterable[int] | None) -> list[Path]:
        if shards is None:
            return self.shard_paths()
        shards = sorted(set(shards))
        bad = [i for i in shards if not 0 <= i < self.num_shards]
        if bad:
            raise ValueError(f"shard indices {bad} out of range: {self.path} has {self.num_shards} shards")
        return [self.shard_path(i) for i in shards if self.shard_path(i).exists()]

    def _iter_meta(self, shards, on_corrupt: str = "raise") -> Iterator[tuple[Path, int, int, dict]]:
        """``(path, offset, payload_len, meta)`` of every frame, records deduplicated (first wins)."""
        seen: set[str] = set()
        for path in self._paths(shards):
            for offset, buf, pos, length in _scan_file(path, on_corrupt):
                meta, _ = _decode_meta(buf, pos)
                if "skip" not in meta:
                    if meta["key"] in seen:
                        _warn_duplicate(meta["key"], path, offset)
                        continue
                    seen.add(meta["key"])
                yield path, offset, length, meta

    def iter_records(self, shards: Iterable[int] | None = None, *, on_corrupt: str = "raise") -> Iterator[dict]:
        """Every record (skip markers left out), shard by shard, in write order."""
        seen: set[str] = set()
        for path in self._paths(shards):
            for offset, buf, pos, _ in _scan_file(path, on_corrupt):
                meta, after = _decode_meta(buf, pos)
                if "skip" in meta:
                    continue
                key = meta["key"]
                if key in seen:
                    _warn_duplicate(key, path, offset)
                    continue
                seen.add(key)
                yield _decode_record(buf, pos, meta, after)

    __iter__ = iter_records

    def iter_keys(self, shards: Iterable[int] | None = None, *, on_corrupt: str = "raise") -> Iterator[str]:
        """Record keys without decoding values (cheap)."""
        for _, _, _, meta in self._iter_meta(shards, on_corrupt):
            if "skip" not in meta:
                yield meta["key"]

    def keys(self) -> list[str]:
        return list(self.iter_keys())

    def __len__(self) -> int:
        return sum(1 for _ in self.iter_keys())

    def skipped(self, shards: Iterable[int] | None = None) -> dict[str, str]:
        """Keys that were skipped, with their reasons."""
        return {meta["key"]: meta["skip"] for _, _, _, meta in self._iter_meta(shards) if "skip" in meta}

    def _build_index(self) -> dict[str, tuple[Path, int, int]]:
        return {meta["key"]: (path, offset, length)
                for path, offset, length, meta in self._iter_meta(None)
                if "skip" not in meta}

    def __contains__(self, key: object) -> bool:
        if self._index is None or key not in self._index:
            self._index = self._build_index()
        return key in self._index

    def get(self, key: str) -> dict:
        """One record by key (an index of all shards is built on first use)."""
        if key not in self:
            raise KeyError(f"{key!r} is not in {self.path}")
        path, offset, length = self._index[key]
        with open(path, "rb") as f:
            data = _pread_exact(f.fileno(), FRAME_HEADER_SIZE + length, offset)
        magic, n, crc = _FRAME.unpack_from(data, 0)
        if magic != MAGIC or n != length or zlib.crc32(memoryview(data)[FRAME_HEADER_SIZE:]) != crc:
            raise CorruptShardError(path, offset, "record changed since the index was built")
        meta, after = _decode_meta(data, FRAME_HEADER_SIZE)
        return _decode_record(data, FRAME_HEADER_SIZE, meta, after)

    def closed_shards(self) -> set[int]:
        """Shards whose writer has ended: a ``.summary.json`` written at close and no
        writer holding the shard now (a rerun reopening a closed shard holds its lock)."""
        closed = set()
        for i in range(self.num_shards):
            if not (self.path / "shards" / f"{shard_name(i, self.num_shards)}.summary.json").exists():
                continue
            try:
                fd = os.open(self.shard_path(i), os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                if not _writer_active(fd):
                    closed.add(i)
            finally:
                os.close(fd)
        return closed

    def iter_shard_from(self, index: int, offset: int = 0) -> Iterator[tuple[int, dict | None]]:
        """``(end offset, record)`` of each complete frame of shard ``index`` from byte
        ``offset`` on (0, or an end offset yielded before); ``record`` is None for a skip
        marker. For readers that follow a shard while its writer appends."""
        path = self.shard_path(index)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            scan = _ShardScan(path, fd, os.fstat(fd).st_size, start=offset, tail_log_level=logging.DEBUG)
            for frame_offset, buf, pos, length in scan:
                meta, after = _decode_meta(buf, pos)
                record = None if "skip" in meta else _decode_record(buf, pos, meta, after)
                yield frame_offset + FRAME_HEADER_SIZE + length, record
        finally:
            os.close(fd)

    def summary(self) -> dict:
        """Totals over the shard summaries; shards without one are running, crashed or not started."""
        total = {"stage": self.stage, "num_shards": self.num_shards, "shards_closed": 0,
                 "shards_missing_summary": [], "records": 0, "skipped": {}, "bytes": 0, "status": {}}
        for i in range(self.num_shards):
            p = self.path / "shards" / f"{shard_name(i, self.num_shards)}.summary.json"
            try:
                s = json.loads(p.read_text())
            except FileNotFoundError:
                total["shards_missing_summary"].append(i)
                continue
            total["shards_closed"] += 1
            total["records"] += s["records"]
            total["bytes"] += s["bytes"]
            for reason, n in s["skipped"].items():
                total["skipped"][reason] = total["skipped"].get(reason, 0) + n
            total["status"][s["status"]] = total["status"].get(s["status"], 0) + 1
        total["skipped"] = dict(sorted(total["skipped"].items()))
        return total

    def __repr__(self) -> str:
        return f"RecordStore({str(self.path)!r}, stage={self.stage!r}, num_shards={self.num_shards})"


# --------------------------------------------------------------------------- COCO export

_CATEGORY_FIELDS = ("category_ids", "classes")


def _image_size(record: dict) -> tuple[int, int]:
    if "height" in record and "width" in record:
        return int(record["height"]), int(record["width"])
    if "image_size" in record:
        h, w = record["image_size"][:2]
        return int(h), int(w)
    masks = record.get("masks") or []
    if masks:
        h, w = masks[0]["size"]
        return int(h), int(w)
    raise StoreError(f"record {record['key']!r} has no height/width, image_size or masks")


def _category_table(categories) -> tuple[list[dict], dict[str, int]]:
    if categories is None:
        return [], {}
    if isinstance(categories, Mapping):
        cats = [{"id": int(i), "name": str(n)} for i, n in categories.items()]
    else:
        cats = [dict(c) if isinstance(c, Mapping) else {"id": i + 1, "name": str(c)}
                for i, c in enumerate(categories)]
    return cats, {c["name"]: c["id"] for c in cats}


def coco_results(annotations: Iterable[dict]) -> list[dict]:
    """Annotations as a COCO *results* list (image_id, category_id, segmentation, score).

    Give this to ``COCO.loadRes``: with a ``bbox`` present, loadRes takes the box branch
    and sets each area to the box area, which puts masks in the wrong COCOeval area range.
    """
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": a["segmentation"],
             "score": a.get("score", 1.0)} for a in annotations]


def export_coco(store: RecordStore | str | os.PathLike, out_path: str | os.PathLike | None = None, *,
                category_field: str | None = None, categories=None, default_category: str = "object",
                shards: Iterable[int] | None = None) -> dict:
    """Write a stage output's records as one COCO instance-segmentation json; returns it.

    Record fields read:
      - ``file_name`` (else ``path``, else the key) and ``height``/``width`` (else
        ``image_size`` = [h, w], else the size of the first mask) -> one image each,
        with ids 1..N in store order;
      - ``masks``: list of COCO RLE dicts -> one annotation each, with bbox and area
        computed from the RLE and ``iscrowd`` 0;
      - ``scores``: one per mask (default 1.0);
      - the category: ``record[category_field]`` (default: the first present of
        ``category_ids``, ``classes``), either one value per mask or one value for the
        whole image (e.g. the object class code). Ints are category ids; strings are
        category names. Without a field every mask gets ``default_category``.

    ``categories`` fixes the category list: a list of ``{"id", "name"}`` dicts, a
    list of names (ids 1..n) or a dict id -> name. Otherwise it is built from the
    values seen (names get ids 1..n in sorted order).
    """
    store = store if isinstance(store, RecordStore) else RecordStore(store)
    cats, by_name = _category_table(categories)
    fixed = categories is not None
    seen_names: set[str] = set()
    seen_ids: set[int] = set()
    images, anns = [], []
    for image_id, rec in enumerate(store.iter_records(shards), start=1):
        h, w = _image_size(rec)
        images.append({"id": image_id, "file_name": str(rec.get("file_name") or rec.get("path") or rec["key"]),
                       "height": h, "width": w})
        masks = list(rec.get("masks") or [])
        if not masks:
            continue
        for m in masks:
            if [int(s) for s in m["size"]] != [h, w]:
                raise StoreError(f"record {rec['key']!r}: mask size {m['size']} != image size {[h, w]}")
        n = len(masks)
        scores = np.asarray(rec["scores"], dtype=np.float64).reshape(-1) if "scores" in rec else np.ones(n)
        field = category_field or next((f for f in _CATEGORY_FIELDS if f in rec), None)
        if field is None:
            labels: list = [default_category] * n
        else:
            value = rec[field]
            value = value.tolist() if isinstance(value, (np.ndarray, np.generic)) else value
            labels = list(value) if isinstance(value, (list, tuple)) else [value] * n
        if len(scores) != n or len(labels) != n:
            raise StoreError(f"record {rec['key']!r}: {n} masks but {len(scores)} scores and "
                             f"{len(labels)} categories")
        areas, boxes = rle_area(masks), rle_to_bbox(masks)
        for m, s, label, area, box in zip(masks, scores, labels, areas, boxes):
            if isinstance(label, str):
                if fixed and label not in by_name:
                    raise StoreError(f"record {rec['key']!r}: category {label!r} is not in the given categories")
                seen_names.add(label)
                cat_id: Any = label  # resolved below, once all names are known
            else:
                cat_id = int(label)
                seen_ids.add(cat_id)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat_id,
                         "segmentation": {"size": [h, w], "counts": m["counts"]},
                         "area": float(area), "bbox": [float(x) for x in box], "iscrowd": 0, "score": float(s)})
    if seen_names and seen_ids:
        raise StoreError("category values mix ids (int) and names (str)")
    if not fixed:
        if seen_names:
            cats = [{"id": i, "name": n} for i, n in enumerate(sorted(seen_names), start=1)]
            by_name = {c["name"]: c["id"] for c in cats}
        else:
            cats = [{"id": i, "name": str(i)} for i in sorted(seen_ids)]
    for a in anns:
        if isinstance(a["category_id"], str):
            a["category_id"] = by_name[a["category_id"]]
    coco = {
        "info": {"description": f"records of stage {store.stage} from {store.path}",
                 "config_fingerprint": store.manifest.get("config_fingerprint"),
                 "code_version": store.manifest.get("code_version")},
        "images": images, "annotations": anns, "categories": cats,
    }
    if out_path is not None:
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _write_tmp(out_path, json.dumps(coco).encode())
        os.replace(tmp, out_path)
        logger.info("wrote %s: %d images, %d annotations", out_path, len(images), len(anns))
    return coco
