"""The tier rule of tests/tiers.py: which tests it puts in the integration tier."""
from __future__ import annotations

import subprocess
import sys

import pytest

from part_distillation import launch
from part_distillation.stages import index as index_stage
from tests import tiers
from tests.helpers import run_entry


def _pure():
    return sorted([3, 1, 2])


def _runs_entry_through_a_helper():
    return _calls_entry()


def _calls_entry():
    return run_entry("--help")


def _runs_a_stage(cfg, context):
    return index_stage.run(cfg, context)


def _runs_a_job(cfg):
    return launch.run_job(cfg)


def _trains(baseline):
    return baseline.trainer.train()


def _starts_a_subprocess():
    return subprocess.run([sys.executable, "-c", "pass"], check=True)


def test_pure_code_is_fast():
    assert tiers.reason(_pure) is None


@pytest.mark.parametrize("func, what", [
    (_runs_entry_through_a_helper, "the entry point"),
    (_runs_a_stage, "a stage (index.run)"),
    (_runs_a_job, "a stage job"),
    (_starts_a_subprocess, "a subprocess"),
    (_trains, "a training loop"),
])
def test_calls_reached_through_test_code_make_it_integration(func, what):
    assert tiers.reason(func) == what


def test_a_fixture_that_runs_the_entry_point_makes_its_users_integration():
    assert tiers.reason(_pure, fixtures=[_runs_entry_through_a_helper]) == "the entry point"


def test_the_fast_tier_refuses_what_the_rule_missed(monkeypatch):
    tiers.guard(monkeypatch, "tests/x.py::test_y")
    hidden = getattr(subprocess, "Pop" + "en")  # out of the static rule's sight, on purpose
    with pytest.raises(tiers.TierViolation, match="tests/x.py::test_y starts a subprocess"):
        hidden([sys.executable, "-c", "pass"])
    with pytest.raises(tiers.TierViolation, match="starts a stage job"):
        getattr(launch, "run_" + "job")(None)
