"""The manifest of a stage output: what made it, and the check every later job makes.

The first writer creates ``manifest.json`` (stage, resolved config, fingerprint, code
version, shard count, time) atomically; later writers compare. A different config is
refused naming the differing dotted keys. Keys matching :data:`DEFAULT_IGNORE_KEYS`
(where and how a job runs, not what it computes; the one list of them) or the caller's
``ignore_keys`` do not count. A different shard count is always refused.

``overwrite_config=True`` starts the output afresh: the old output directory is moved
aside to ``<output>.old-<UTC timestamp>`` (said in the log) and a new one is created, so
no record made under the old config is ever read under the new manifest. Jobs that
start together agree: the move happens under a lock on the parent directory, and a job
that finds the manifest already rewritten to its config just joins the new output.
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
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from part_distillation.store.errors import ConfigMismatchError, ShardCountMismatchError, StoreError
from part_distillation.store.files import atomic_write_bytes, fsync_dir, manifest_path, write_tmp
from part_distillation.store.framing import FORMAT

logger = logging.getLogger("part_distillation.store")

#: Config keys (dotted ``fnmatch`` patterns) never counted in the fingerprint: where and
#: how a job runs, not what it computes (the shard count is checked on its own). Added
#: to the caller's ``ignore_keys``; stored in the manifest.
DEFAULT_IGNORE_KEYS: tuple[str, ...] = (
    "hydra", "launcher", "paths", "experiment", "log_level", "overwrite_config",
    "shard.index", "shard.count", "stage.progress_every", "stage.input", "stage.output",
    "stage.redo_changed", "stage.workers", "model.device", "model.allow_tiny",
)


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Package version plus the git commit (``0.1.0+g1a2b3c4``, ``.dirty`` if modified)."""
    from part_distillation import __version__

    repo = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty=.dirty",
                              "--abbrev=12", "--match", "NO_TAGS"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return __version__
    commit = out.stdout.strip()
    return f"{__version__}+g{commit}" if out.returncode == 0 and commit else __version__


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




def _link_new(tmp: Path, path: Path) -> bool:
    """Create ``path`` from the complete file ``tmp`` unless it exists; True if created."""
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:  # no hard links on this file system: replace unless present
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if path.exists():
            return False
        os.replace(tmp, path)
        return True


def _differences(existing: dict, stage: str, config: dict, ignore_keys: list) -> tuple[list[str], list[str]]:
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
    return diff, problems


def move_aside(output_dir: Path) -> Path:
    """Rename ``output_dir`` to ``<output_dir>.old-<UTC timestamp>`` (a free name); returns it."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = output_dir.with_name(f"{output_dir.name}.old-{stamp}")
    n = 1
    while target.exists():
        target = output_dir.with_name(f"{output_dir.name}.old-{stamp}-{n}")
        n += 1
    os.rename(output_dir, target)
    fsync_dir(output_dir.parent)
    return target


def ensure_manifest(output_dir: str | os.PathLike, *, stage: str, config: Mapping[str, Any],
                    num_shards: int, code_version: str, ignore_keys: Iterable[str] = (),
                    overwrite_config: bool = False) -> dict:
    """Create the output's manifest, or check that it matches this run; returns it.

    Safe with many jobs starting at once: the file is created with ``os.link`` of a
    complete temporary file, so exactly one job creates it and the rest compare. With
    ``overwrite_config=True`` a differing output is moved aside and started afresh.
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
    data = (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode()
    path = manifest_path(output_dir)
    tmp = write_tmp(path, data)
    try:
        if _link_new(tmp, path):
            fsync_dir(output_dir)
            logger.info("created %s (stage %s, %d shards)", path, stage, num_shards)
            return manifest
        existing = read_manifest(output_dir)
        diff, problems = _differences(existing, stage, config, ignore_keys)
        refusal = _refusal(output_dir, existing, num_shards, diff, problems, overwrite_config)
        if refusal is not None:
            raise refusal
        if not problems:
            if existing.get("code_version") != code_version:
                logger.info("%s was created by code %s, this run is %s", output_dir,
                            existing.get("code_version"), code_version)
            return existing
    finally:
        if tmp.exists():
            tmp.unlink()
    return _start_afresh(output_dir, manifest, data, diff)


def _refusal(output_dir: Path, existing: dict, num_shards: int, diff: list[str], problems: list[str],
             overwrite_config: bool, count_key: str = "num_shards") -> StoreError | None:
    """The one rule of what :func:`ensure_manifest` refuses (None: it writes into the output);
    ``count_key``: what the caller calls the shard count."""
    if problems and overwrite_config:
        return None  # moved aside and started afresh
    if existing.get("num_shards") != num_shards:
        return _shard_count_error(output_dir, existing, num_shards, count_key)
    if problems:
        return ConfigMismatchError(
            f"{output_dir} was made with a different config; differing keys: {', '.join(diff) or 'stage'}\n  "
            + "\n  ".join(problems)
            + "\nUse a new output directory, or start this one afresh with overwrite_config=True "
              "(overwrite_config=true on the command line: the old output is moved aside to "
              f"{output_dir.name}.old-<time>, nothing is deleted)")
    return None


def check_manifest(output_dir: str | os.PathLike, *, stage: str, config: Mapping[str, Any], num_shards: int,
                   ignore_keys: Iterable[str] = (), overwrite_config: bool = False,
                   count_key: str = "num_shards") -> str | None:
    """Why :func:`ensure_manifest` would refuse this run's output, as one line, or None; reads only.

    For checks before any job starts (nothing is created); the wording is the refusal's own,
    the shard count named ``count_key`` (the caller's setting, e.g. ``shard.count``).
    """
    output_dir = Path(output_dir)
    if not manifest_path(output_dir).is_file():
        return None
    try:
        existing = read_manifest(output_dir)
    except StoreError as err:
        return one_line(err)
    diff, problems = _differences(existing, stage, _normalise_config(config), list(ignore_keys))
    refusal = _refusal(output_dir, existing, num_shards, diff, problems, overwrite_config, count_key)
    return None if refusal is None else one_line(refusal)


def one_line(error: BaseException) -> str:
    """An error's message on one line (its lines joined with '; ')."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


def _shard_count_error(output_dir: Path, existing: dict, num_shards: int,
                       count_key: str = "num_shards") -> ShardCountMismatchError:
    return ShardCountMismatchError(
        f"{output_dir} was made with {count_key}={existing.get('num_shards')}, this run asks for "
        f"{count_key}={num_shards}; shard files would overlap. Use {count_key}="
        f"{existing.get('num_shards')} or a new output directory")


def _start_afresh(output_dir: Path, manifest: dict, data: bytes, diff: list[str]) -> dict:
    """Move a differing output aside and create it anew, once among jobs starting together."""
    parent_fd = os.open(output_dir.parent, os.O_RDONLY)
    try:
        fcntl.flock(parent_fd, fcntl.LOCK_EX)
        try:
            existing = read_manifest(output_dir) if manifest_path(output_dir).exists() else None
            if existing is not None and existing.get("config_fingerprint") == manifest["config_fingerprint"] \
                    and existing.get("stage") == manifest["stage"] \
                    and existing.get("num_shards") == manifest["num_shards"]:
                return existing  # another job of this run already started the output afresh
            if output_dir.exists():
                old = move_aside(output_dir)
                logger.warning("overwrite_config=true: %s was made with another config (differing: %s); "
                               "moved it aside to %s and starting the output afresh",
                               output_dir, ", ".join(diff) or "stage", old)
            output_dir.mkdir(parents=True)
            atomic_write_bytes(manifest_path(output_dir), data)
            return manifest
        finally:
            fcntl.flock(parent_fd, fcntl.LOCK_UN)
    finally:
        os.close(parent_fd)
