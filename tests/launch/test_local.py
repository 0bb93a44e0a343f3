"""One job in this process (``launch/local.py``); ``run_job`` itself: tests/test_main.py and
tests/test_launch_exit.py."""
from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO_ROOT


def test_compose_config_composes_what_the_entry_point_runs_without_importing_it():
    code = ("import sys; from part_distillation.launch import compose_config; "
            "from part_distillation.config import validate; "
            "run = validate(compose_config(['stage=dense_crf', 'paths.root=/scratch/pd'])); "
            "assert type(run.stage).__name__ == 'DenseCRFStageConfig', run.stage; "
            "assert run.stage.output.startswith('/scratch/pd/'), run.stage.output; "
            "assert 'part_distillation.__main__' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
