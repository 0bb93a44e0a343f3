"""Shared test fixtures, and the one rule for tests that need something optional.

The rule (every skip in tests/ goes through it): a test that needs a resource it cannot
create itself declares the resource's kind, with the marker
``@pytest.mark.requires("cuda")`` or, inside a fixture or a test, with
``require(kind, available, reason)``. When the resource is missing the test skips with
a reason that says how to provide it, except where the environment promises the
resource: then a missing resource fails the test, so a run that promises it can never
pass by skipping.

==========  ==========================================  ===============================
kind        resource                                    promised (missing = failure)
==========  ==========================================  ===============================
reference   upstream reference fixtures                 ``CI=true``
            (``../shared/reference`` or
            ``$PD_REFERENCE_DIR``)
slurm       a running SLURM test cluster                ``CI=true``
            (``tools/slurm_test_cluster.sh start``)
cuda        a CUDA GPU                                  ``CI_GPU=true`` (a GPU runner)
==========  ==========================================  ===============================

A CUDA test can only run where a GPU exists: ``CI=true`` alone does not promise one
(CI's CPU runners skip the CUDA tests with a reason); a GPU runner sets ``CI_GPU=true``
and then a missing GPU fails. Python packages the project installs (``setup.py``) are
never optional: tests import them directly.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

from tests import tiers

REPO_ROOT = Path(__file__).resolve().parents[1]

# Thread settings, once for every test and the processes tests start: at most 2 threads
# (the CI machine's cores), so concurrent tests and child jobs do not oversubscribe them.
TEST_THREADS = str(min(2, os.cpu_count() or 1))
for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, TEST_THREADS)

# The reliability suite runs apart (``make reliability``, tests/reliability/conftest.py).
collect_ignore = [] if os.environ.get("PD_RELIABILITY") == "1" else ["reliability"]

# kind -> (environment variable that promises it, what to do when it is missing)
KINDS = {
    "reference": ("CI", "set PD_REFERENCE_DIR to the reference fixtures"),
    "slurm": ("CI", "start one with `tools/slurm_test_cluster.sh start`"),
    "cuda": ("CI_GPU", "run on a machine with a CUDA GPU"),
}


def promised(kind: str) -> bool:
    """Whether this environment promises ``kind`` (a missing one then fails the test)."""
    if kind not in KINDS:
        raise ValueError(f"unknown resource kind {kind!r}; known: {', '.join(KINDS)} (tests/conftest.py)")
    return os.environ.get(KINDS[kind][0], "").lower() == "true"


def require(kind: str, available: bool, reason: str) -> None:
    """Skip the test when ``kind`` is not available, or fail where it is promised."""
    promise = promised(kind)  # checks the kind even when the resource is there
    if available:
        return
    if promise:
        pytest.fail(f"required under {KINDS[kind][0]}=true: {reason}")
    pytest.skip(f"needs {kind}: {reason}")


def reference_path() -> Path:
    env = os.environ.get("PD_REFERENCE_DIR")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "reference"


@functools.lru_cache(maxsize=None)
def probe(kind: str) -> tuple[bool, str]:
    """(available, reason when not) for a kind; probed once per session."""
    promised(kind)
    if kind == "cuda":
        import torch

        return torch.cuda.is_available(), "torch sees no CUDA device; " + KINDS[kind][1]
    if kind == "reference":
        path = reference_path()
        return (path / "models" / "README.md").is_file(), f"reference fixtures not found at {path}; {KINDS[kind][1]}"
    from tests.slurm_cluster import probe_cluster

    info, why = probe_cluster()
    return info is not None, why


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The integration tier is decided from the code (tests/tiers.py), not by hand."""
    tiers.mark_integration(items)


def fast_tier(config: pytest.Config) -> bool:
    """Whether this run leaves the integration tier out (``make test-fast``)."""
    return "not integration" in (config.option.markexpr or "")


@pytest.fixture(autouse=True)
def _tier_guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """In the fast tier a test that starts a subprocess, a stage job or a training loop fails."""
    if fast_tier(request.config) and not request.node.get_closest_marker("integration"):
        tiers.guard(monkeypatch, request.node.nodeid)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Apply the rule to ``@pytest.mark.requires(kind, ...)``."""
    for marker in item.iter_markers(name="requires"):
        if not marker.args:
            raise ValueError(f"{item.nodeid}: @pytest.mark.requires needs a kind ({', '.join(KINDS)})")
        for kind in marker.args:
            require(kind, *probe(kind))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The folder with the upstream reference data (``shared/reference``)."""
    require("reference", *probe("reference"))
    return reference_path()


@pytest.fixture(scope="session")
def reference_models(reference_dir: Path) -> Path:
    return reference_dir / "models"
