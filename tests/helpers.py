"""Helpers shared by tests (plain functions; fixtures live in ``conftest.py``)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


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
