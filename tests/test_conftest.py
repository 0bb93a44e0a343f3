"""The one skip rule of tests/conftest.py: skip with a reason, fail where the resource is promised."""
from __future__ import annotations

import pytest

from tests.conftest import require


@pytest.mark.parametrize("kind, env", [("reference", "CI"), ("slurm", "CI"), ("cuda", "CI_GPU")])
def test_missing_resource_skips_unless_promised(monkeypatch, kind, env):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("CI_GPU", raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"needs {kind}: gone"):
        require(kind, False, "gone")
    monkeypatch.setenv(env, "true")
    with pytest.raises(pytest.fail.Exception, match=f"required under {env}=true: gone"):
        require(kind, False, "gone")
    require(kind, True, "present")  # available: nothing happens


def test_ci_alone_does_not_promise_a_gpu(monkeypatch):
    monkeypatch.setenv("CI", "true")
    monkeypatch.delenv("CI_GPU", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require("cuda", False, "no GPU here")


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="unknown resource kind 'gpu'"):
        require("gpu", True, "typo")


@pytest.mark.requires("cuda")
def test_marker_applies_the_rule():
    import torch

    assert torch.cuda.is_available()  # only runs where the rule found a GPU
