"""Helpers shared by tests (plain functions; fixtures live in ``conftest.py``)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_entry(*args: str, cwd: str | Path = REPO_ROOT, check: bool = False, timeout: float = 180,
              **kw) -> subprocess.CompletedProcess:
    """Run ``python -m part_distillation *args`` as a user would; output captured as text.

    ``check=True`` raises on a non-zero exit with the tail of stderr in the message.
    """
    result = subprocess.run([sys.executable, "-m", "part_distillation", *args], cwd=cwd,
                            capture_output=True, text=True, timeout=timeout, **kw)
    if check and result.returncode != 0:
        raise AssertionError(f"part_distillation {' '.join(args)} exited {result.returncode}:\n"
                             f"{result.stderr[-3000:]}")
    return result
