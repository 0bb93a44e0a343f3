"""The demo pipeline at test size, run as a user runs it, and what two runs' outputs are compared on.

Shared by the reliability tests (``test_kills``, ``test_bad_inputs``); the uninterrupted
run is the session fixture ``uninterrupted`` (``conftest.py``).
"""
from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from part_distillation.store import FRAME_HEADER_SIZE, RecordStore, scan_file
from tests.helpers import REPO_ROOT, TRAIN_HALVES_EVALUATION

STAGES = ["synthetic_data", "index", "detic_labeling", "pixel_grouping", "dense_crf", "proposal_learning",
          "part_ranking", "part_distillation", "evaluate"]
#: The demo shrunk to seconds per stage: 2 classes x 3 images; 30 proposal iterations (fewer
#: leave part ranking no confident proposal to cluster), K=2 part classes, 6 distillation
#: iterations; checkpoints every few iterations so that kills land between and on them.
OVERRIDES = ("stage.overrides=["
             "'synthetic_data:stage.classes=2','synthetic_data:stage.images_per_class=3',"
             "'proposal_learning:stage.max_iter=30','proposal_learning:stage.steps=[25]',"
             "'proposal_learning:stage.checkpoint_period=10','proposal_learning:stage.deterministic=true',"
             "'part_ranking:stage.num_clusters=2',"
             "'part_distillation:stage.parts_per_class=2','part_distillation:stage.max_iter=6',"
             "'part_distillation:stage.steps=[5]','part_distillation:stage.checkpoint_period=3',"
             "'part_distillation:stage.deterministic=true',"
             "'evaluate:stage.predictors=[proposal,part_distillation,records,strips]'," + TRAIN_HALVES_EVALUATION + "]")
#: The random tiny model (the demo's pretrained CPU model is not what these tests are about:
#: they compare interrupted and uninterrupted runs, and the tiny one keeps them fast).
MODEL = "model=mask2former_tiny"
STAGE_LIST = "stage.stages=[" + ",".join(STAGES) + "]"
STAGE_LINE = re.compile(r"\[pipeline\] stage \d+/\d+ (\w+): started")
RUN_TIMEOUT = 600
#: Training runs (relative to the root) whose last checkpoint's weights are compared.
TRAIN_RUNS = ("outputs/proposal_learning/synthetic_train", "outputs/part_distillation/synthetic_train")
#: Files that legitimately differ from run to run (event files are named by time and pid; saved
#: job summaries hold times and this run's counts).
VOLATILE = re.compile(r"(^|/)\.?(run|tensorboard|summaries)/")


def pipeline_command(root: Path) -> list[str]:
    return [sys.executable, "-m", "part_distillation", "experiment=demo", f"paths.root={root}",
            f"hydra.run.dir={root}/run", MODEL, OVERRIDES, STAGE_LIST]


def child_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}


class PipelineProcess:
    """The pipeline command running in the background; its log lines tell the current stage."""

    def __init__(self, root: Path):
        self.proc = subprocess.Popen(pipeline_command(root), cwd=REPO_ROOT, env=child_env(), text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
        self.stage: str | None = None
        self.entered: dict[str, float] = {}
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            m = STAGE_LINE.search(line)
            if m:
                with self._changed:
                    self.stage = m.group(1)
                    self.entered[self.stage] = time.monotonic()
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for_stage(self, name: str, timeout: float = RUN_TIMEOUT) -> bool:
        """Whether the run entered stage ``name`` (False: it ended first)."""
        with self._changed:
            return self._changed.wait_for(lambda: name in self.entered or not self._reader.is_alive(),
                                          timeout) and name in self.entered

    def kill(self) -> str | None:
        """SIGKILL now; the stage it was in, or None if it had already ended."""
        if self.proc.poll() is not None:
            return None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._reader.join(10)  # every line it wrote before dying: the last stage line is where it was
        return self.stage if self.proc.returncode == -signal.SIGKILL else None

    def finish(self, timeout: float = RUN_TIMEOUT) -> None:
        rc = self.proc.wait(timeout)
        self._reader.join(10)
        assert rc == 0, f"pipeline exited {rc}:\n{''.join(self.lines[-40:])}"

    def tail(self) -> str:
        return "".join(self.lines[-40:])


# --------------------------------------------------------------------------- what is compared

def normalised(value, root: str):
    """A record's value with the run's root replaced by ``<root>`` (runs live in different folders)."""
    if isinstance(value, str):
        return value.replace(root, "<root>")
    if isinstance(value, dict):
        return {k: normalised(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [normalised(v, root) for v in value]
    return value


def same(a, b) -> bool:
    """Exact equality of decoded records: arrays by dtype, shape and bytes; NaN equals NaN."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and a.tobytes() == b.tobytes())
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def difference(a, b, where: str = "") -> str:
    """Where two decoded records first differ (for messages)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{where}/{k}: only in one"
            if not same(a[k], b[k]):
                return difference(a[k], b[k], f"{where}/{k}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if not same(x, y):
                return difference(x, y, f"{where}[{i}]")
    return f"{where}: {a!r:.200} != {b!r:.200}"


def stores(root: Path) -> list[Path]:
    """Every record store under ``root`` (a folder with a manifest and a ``shards/`` folder)."""
    return sorted(p.parent for p in root.rglob("manifest.json") if (p.parent / "shards").is_dir())


def read_store(folder: Path, root: Path) -> tuple[dict, dict]:
    """``(records by key, skip reasons by key)``; raises on any corrupt frame."""
    store = RecordStore(folder)
    try:
        records = {}
        for record in store.iter_records(on_corrupt="raise"):
            assert record["key"] not in records, f"{folder}: key {record['key']} read twice"
            if record.get("mtime") is not None:  # the index's note of its own input file's time
                assert record["mtime"] == os.stat(record["path"]).st_mtime, record["key"]
                record["mtime"] = "<mtime of path>"
            records[record["key"]] = normalised(record, str(root))
        return records, dict(store.skipped())
    finally:
        store.close()


def final_weights(run: Path) -> tuple[str, dict]:
    checkpoints = sorted((run / "checkpoints").glob("model_*.pth"))
    assert checkpoints, f"no checkpoint in {run}"
    return checkpoints[-1].name, torch.load(checkpoints[-1], map_location="cpu", weights_only=True)["model"]


def output_files(root: Path) -> set[str]:
    """The root's files a reader could take as output: not hidden, not a log or event file."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(root).parts[:-1])
            and not p.name.startswith(".") and not VOLATILE.search(str(p.relative_to(root)))}


@dataclass
class Snapshot:
    root: Path
    records: dict = field(default_factory=dict)   # store (relative) -> (records, skipped)
    files: set = field(default_factory=set)
    durations: dict = field(default_factory=dict)  # stage -> seconds in the uninterrupted run

    @classmethod
    def of(cls, root: Path) -> "Snapshot":
        snap = cls(root)
        for folder in stores(root):
            snap.records[str(folder.relative_to(root))] = read_store(folder, root)
        snap.files = output_files(root)
        return snap


def assert_no_torn_frame(root: Path) -> None:
    for shard in root.rglob("*.rec"):
        end = 0
        for offset, _buf, _pos, length in scan_file(shard):
            end = offset + FRAME_HEADER_SIZE + length
        assert end == shard.stat().st_size, f"{shard}: {shard.stat().st_size - end} bytes after the last record"


def assert_partial_output_is_reference(root: Path, reference: Snapshot) -> None:
    """After a kill: every store reopens and reads without error, and every record it holds
    (and every skip) equals the reference's for that key: nothing partial, nothing different."""
    for folder in stores(root):
        name = str(folder.relative_to(root))
        records, skipped = read_store(folder, root)
        ref_records, ref_skipped = reference.records[name]
        for key, record in records.items():
            assert key in ref_records, f"{name}: record {key} is not in the uninterrupted run"
            assert same(record, ref_records[key]), (f"{name}: record {key} differs: "
                                                    f"{difference(record, ref_records[key])}")
        for key, reason in skipped.items():
            assert ref_skipped.get(key) == reason, f"{name}: skip {key} ({reason}) differs"


def assert_same_output(root: Path, reference: Snapshot) -> None:
    """The final output of a killed-and-rerun lineage equals the uninterrupted run's."""
    got = Snapshot.of(root)
    assert got.files == reference.files, (f"files only here: {sorted(got.files - reference.files)}; "
                                          f"only in the reference: {sorted(reference.files - got.files)}")
    assert got.records.keys() == reference.records.keys()
    for name, (records, skipped) in reference.records.items():
        got_records, got_skipped = got.records[name]
        assert got_records.keys() == records.keys(), name
        differ = [k for k in records if not same(got_records[k], records[k])]
        assert not differ, (f"{name}: {len(differ)} records differ from the uninterrupted run, e.g. {differ[0]}: "
                            f"{difference(got_records[differ[0]], records[differ[0]])}" if differ else "")
        assert got_skipped == skipped, name
    assert_no_torn_frame(root)
    # the synthetic dataset, byte for byte (images, annotations, words)
    for rel in sorted(f for f in reference.files if f.startswith("datasets/")):
        assert (root / rel).read_bytes() == (reference.root / rel).read_bytes(), rel
    # json outputs (metrics, centroids, summaries, manifests) up to the root's path
    for rel in sorted(f for f in reference.files if f.endswith(".json") and not f.startswith("datasets/")):
        if rel.endswith(("manifest.json", ".summary.json")):
            continue  # the creating run's time and host; this run's counts
        if rel.startswith("outputs/pipeline/"):
            continue  # the pipeline's bookkeeping: done markers fingerprint the config, paths included
        mine = normalised((root / rel).read_text(), str(root))
        theirs = normalised((reference.root / rel).read_text(), str(reference.root))
        assert mine == theirs, f"{rel} differs from the uninterrupted run"
    for rel in sorted(f for f in reference.files if f.endswith(".npz")):
        a, b = np.load(root / rel), np.load(reference.root / rel)
        assert a.files == b.files and all(same(a[k], b[k]) for k in a.files), rel
    for run in TRAIN_RUNS:
        name, weights = final_weights(root / run)
        ref_name, ref_weights = final_weights(reference.root / run)
        assert name == ref_name and weights.keys() == ref_weights.keys(), run
        differ = [k for k in weights if not torch.equal(weights[k], ref_weights[k])]
        assert not differ, f"{run}/{name}: weights differ bitwise from the uninterrupted run: {differ[:5]}"



def run_uninterrupted(root: Path) -> Snapshot:
    """One run of the pipeline from scratch, with each stage's duration."""
    run = PipelineProcess(root)
    run.finish()
    snap = Snapshot.of(root)
    ends = {s: run.entered[STAGES[i + 1]] for i, s in enumerate(STAGES[:-1])}
    ends[STAGES[-1]] = max(run.entered.values()) + 1.0
    snap.durations = {s: ends[s] - run.entered[s] for s in STAGES}
    return snap
