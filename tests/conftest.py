"""Shared test fixtures.

Resources a test cannot create itself (the upstream reference fixtures, a SLURM cluster)
make the test skip with a reason on a user's machine; under ``CI=true`` a missing
resource fails the test instead, so CI can never pass by skipping.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def require(condition: bool, reason: str) -> None:
    """Skip (or, under CI=true, fail) when a needed resource is missing."""
    if condition:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"required under CI=true: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The folder with the upstream reference data (``shared/reference``)."""
    env = os.environ.get("PD_REFERENCE_DIR")
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "reference"
    require((path / "models" / "README.md").is_file(),
            f"reference fixtures not found at {path} (set PD_REFERENCE_DIR)")
    return path


@pytest.fixture(scope="session")
def reference_models(reference_dir: Path) -> Path:
    return reference_dir / "models"
