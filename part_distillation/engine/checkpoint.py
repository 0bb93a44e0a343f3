"""Training checkpoints: atomic files, the last few kept, exact resume.

A checkpoint is ``<run_dir>/checkpoints/model_<iteration:07d>.pth`` (``iteration`` = the
number of iterations done), written to a temporary file in the same folder, fsynced,
then ``os.replace``-d into place, so a crash (kill -9 included) during the write leaves
the previous checkpoints intact and at most a stray ``.tmp`` file, which is ignored and
removed by the next save. Files load with ``torch.load(weights_only=True)``: everything in
them is tensors, numbers, strings, lists and dicts (numpy's RNG state is stored as
tensors for that reason).

Contents: ``model``, ``optimizer``, ``scaler``, ``iteration``, ``hooks`` (each hook's
state by name), ``rng`` (one entry per rank: torch CPU/CUDA, numpy, python ``random``).

The run folder's manifest (the store's, ``store.ensure_manifest``) records the config;
a run folder made with another config is refused with the differing keys named.
"""
from __future__ import annotations

import logging
import os
import pickle
import random
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from part_distillation.errors import ConfigError
from part_distillation.state_file import load_tensor_file
from part_distillation.store import code_version, ensure_manifest
from part_distillation.store.files import atomic_open

log = logging.getLogger("part_distillation")

CHECKPOINT_RE = re.compile(r"^model_(\d{7,})\.pth$")


# ------------------------------------------------------------------------- RNG states

def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain numbers (``weights_only``-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss_next": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------- files

def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: str | os.PathLike, iteration: int) -> Path:
    return checkpoint_dir(run_dir) / f"model_{int(iteration):07d}.pth"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, by increasing iteration (temporary files ignored)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = CHECKPOINT_RE.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | os.PathLike, iteration: int | None = None, *, path_key: str = "path",
                       iteration_key: str = "iteration") -> Path:
    """The checkpoint file ``path`` names: the file itself, or in a run folder the newest
    checkpoint (or the one at ``iteration``). Errors are one line naming the setting
    (``path_key``/``iteration_key``: how the caller's config calls them)."""
    path = Path(path)
    if path.is_file():
        if iteration is not None:
            raise ConfigError(f"{iteration_key}={iteration} but {path_key}={path} is a checkpoint file: give its "
                              f"run folder to choose an iteration")
        return path
    found = dict(list_checkpoints(path))
    if not found:
        raise ConfigError(f"no checkpoint under {path_key}={path}/checkpoints: train it first (proposal_learning "
                          f"or part_distillation), or give a checkpoint file")
    if iteration is None:
        return found[max(found)]
    if iteration not in found:
        raise ConfigError(f"{iteration_key}={iteration}: no such checkpoint in {path}/checkpoints "
                          f"(have {sorted(found)})")
    return found[iteration]


def save_atomic(obj: Mapping[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file next to ``path``, fsync, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def remove_stale(run_dir: str | os.PathLike, keep_last: int, period: int | None = None) -> None:
    """Delete all but the ``keep_last`` newest checkpoints, and temporary files of crashed saves.

    With ``period`` (the periodic save interval), ``keep_last`` counts the checkpoints at
    multiples of it only; one saved off the period (a timed save, there for resuming) is
    deleted once a newer checkpoint exists. So timed saves never push a periodic checkpoint
    out: the reference run keeps 40k, 45k, 50k, and part ranking reads the 40k one.
    """
    folder = checkpoint_dir(run_dir)
    for path in folder.glob(".model_*.tmp"):
        path.unlink(missing_ok=True)
    found = list_checkpoints(run_dir)
    if keep_last <= 0 or not found:
        return
    if period:
        periodic = [i for i, _ in found if i % int(period) == 0]
        keep = set(periodic[-keep_last:]) | {found[-1][0]}
    else:
        keep = {i for i, _ in found[-keep_last:]}
    for iteration, path in found:
        if iteration not in keep:
            path.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a training checkpoint safely (``state_file.load_tensor_file``); one-line error if
    unreadable, with what to do about it when resuming."""
    try:
        return load_tensor_file(path, map_location=map_location)
    except (ValueError, pickle.UnpicklingError) as err:  # its two refusals (models.errors), by their bases
        raise RuntimeError(f"cannot read training checkpoint: {err}; or delete it to resume from the "
                           f"previous one") from err


def prepare_run_dir(run_dir: str | os.PathLike, *, stage: str, config: Mapping[str, Any],
                    ignore_keys: Iterable[str] = (), overwrite_config: bool = False) -> dict:
    """Create the run folder's manifest, or check it matches ``config`` (store's rules).

    Raises ``store.ConfigMismatchError`` naming the differing keys, so a run never
    resumes from checkpoints trained with another config.
    """
    return ensure_manifest(run_dir, stage=stage, config=config, num_shards=1,
                           code_version=code_version(), ignore_keys=ignore_keys,
                           overwrite_config=overwrite_config)
