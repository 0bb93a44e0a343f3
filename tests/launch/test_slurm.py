"""The pipeline's SLURM submission without a cluster: a fake ``sbatch``/``squeue`` checks the
plan, the dependencies, the ledger and the resume (the real cluster: tests/reliability/)."""
from __future__ import annotations

from pathlib import Path

import pytest

from part_distillation.data.synthetic import make_synthetic_dataset
from part_distillation.launch import dag, slurm
from tests.launch.plans import close_shard, compose, make_plan


class FakeSlurm:
    """Stands in for sbatch/squeue: numbers the submissions, remembers what each waits for."""

    def __init__(self, first_id: int = 100):
        self.next_id = first_id
        self.calls: list[tuple[str, list[int], list[str]]] = []
        self.queue: list[tuple[str, str, str]] = []

    def submit(self, stage, shards, dependencies):
        self.calls.append((stage.name, list(shards), list(dependencies)))
        job_id, self.next_id = str(self.next_id), self.next_id + 1
        return job_id, stage.kind == "sharded" and stage.shards > 1

    def squeue(self, names):
        return list(self.queue)


STAGES5 = ["synthetic_data", "index", "detic_labeling", "pixel_grouping", "dense_crf"]


def test_slurm_submission_waits_for_the_stages_each_reads_and_resumes_only_what_is_missing(tmp_path):
    cfg = compose(tmp_path, "stage=pipeline", "stage.launcher=slurm")
    planned = make_plan(tmp_path, STAGES5, {"detic_labeling": 3, "dense_crf": 2})
    # every stage reads data.root, which synthetic_data writes
    assert [p.after for p in planned] == [[], ["synthetic_data"], ["synthetic_data"], ["synthetic_data", "detic_labeling"],
                                          ["synthetic_data", "pixel_grouping"]]
    fake = FakeSlurm()
    summary = slurm.submit(cfg, planned, submit_fn=fake.submit, queue_fn=fake.squeue)
    # everything at once: synthetic 100, index 101, detic 102 (array of 3), grouping 103, dense CRF 104 (array of 2)
    assert fake.calls == [("synthetic_data", [0], []), ("index", [0], ["100"]), ("detic_labeling", [0, 1, 2], ["100"]),
                           ("pixel_grouping", [0], ["100", "102"]), ("dense_crf", [0, 1], ["100", "103"])]
    assert summary.extra["submitted"] == {"synthetic_data": "100", "index": "101", "detic_labeling": "102",
                                          "pixel_grouping": "103", "dense_crf": "104"}
    ledger = slurm.read_ledger(cfg.stage.output)
    assert [(e["stage"], e["job_id"], e["array"], e["shards"]) for e in ledger][2] == ("detic_labeling", "102", True,
                                                                                     [0, 1, 2])

    # then: stages 1-2 complete, detic shards 0 and 2 closed, shard 1 still running, the rest cancelled
    by_name = {p.name: p for p in planned}
    make_synthetic_dataset(by_name["synthetic_data"].run.data.root, num_classes=2, images_per_class=3, size=48)
    dag.write_marker(cfg.stage.output, by_name["synthetic_data"])
    close_shard(by_name["index"], 0)
    close_shard(by_name["detic_labeling"], 0)
    close_shard(by_name["detic_labeling"], 2)
    fake.calls.clear()
    fake.queue = [("102", "1", "RUNNING")]
    slurm.submit(cfg, planned, submit_fn=fake.submit, queue_fn=fake.squeue)
    assert fake.calls == [("pixel_grouping", [0], ["102_1"]), ("dense_crf", [0, 1], ["105"])]

    # detic shard 1 failed (its summary says so) and left the queue: that shard alone is resubmitted
    close_shard(by_name["detic_labeling"], 1, status="error: RuntimeError")
    fake.calls.clear()
    fake.queue = []
    slurm.submit(cfg, planned, submit_fn=fake.submit, queue_fn=fake.squeue)
    assert fake.calls[0] == ("detic_labeling", [1], [])
    assert [c[0] for c in fake.calls] == ["detic_labeling", "pixel_grouping", "dense_crf"]
    assert fake.calls[1][2] == ["107"] and fake.calls[2][2] == ["108"]

    # jobs of this pipeline in the queue that the ledger does not know: refused, nothing submitted
    (Path(cfg.stage.output) / "submissions.json").unlink()
    fake.calls.clear()
    fake.queue = [("108", "", "RUNNING")]
    with pytest.raises(Exception, match="108 of this pipeline .* not in"):
        slurm.submit(cfg, planned, submit_fn=fake.submit, queue_fn=fake.squeue)
    assert fake.calls == []


def test_slurm_launcher_without_slurm_tools_says_so_before_anything(tmp_path, monkeypatch):
    monkeypatch.setattr(slurm.shutil, "which", lambda tool: None)
    cfg = compose(tmp_path, "stage=pipeline", "stage.launcher=slurm")
    with pytest.raises(Exception, match="SLURM tools"):
        slurm.submit(cfg, make_plan(tmp_path, ["synthetic_data"]))
    assert not (tmp_path / "outputs" / "pipeline" / "submissions.json").exists()


def test_the_error_line_of_a_job_log_is_its_last_error_without_the_exception_path():
    log = ("[index] 3 done\nTraceback (most recent call last):\n"
           "part_distillation.launch.local.JobFailed: part_distillation: job failed: /x/shard.rec: the disk is full\n"
           "srun: error: node1: task 0: Exited with exit code 1\n")
    assert slurm.last_error_line(log) == "part_distillation: job failed: /x/shard.rec: the disk is full"
    assert slurm.last_error_line("all good\nfinished\n") == "finished"


def test_queued_jobs_and_accounting_map_to_the_shards_of_the_ledger(monkeypatch):
    ledger = [{"job_id": "7", "array": True, "shards": [2, 5]}, {"job_id": "9", "array": False, "shards": [1]},
              {"job_id": "11", "array": False, "shards": [5]}]  # shard 5 resubmitted alone
    assert slurm.active_shards(ledger, [("7", "1", "RUNNING"), ("9", "", "PENDING"), ("3", "", "RUNNING")]) == {
        5: ("7_1", "RUNNING"), 1: ("9", "PENDING")}

    class Done:
        returncode = 0
        stdout = ("7_0|FAILED|2026-12-07T10:00:00\n7_1|COMPLETED|2026-12-07T10:00:00\n"
                  "9|CANCELLED by 0|Unknown\n11|COMPLETED|2026-12-07T11:00:00\n")

    asked = []
    monkeypatch.setattr(slurm.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(slurm.subprocess, "run", lambda cmd, **kw: asked.append(cmd) or Done())
    assert slurm.sacct_states(ledger) == {2: ("7_0", "FAILED", True), 5: ("11", "COMPLETED", True),
                                          1: ("9", "CANCELLED", False)}
    assert asked[0][:2] == ["sacct", "-n"] and "7,9,11" in asked[0]
