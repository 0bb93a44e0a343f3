"""The job context sits below both ``launch`` and the stages (no import cycle)."""
from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO_ROOT


def test_stages_import_the_context_without_importing_launch():
    # the work stages; the two driver stages (pipeline, status) and the report are launch's front end
    code = ("import sys, part_distillation.stages.index, part_distillation.stages.dense_crf; "
            "assert 'part_distillation.launch' not in sys.modules, 'stages import launch'")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_launch_still_exports_the_same_context_type():
    from part_distillation.context import JobContext
    from part_distillation.launch import JobContext as FromLaunch

    assert FromLaunch is JobContext
    assert JobContext(rank=0).is_main and not JobContext(rank=3, world_size=4).is_main
