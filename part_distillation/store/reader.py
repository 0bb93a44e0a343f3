"""Reading a stage output: every record once, a slice of them, or one by key.

Order
    Shard files in (shard index, rank) order, records in write order within a file.

Duplicate keys
    Within a shard file the newest frame of a key wins (superseding, see ``writer``).
    Across files the first file holding a record of the key wins, with a warning (jobs
    given overlapping slices). Duplicates are found from the key tables' 64-bit hashes
    (8 bytes per record for one pass, then only the few hashes seen twice are kept,
    with their keys), never from a set of every key.

Lookup
    ``key in store`` and ``store.get(key)`` use an index built once from the key tables:
    sorted 64-bit key hashes with (file, offset, length), 22 bytes per record; a lookup
    is a binary search plus one read of the frame, whose key is compared (hash
    collisions cannot return a wrong record). A miss costs the same as a hit and never
    rebuilds the index: it is a snapshot, ``refresh()`` takes a new one (records
    written since are then found).

Slices
    ``iter_slice(index, count, by=...)`` streams the records of one of ``count`` disjoint
    slices covering the output, so a stage of N jobs reads an output written by M jobs
    without loading its keys. ``by="class"``: whole classes (the record's ``wnid``) go to
    slices with ``store.sharding.assign_classes_to_shards`` over the number of records
    per class in this output: for an index output (one record per image of the tree)
    the slices are exactly ``data.imagenet.shard(tree.images, index, count, by="class")``.
    Records without a ``wnid`` go by key hash. ``by="image"`` (or ``"key"``):
    ``key_hash(key) % count``. The rule is ``store/sharding.py``'s, here vectorised.
"""
from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from part_distillation.store.errors import CorruptShardError, StoreError
from part_distillation.store.files import SHARD_RE, shard_name
from part_distillation.store.framing import (
    FRAME_HEADER, FRAME_HEADER_SIZE, MAGIC, ShardScan, writer_active, decode_meta, decode_record, pread_exact,
)
from part_distillation.store.keytable import FLAG_SKIP, NO_CLASS, KeyTable, key_hash, load_table
from part_distillation.store.manifest import read_manifest
from part_distillation.store.sharding import assign_classes_to_shards, check_shard

logger = logging.getLogger("part_distillation.store")

_SPAN = 8 << 20  # bytes read at once when streaming records


def _warn_duplicate(key: str, path: Path, offset: int) -> None:
    logger.warning("duplicate key %r in %s at byte offset %d ignored (an earlier shard has it; first wins)",
                   key, path, offset)


def _read_entries(path: Path, table: KeyTable, entries: np.ndarray, on_corrupt: str
                  ) -> Iterator[tuple[int, bytes, int, int]]:
    """``(offset, buf, payload_pos, length)`` of the table's ``entries`` (file order), CRC checked.

    Neighbouring frames are read together (up to 8 MB). A frame that fails its checks
    hands over to a scan of the file from there, which tells a torn tail (warning, stop)
    from corruption in the middle (``on_corrupt``).
    """
    if not len(entries):
        return
    offsets = table.offsets[entries].tolist()
    ends = (table.offsets[entries] + FRAME_HEADER_SIZE + table.lengths[entries]).tolist()
    fd = os.open(path, os.O_RDONLY)
    try:
        i, n = 0, len(offsets)
        while i < n:
            start, j = offsets[i], i + 1
            while j < n and ends[j] - start <= _SPAN:
                j += 1
            buf = pread_exact(fd, ends[j - 1] - start, start)
            for k in range(i, j):
                pos = offsets[k] - start
                length = ends[k] - offsets[k] - FRAME_HEADER_SIZE
                ok = len(buf) >= pos + FRAME_HEADER_SIZE + length
                if ok:
                    magic, n_bytes, crc = FRAME_HEADER.unpack_from(buf, pos)
                    payload = memoryview(buf)[pos + FRAME_HEADER_SIZE:pos + FRAME_HEADER_SIZE + length]
                    ok = magic == MAGIC and n_bytes == length and zlib.crc32(payload) == crc
                if not ok:
                    yield from _rescan(path, fd, offsets[k], set(offsets[k:]), on_corrupt)
                    return
                yield offsets[k], buf, pos + FRAME_HEADER_SIZE, length
            i = j
    finally:
        os.close(fd)


def _rescan(path: Path, fd: int, start: int, wanted: set, on_corrupt: str) -> Iterator[tuple[int, bytes, int, int]]:
    scan = ShardScan(path, fd, os.fstat(fd).st_size, on_corrupt=on_corrupt, start=start)
    for offset, buf, pos, length in scan:
        if offset in wanted:
            yield offset, buf, pos, length


class RecordStore:
    """Reads one stage output: all shard files in (index, rank) order, each record once.

    Safe while writers append: each shard file is read up to its size when its key
    table is loaded, so a reader sees only complete records.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self._index: dict | None = None
        self._fds: dict[Path, int] = {}

    def close(self) -> None:
        """Close the files kept open for lookups (also done when the store is collected)."""
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    @property
    def num_shards(self) -> int:
        return int(self.manifest["num_shards"])

    def shard_path(self, index: int, rank: int = 0) -> Path:
        return self.path / "shards" / f"{shard_name(index, self.num_shards, rank)}.rec"

    def _shard_files(self) -> list[tuple[int, int, Path]]:
        n = self.num_shards
        found = []
        for p in (self.path / "shards").glob(f"*-of-{n:05d}*.rec"):
            m = SHARD_RE.match(p.name)
            if m and int(m.group(1)) < n and int(m.group(2)) == n:
                found.append((int(m.group(1)), int(m.group(3) or 0), p))
        return sorted(found)

    def shard_paths(self) -> list[Path]:
        """Existing shard files of this output, in (shard index, rank) order."""
        return [p for _, _, p in self._shard_files()]

    def _paths(self, shards: Iterable[int] | None) -> list[Path]:
        files = self._shard_files()
        if shards is None:
            return [p for _, _, p in files]
        shards = sorted(set(shards))
        bad = [i for i in shards if not 0 <= i < self.num_shards]
        if bad:
            raise ValueError(f"shard indices {bad} out of range: {self.path} has {self.num_shards} shards")
        wanted = set(shards)
        return [p for i, _, p in files if i in wanted]

    def _tables(self, paths: list[Path], on_corrupt: str) -> Iterator[KeyTable]:
        for p in paths:
            table = load_table(p, on_corrupt=on_corrupt)
            if table is not None:
                yield table

    # -- planning: which frames of which file to read
    def _plan(self, shards, on_corrupt: str, *, skips: bool = False,
              slice_: tuple[int, int, str] | None = None) -> Iterator[tuple[KeyTable, np.ndarray, set]]:
        """Per file: its table, the entries to read (file order) and the offsets of
        entries that may be duplicates of an earlier file (their keys are compared)."""
        paths = self._paths(shards)
        snapshot: dict[Path, int] = {}
        dup_hashes = np.zeros(0, np.uint64)
        owner = None
        if len(paths) > 1 or (slice_ is not None and slice_[2] == "class"):
            hashes, class_sizes = [], {}
            for t in self._tables(paths, on_corrupt):
                snapshot[t.path] = t.covered
                rec = t.is_record
                hashes.append(t.hashes[rec])
                if slice_ is not None and slice_[2] == "class":
                    counts = np.bincount(t.classes[rec & (t.classes != NO_CLASS)], minlength=len(t.class_names))
                    for name, c in zip(t.class_names, counts.tolist()):
                        if c:
                            class_sizes[name] = class_sizes.get(name, 0) + c
            if hashes:
                all_h = np.sort(np.concatenate(hashes))
                del hashes
                dup_hashes = np.unique(all_h[1:][all_h[1:] == all_h[:-1]])
                del all_h
            if slice_ is not None and slice_[2] == "class":
                owner = assign_classes_to_shards(class_sizes, slice_[1])
        for t in self._tables(paths, on_corrupt):
            mask = t.live & ((t.flags & FLAG_SKIP) != 0) if skips else t.is_record
            if t.path in snapshot:
                mask &= t.offsets < snapshot[t.path]
            elif snapshot:
                continue  # a file that appeared after the first pass
            if slice_ is not None:
                index, count, by = slice_
                by_key = (t.hashes % np.uint64(count)) == np.uint64(index)
                if by == "class":
                    mine = np.array([owner.get(c) == index for c in t.class_names] + [False], dtype=bool)
                    cls = np.where(t.classes == NO_CLASS, len(t.class_names), t.classes)
                    by_class = mine[cls]
                    mask &= np.where(t.classes == NO_CLASS, by_key, by_class)
                else:
                    mask &= by_key
            entries = np.flatnonzero(mask)
            maybe_dup: set = set()
            if len(dup_hashes) and not skips:
                maybe_dup = set(t.offsets[entries[np.isin(t.hashes[entries], dup_hashes)]].tolist())
            yield t, entries, maybe_dup

    def _iter_frames(self, shards, on_corrupt: str, *, skips: bool = False, slice_=None
                     ) -> Iterator[tuple[Path, int, bytes, int, int, dict, int]]:
        """``(path, offset, buf, pos, length, meta, after_meta)`` of the selected frames, deduplicated."""
        claimed: set[str] = set()  # keys of possible duplicates only
        for table, entries, maybe_dup in self._plan(shards, on_corrupt, skips=skips, slice_=slice_):
            for offset, buf, pos, length in _read_entries(table.path, table, entries, on_corrupt):
                meta, after = decode_meta(buf, pos)
                if offset in maybe_dup:
                    if meta["key"] in claimed:
                        _warn_duplicate(meta["key"], table.path, offset)
                        continue
                    claimed.add(meta["key"])
                yield table.path, offset, buf, pos, length, meta, after

    # -- iteration
    def iter_records(self, shards: Iterable[int] | None = None, *, on_corrupt: str = "raise") -> Iterator[dict]:
        """Every record (skip markers and superseded records left out), file by file, in write order."""
        for _, _, buf, pos, _, meta, after in self._iter_frames(shards, on_corrupt):
            yield decode_record(buf, pos, meta, after)

    __iter__ = iter_records

    def iter_slice(self, index: int, count: int, by: str = "class", *, on_corrupt: str = "raise"
                   ) -> Iterator[dict]:
        """The records of slice ``index`` of ``count`` disjoint slices covering the output.

        ``by="class"``: whole classes, balanced as ``data.imagenet.shard`` balances them
        (see the module docstring); ``by="image"`` (or ``"key"``): ``key_hash(key) % count == index``
        (``store/sharding.py``).
        Streams: memory is one shard file's key table plus 8 bytes per record for one pass.
        """
        by = check_shard(index, count, by)
        for _, _, buf, pos, _, meta, after in self._iter_frames(None, on_corrupt, slice_=(index, count, by)):
            yield decode_record(buf, pos, meta, after)

    def slice_size(self, index: int, count: int, by: str = "class", *, on_corrupt: str = "raise") -> int:
        """How many records ``iter_slice(index, count, by)`` yields, from the key tables alone
        (no record is read; cheap enough for a progress total). A key written to two files
        counts twice here (the iteration keeps one)."""
        by = check_shard(index, count, by)
        return sum(len(entries) for _, entries, _ in self._plan(None, on_corrupt, slice_=(index, count, by)))

    def iter_keys(self, shards: Iterable[int] | None = None, *, on_corrupt: str = "raise") -> Iterator[str]:
        """Record keys without decoding values (cheap)."""
        for *_, meta, _ in self._iter_frames(shards, on_corrupt):
            yield meta["key"]

    def keys(self) -> list[str]:
        return list(self.iter_keys())

    def __len__(self) -> int:
        return sum(1 for _ in self.iter_keys())

    def skipped(self, shards: Iterable[int] | None = None) -> dict[str, str]:
        """Keys that were skipped (their newest frame is a skip marker), with their reasons."""
        return {meta["key"]: meta["skip"] for *_, meta, _ in self._iter_frames(shards, "raise", skips=True)}

    # -- lookup
    def refresh(self) -> None:
        """Forget the lookup index; the next lookup sees records written since."""
        self._index = None
        self.close()

    def _build_index(self) -> dict:
        paths, hashes, files, offsets, lengths = [], [], [], [], []
        for t in self._tables(self.shard_paths(), "raise"):
            rec = t.is_record
            hashes.append(t.hashes[rec])
            offsets.append(t.offsets[rec])
            lengths.append(t.lengths[rec])
            files.append(np.full(int(rec.sum()), len(paths), dtype=np.uint16))
            paths.append(t.path)
        if not hashes:
            empty = np.zeros(0, np.uint64)
            return {"paths": [], "hashes": empty, "files": np.zeros(0, np.uint16), "offsets": empty,
                    "lengths": np.zeros(0, np.uint32)}
        h = np.concatenate(hashes)
        order = np.argsort(h, kind="stable")  # equal hashes stay in file order: first file wins
        return {"paths": paths, "hashes": h[order], "files": np.concatenate(files)[order],
                "offsets": np.concatenate(offsets)[order], "lengths": np.concatenate(lengths)[order]}

    @property
    def index_nbytes(self) -> int:
        """Bytes held by the lookup index (built if needed)."""
        if self._index is None:
            self._index = self._build_index()
        return sum(v.nbytes for k, v in self._index.items() if k != "paths")

    def _locate(self, key: str) -> tuple[bytes, dict, int] | None:
        """``(frame bytes, meta, end of meta)`` of the record of ``key``, or None."""
        if self._index is None:
            self._index = self._build_index()
        idx = self._index
        hashes = idx["hashes"]
        h = key_hash(key)
        i = int(hashes.searchsorted(np.uint64(h)))
        while i < len(hashes) and hashes[i].item() == h:
            path = idx["paths"][idx["files"][i].item()]
            offset, length = idx["offsets"][i].item(), idx["lengths"][i].item()
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            data = pread_exact(fd, FRAME_HEADER_SIZE + length, offset)
            if len(data) < FRAME_HEADER_SIZE + length:
                raise CorruptShardError(path, offset, "file shrank since the index was built")
            magic, n, crc = FRAME_HEADER.unpack_from(data, 0)
            if magic != MAGIC or n != length or zlib.crc32(memoryview(data)[FRAME_HEADER_SIZE:]) != crc:
                raise CorruptShardError(path, offset, "record changed since the index was built")
            meta, after = decode_meta(data, FRAME_HEADER_SIZE)
            if meta["key"] == key:
                return data, meta, after
            i += 1
        return None

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._locate(key) is not None

    def get(self, key: str) -> dict:
        """One record by key (an index of all shards is built on first use, see ``refresh``)."""
        found = self._locate(key)
        if found is None:
            raise KeyError(f"{key!r} is not in {self.path}")
        data, meta, after = found
        return decode_record(data, FRAME_HEADER_SIZE, meta, after)

    # -- following an output while it is written
    def closed_shards(self) -> set[int]:
        """Shard indices whose files all have a summary (written at close) and no writer now
        (a rerun reopening a closed shard holds its lock while the old summary is still there)."""
        files: dict[int, list[Path]] = {}
        for i, _, p in self._shard_files():
            files.setdefault(i, []).append(p)
        return {i for i, paths in files.items() if all(_file_closed(p) for p in paths)}

    def iter_file_from(self, path: str | os.PathLike, offset: int = 0) -> Iterator[tuple[int, dict | None]]:
        """``(end offset, record)`` of each complete frame of one shard file (see
        ``shard_paths()``) from byte ``offset`` on (0, or an end offset yielded before);
        ``record`` is None for a skip marker. For readers that follow a file while its
        writer appends: raw frames in write order (a superseding frame comes again)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            scan = ShardScan(Path(path), fd, os.fstat(fd).st_size, start=offset, tail_log_level=logging.DEBUG)
            for frame_offset, buf, pos, length in scan:
                meta, after = decode_meta(buf, pos)
                record = None if "skip" in meta else decode_record(buf, pos, meta, after)
                yield frame_offset + FRAME_HEADER_SIZE + length, record
        finally:
            os.close(fd)

    # -- counts
    def summary(self) -> dict:
        """Totals over the shard files' summaries (whole files, not one run): records, skip
        markers and bad records by reason. A shard index with a file without summary (running,
        crashed) or without any file (not started) is listed in ``shards_missing_summary``."""
        total = {"stage": self.stage, "num_shards": self.num_shards, "shards_closed": 0,
                 "shards_missing_summary": [], "records": 0, "skipped": {}, "bad": {}, "bytes": 0,
                 "status": {}}
        files: dict[int, list[Path]] = {}
        for i, _, p in self._shard_files():
            files.setdefault(i, []).append(p)
        for i in range(self.num_shards):
            paths = files.get(i) or [self.shard_path(i)]
            complete = True
            for p in paths:
                try:
                    s = json.loads(p.with_name(p.name[:-len(".rec")] + ".summary.json").read_text())
                except FileNotFoundError:
                    complete = False
                    continue
                total["records"] += s["records"]
                total["bytes"] += s["bytes"]
                for field in ("skipped", "bad"):
                    for reason, n in s.get(field, {}).items():
                        total[field][reason] = total[field].get(reason, 0) + n
                total["status"][s["status"]] = total["status"].get(s["status"], 0) + 1
            if complete:
                total["shards_closed"] += 1
            else:
                total["shards_missing_summary"].append(i)
        total["skipped"] = dict(sorted(total["skipped"].items()))
        total["bad"] = dict(sorted(total["bad"].items()))
        return total

    def __repr__(self) -> str:
        return f"RecordStore({str(self.path)!r}, stage={self.stage!r}, num_shards={self.num_shards})"


def _file_closed(path: Path) -> bool:
    if not path.with_name(path.name[:-len(".rec")] + ".summary.json").exists():
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        return not writer_active(fd)
    finally:
        os.close(fd)


def check_store(store) -> RecordStore:
    if isinstance(store, RecordStore):
        return store
    if isinstance(store, (str, os.PathLike)):
        return RecordStore(store)
    raise StoreError(f"expected a RecordStore or an output directory, got {type(store).__name__}")
