"""The trainer's event store (``engine.events``): how the loop and the hooks exchange numbers."""
import pytest
import torch

from part_distillation.engine import EventStorage, HookBase, PeriodicEval, ProgressLog

from . import toy


def test_put_latest_history_and_one_steps_events():
    storage = EventStorage()
    storage.iter = 0
    storage.put_scalar("total_loss", 2.0)
    storage.put_scalars({"ap": 0.1}, prefix="eval/")
    storage.iter = 1
    storage.put_scalar("total_loss", torch.tensor(1.5))  # a 0-d tensor is stored as a float
    storage.put_scalar("lr", 1e-4, iteration=7)
    assert storage.latest() == {"total_loss": 1.5, "eval/ap": 0.1, "lr": 1e-4}
    assert storage.latest(prefix="eval/") == {"eval/ap": 0.1}
    assert storage.history("total_loss") == [(0, 2.0), (1, 1.5)]
    assert isinstance(storage.history("total_loss")[1][1], float)
    assert storage.history("never") == [] and "never" not in storage and "lr" in storage
    assert storage.put_at(1) == {"total_loss": 1.5}
    assert storage.put_at(0, prefix="eval/") == {"eval/ap": 0.1}
    assert storage.put_at(7) == {"lr": 1e-4}


def test_history_keeps_the_newest_values_only():
    storage = EventStorage(max_history=3)
    for i in range(5):
        storage.put_scalar("x", i, iteration=i)
    assert storage.history("x") == [(2, 2.0), (3, 3.0), (4, 4.0)]
    assert storage.latest() == {"x": 4.0}


class Reader(HookBase):
    """Reads what the loop and PeriodicEval put, as any hook would."""

    def __init__(self):
        self.seen = []

    def after_step(self):
        storage = self.trainer.storage
        self.seen.append((storage.iter, sorted(storage.put_at(self.trainer.iter)), storage.latest().get("eval/ap")))


def test_the_trainer_puts_each_steps_metrics_and_hooks_read_them(tmp_path):
    reader = Reader()

    def evaluate(trainer):
        return {"ap": (trainer.iter + 1) / 10}

    trainer = toy.train(tmp_path, max_iter=4, period=100, extra_hooks=[PeriodicEval(evaluate, period=2), reader])
    step = ["data_time", "grad_norm", "images_per_s", "loss_l1", "loss_mse", "lr", "step_time", "total_loss"]
    assert reader.seen == [(0, step, None), (1, sorted(step + ["eval/ap"]), 0.2), (2, step, 0.2),
                           (3, sorted(step + ["eval/ap"]), 0.4)]
    losses = trainer.storage.history("total_loss")
    assert [i for i, _ in losses] == [0, 1, 2, 3]
    assert trainer.metrics["total_loss"] == losses[-1][1]
    assert sorted(trainer.metrics) == step  # the training scalars only, no eval/ ones
    assert trainer.storage.history("eval/ap") == [(1, 0.2), (3, 0.4)]


def test_the_progress_line_reads_the_store(tmp_path, caplog):
    class Fake(HookBase):  # a number put before ProgressLog reads: the line shows it
        def after_step(self):
            self.trainer.storage.put_scalar("total_loss", 123.0)

    import logging

    with caplog.at_level(logging.INFO, logger="part_distillation"):
        toy.train(tmp_path, max_iter=2, period=100, extra_hooks=[Fake(), ProgressLog(period=2)])
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[train] iter 2/2")]
    assert line and "loss 123.0000" in line[0]


def test_the_store_is_not_part_of_a_checkpoint_and_resume_starts_it_afresh(tmp_path):
    first = toy.train(tmp_path, max_iter=3, period=3)
    assert "storage" not in first.state_dict() and "metrics" not in first.state_dict()
    resumed = toy.train(tmp_path, max_iter=5, period=3)  # resumes at 3
    assert [i for i, _ in resumed.storage.history("total_loss")] == [3, 4]
    assert resumed.metrics["total_loss"] == pytest.approx(resumed.storage.latest()["total_loss"])
