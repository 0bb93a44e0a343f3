"""Helpers shared by tests (plain functions; fixtures live in ``conftest.py``)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
#: ``stage.overrides`` entries (quoted, comma-separated) that score the demo's evaluate on the
#: training images' halves (train_eval, matched on train_match) instead of its held-out
#: images: for demo pipelines at test size that leave out the held-out steps.
TRAIN_HALVES_EVALUATION = ("'evaluate:stage.image_root=${data.root}/train','evaluate:stage.split=train_eval',"
                           "'evaluate:stage.match_split=train_match'")


def run_entry(*args: str, cwd: str | Path = REPO_ROOT, check: bool = False, timeout: float = 180,
              **kw) -> subprocess.CompletedProcess:
    """Run ``python -m part_distillation *args`` as a user would; output captured as text.

    The child imports this checkout's package whatever ``cwd`` is (``REPO_ROOT`` first on
    ``PYTHONPATH``) unless ``env`` is given. ``check=True`` raises on a non-zero exit with
    the tail of stderr in the message.
    """
    if "env" not in kw:
        kw["env"] = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    result = subprocess.run([sys.executable, "-m", "part_distillation", *args], cwd=cwd,
                            capture_output=True, text=True, timeout=timeout, **kw)
    if check and result.returncode != 0:
        raise AssertionError(f"part_distillation {' '.join(args)} exited {result.returncode}:\n"
                             f"{result.stderr[-3000:]}")
    return result


def _env(env: dict | None) -> dict:
    if env is not None:
        return env
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}


def kill_entry_after_first_record(*args: str, shards: str | Path, timeout: float = 600,
                                  env: dict | None = None) -> bool:
    """Start ``python -m part_distillation *args``, SIGKILL it as soon as a shard file in
    the folder ``shards`` holds bytes (a record is being or has been written).

    Returns whether it was killed while still running (False: it ended, or the deadline
    passed, before any record). Callers assert that the kill landed midway.
    """
    proc = subprocess.Popen([sys.executable, "-m", "part_distillation", *args], cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(env))
    shards = Path(shards)
    deadline = time.monotonic() + timeout
    written = False
    while time.monotonic() < deadline and proc.poll() is None and not written:
        written = shards.is_dir() and any(p.stat().st_size > 0 for p in shards.glob("*.rec"))
        if not written:
            time.sleep(0.005)
    running = proc.poll() is None
    proc.kill()  # no error if it already ended
    proc.wait()
    return written and running
