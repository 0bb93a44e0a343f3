import logging

import pytest

from part_distillation.engine import Checkpointer, PeriodicCheckpoint, PeriodicEval, ProgressLog, hooks
from part_distillation.engine import checkpoint as ckpt

from . import toy


def test_checkpoints_every_period_after_the_last_and_keeps_the_newest(tmp_path):
    toy.train(tmp_path, max_iter=7, period=3)  # saves 3, 6, 7; keep_last=2
    assert [i for i, _ in ckpt.list_checkpoints(tmp_path)] == [6, 7]
    assert ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path, 7))["iteration"] == 7


def test_time_based_checkpoints(tmp_path, monkeypatch):
    clock = iter(range(0, 10_000, 50))  # every call: +50 s
    monkeypatch.setattr(hooks.time, "monotonic", lambda: next(clock))
    hook = PeriodicCheckpoint(Checkpointer(tmp_path / "timed", keep_last=100), period=1000, every_minutes=2)
    toy.train(tmp_path / "unused", max_iter=6, period=1000, extra_hooks=[hook])
    saved = [i for i, _ in ckpt.list_checkpoints(tmp_path / "timed")]
    # before_train at t=50; steps check at 100, 150, 200 (>= 120 s: save at iter 3), ...; and the last
    assert saved and saved[-1] == 6 and len(saved) >= 2 and 1 not in saved


def test_timed_checkpoints_are_not_counted_against_the_periodic_ones(tmp_path, monkeypatch):
    clock = iter(range(0, 10_000, 50))  # every call: +50 s, a timed save every few iterations
    monkeypatch.setattr(hooks.time, "monotonic", lambda: next(clock))
    hook = PeriodicCheckpoint(Checkpointer(tmp_path / "timed", keep_last=1, period=4), period=4, every_minutes=2)
    toy.train(tmp_path / "unused", max_iter=10, period=1000, extra_hooks=[hook])
    # periodic saves at 4 and 8, timed ones in between, the last at 10: the newest periodic and the last stay
    assert [i for i, _ in ckpt.list_checkpoints(tmp_path / "timed")] == [8, 10]


def test_periodic_eval_and_progress_line(tmp_path, caplog):
    calls = []

    def evaluate(trainer):
        calls.append(trainer.iter + 1)
        return {"ap": 0.5}

    with caplog.at_level(logging.INFO, logger="part_distillation"):
        trainer = toy.train(tmp_path, max_iter=5, period=100,
                            extra_hooks=[PeriodicEval(evaluate, period=2), ProgressLog(period=2)])
    assert calls == [2, 4, 5]
    assert trainer.storage.latest(prefix="eval/") == {"eval/ap": 0.5}
    assert [i for i, _ in trainer.storage.history("eval/ap")] == [1, 3, 4]  # put at the 0-based step
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[train] iter ")]
    assert len(lines) == 3 and "iter 5/5" in lines[-1] and "eta 0:00:00" in lines[-1]
    assert "img/s" in lines[0] and "data" in lines[0]


def test_eval_results_go_to_tensorboard_at_the_step_they_were_made(tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def evaluate(trainer):
        return {"strict/AR@10": (trainer.iter + 1) / 10}

    with caplog.at_level(logging.INFO, logger="part_distillation"):
        toy.train(tmp_path, max_iter=7, period=100,
                  extra_hooks=[PeriodicEval(evaluate, period=3), hooks.TensorBoardWriter(tmp_path / "tb", period=100)])
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    scalars = [(e.step, round(e.value, 4)) for e in events.Scalars("eval/strict/AR@10")]
    assert scalars == [(3, 0.3), (6, 0.6), (7, 0.7)]   # the log period (100) does not delay them
    assert "[eval] iter 6: strict/AR@10 0.6" in [r.getMessage() for r in caplog.records]


def test_metrics_log_has_losses_every_period_and_eval_results_at_their_step(tmp_path):
    def evaluate(trainer):
        return {"reference/bestIoU": float(trainer.iter + 1)}

    toy.train(tmp_path, max_iter=7, period=100,
              extra_hooks=[PeriodicEval(evaluate, period=3), hooks.JSONWriter(tmp_path, period=2)])
    lines = hooks.read_metrics_log(tmp_path)
    assert [line["iteration"] for line in lines] == [2, 3, 4, 6, 7]   # log period 2, eval at 3, 6 and the last
    assert [line.get("eval/reference/bestIoU") for line in lines] == [None, 3.0, None, 6.0, 7.0]
    assert "total_loss" in lines[0] and "lr" in lines[0] and "total_loss" not in lines[1]


def test_metrics_log_of_a_resumed_run_drops_the_lines_after_its_checkpoint(tmp_path):
    toy.train(tmp_path, max_iter=5, period=3, extra_hooks=[hooks.JSONWriter(tmp_path, period=1)])
    ckpt.checkpoint_path(tmp_path, 5).unlink()   # as if killed after iteration 5 with the last save at 3
    with open(tmp_path / hooks.METRICS_FILE, "a") as f:
        f.write('{"iteration": 9, "total_lo')    # and a line cut short by the kill
    assert [line["iteration"] for line in hooks.read_metrics_log(tmp_path)] == [1, 2, 3, 4, 5]
    toy.train(tmp_path, max_iter=6, period=3, extra_hooks=[hooks.JSONWriter(tmp_path, period=1)])
    assert [line["iteration"] for line in hooks.read_metrics_log(tmp_path)] == [1, 2, 3, 4, 5, 6]
