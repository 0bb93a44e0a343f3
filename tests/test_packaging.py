"""The package as a user installs it: a wheel that carries ``configs/`` and runs from anywhere."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, run_entry

pytestmark = pytest.mark.integration

SOURCES = ("setup.py", "MANIFEST.in", "README.md", "part_distillation", "configs")


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> Path:
    """The project's wheel, built from a copy of the sources and unpacked as a site folder."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    for name in SOURCES:
        source = REPO_ROOT / name
        if not source.exists():
            continue
        if source.is_dir():
            shutil.copytree(source, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, src / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(work / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (work / "dist").glob("part_distillation-*.whl")
    site = work / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


def _outside_env(site: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    return env


def test_wheel_carries_every_config_file(installed_wheel):
    shipped = {p.relative_to(installed_wheel / "part_distillation" / "configs")
               for p in (installed_wheel / "part_distillation" / "configs").rglob("*.yaml")}
    in_source = {p.relative_to(REPO_ROOT / "configs") for p in (REPO_ROOT / "configs").rglob("*.yaml")}
    assert shipped == in_source and Path("config.yaml") in shipped


def test_installed_package_composes_a_stage_config_outside_the_source_tree(installed_wheel, tmp_path):
    env = _outside_env(installed_wheel)
    where = subprocess.run([sys.executable, "-c", "import part_distillation.__main__ as m; "
                            "print(m.__file__); print(m.config_dir())"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr[-3000:]
    module_file, config_dir = where.stdout.split()
    assert Path(module_file).is_relative_to(installed_wheel)
    assert Path(config_dir) == installed_wheel / "part_distillation" / "configs"

    shown = run_entry("--cfg", "job", "stage=dense_crf", f"paths.root={tmp_path}", cwd=tmp_path, env=env)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "name: dense_crf" in shown.stdout and "gt_prob: 0.7" in shown.stdout
    assert not list(tmp_path.glob("outputs"))  # --cfg composes only
