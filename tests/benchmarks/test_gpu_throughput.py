"""benchmarks/gpu_throughput.py runs every section end to end on the CPU (``--dry-run``)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_throughput.py"
ROWS = ("stage4", "stage6", "detic", "grouping", "cpu_model train", "cpu_model infer")


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--threads", "1", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_dry_run_prints_every_section_with_figures(tmp_path):
    # The tiny demo model stands in for the CPU model, so its rows are measured in any version.
    out = tmp_path / "figures.json"
    proc = _run("--cpu-model", "tiny", "--steps", "1", "--out", str(out))
    lines = proc.stdout.splitlines()
    assert "dry-run (CPU, tiny)" in proc.stdout
    for section in ROWS:
        pattern = re.compile(rf"^{re.escape(section)}\s+.*\s(\d+)\s+(\d+x\d+)\s+(\d+\.\d+)\s+(\d+\.\d+)\s")
        matches = [m for m in map(pattern.match, lines) if m]
        assert len(matches) == 1, (section, proc.stdout)
        assert float(matches[0].group(3)) > 0  # images/s
    rows = {r["section"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == set(ROWS)
    for section in ROWS:
        assert rows[section]["images_per_s"] > 0 and rows[section]["steps"] >= 1, rows[section]
        assert rows[section]["peak_gb"] >= 0, rows[section]
    assert rows["stage6"]["model"].endswith("3x8+1")  # the object-conditioned head, K = 8
    last = lines[-1]
    assert last.startswith("GPU mode=dry-run ") and "=na" not in last, last
    figures = dict(field.split("=") for field in last.split()[1:])
    assert float(figures["stage4_images_per_s"]) == round(rows["stage4"]["images_per_s"], 2)
    assert float(figures["cpu_model_infer_images_per_s"]) > 0


def test_unknown_cpu_model_is_reported_not_available():
    proc = _run("--sections", "cpu_model", "--cpu-model", "no_such_model")
    rows = [line for line in proc.stdout.splitlines() if line.startswith("cpu_model")]
    assert len(rows) == 2 and all("not available in this version (model 'no_such_model')" in r for r in rows), \
        proc.stdout
    assert "cpu_model_train_images_per_s=na" in proc.stdout.splitlines()[-1]
