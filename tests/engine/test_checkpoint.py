import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from part_distillation.engine import checkpoint as ckpt
from part_distillation.store import ConfigMismatchError

ROOT = Path(__file__).resolve().parents[2]


def _run_toy(run_dir, *args, expect_kill=False):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "tests.engine.toy", str(run_dir), *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if expect_kill:
        assert proc.returncode == -9, proc.stderr[-2000:]
    else:
        assert proc.returncode == 0, proc.stderr[-2000:]


def _losses(run_dir):
    """Loss per iteration; a re-run iteration overwrites the one lost in the crash."""
    out = {}
    for line in (Path(run_dir) / "losses.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["iter"]] = row["loss"]
    return out


def _final_state(run_dir):
    return ckpt.load_checkpoint(ckpt.checkpoint_path(run_dir, 12))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    _run_toy(run_dir)
    return run_dir


def _assert_same_run(run_dir, reference):
    assert _losses(run_dir) == _losses(reference)  # bitwise: float equality of every iteration
    assert len(_losses(run_dir)) == 12
    a, b = _final_state(run_dir), _final_state(reference)
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in ("exp_avg", "exp_avg_sq"))


def test_kill_between_checkpoints_then_resume_is_bitwise_equal(tmp_path, uninterrupted):
    _run_toy(tmp_path, "kill_after_iter", 7, expect_kill=True)  # checkpoints at 3 and 6 exist
    assert [i for i, _ in ckpt.list_checkpoints(tmp_path)] == [3, 6]
    assert max(_losses(tmp_path)) == 7
    _run_toy(tmp_path)
    _assert_same_run(tmp_path, uninterrupted)
    assert [i for i, _ in ckpt.list_checkpoints(tmp_path)] == [9, 12]  # keep_last=2


def test_kill_during_checkpoint_write_then_resume_is_bitwise_equal(tmp_path, uninterrupted):
    _run_toy(tmp_path, "kill_during_save", 9, expect_kill=True)
    assert [i for i, _ in ckpt.list_checkpoints(tmp_path)] == [3, 6]
    assert list((tmp_path / "checkpoints").glob(".model_0000009.pth.*.tmp"))  # the partial write
    _run_toy(tmp_path)
    _assert_same_run(tmp_path, uninterrupted)
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_losses_would_differ_without_the_rng_state(tmp_path, uninterrupted):
    """The check above can fail: resuming with other RNG states changes the curve."""
    _run_toy(tmp_path, "kill_after_iter", 7, expect_kill=True)
    path = ckpt.checkpoint_path(tmp_path, 6)
    state = ckpt.load_checkpoint(path)
    state["rng"] = [dict(state["rng"][0], torch=torch.manual_seed(123).get_state())]
    ckpt.save_atomic(state, path)
    _run_toy(tmp_path)
    assert _losses(tmp_path)[6] != _losses(uninterrupted)[6]


def test_rng_state_roundtrips_through_weights_only_load(tmp_path):
    np.random.seed(5)
    np.random.normal(size=3)  # leaves a cached gaussian
    state = ckpt.rng_state()
    expected = (np.random.normal(size=4), torch.rand(3), __import__("random").random())
    torch.save({"rng": state}, tmp_path / "s.pth")
    loaded = torch.load(tmp_path / "s.pth", weights_only=True)["rng"]
    np.random.seed(0)
    torch.manual_seed(0)
    ckpt.set_rng_state(loaded)
    again = (np.random.normal(size=4), torch.rand(3), __import__("random").random())
    assert np.array_equal(expected[0], again[0]) and torch.equal(expected[1], again[1])
    assert expected[2] == again[2]


def test_save_atomic_keeps_old_file_when_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "model_0000001.pth"
    ckpt.save_atomic({"iteration": 1}, path)

    def failing_save(obj, f):
        f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_atomic({"iteration": 2}, path)
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)["iteration"] == 1
    assert os.listdir(path.parent) == ["model_0000001.pth"]


def test_unreadable_checkpoint_is_named(tmp_path):
    path = ckpt.checkpoint_path(tmp_path, 4)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="model_0000004.pth"):
        ckpt.load_checkpoint(path)


def test_run_dir_made_with_another_config_is_refused(tmp_path):
    config = {"stage": {"lr": 1e-4, "max_iter": 10}, "shard": {"index": 0}}
    ckpt.prepare_run_dir(tmp_path, stage="proposal_learning", config=config)
    ckpt.prepare_run_dir(tmp_path, stage="proposal_learning", config=config)  # same: accepted
    other = {"stage": {"lr": 1e-3, "max_iter": 10}, "shard": {"index": 0}}
    with pytest.raises(ConfigMismatchError, match="stage.lr"):
        ckpt.prepare_run_dir(tmp_path, stage="proposal_learning", config=other)


def test_timed_saves_never_push_a_periodic_checkpoint_out(tmp_path):
    """keep_last counts the saves at multiples of the period; a timed save off the period is
    removed once a newer checkpoint exists (the reference's 50k run keeps 40k, 45k, 50k)."""
    def save(*iterations):
        for i in iterations:
            ckpt.checkpoint_path(tmp_path, i).parent.mkdir(parents=True, exist_ok=True)
            ckpt.checkpoint_path(tmp_path, i).write_bytes(b"")

    save(30000, 35000, 40000, 41234, 42468, 43702, 45000)
    ckpt.remove_stale(tmp_path, keep_last=3, period=5000)
    assert [i for i, _ in ckpt.list_checkpoints(tmp_path)] == [35000, 40000, 45000]
    save(46234, 47468)
    ckpt.remove_stale(tmp_path, keep_last=3, period=5000)  # the newest, timed, is kept for resuming
    assert [i for i, _ in ckpt.list_checkpoints(tmp_path)] == [35000, 40000, 45000, 47468]
    save(50000)
    ckpt.remove_stale(tmp_path, keep_last=3, period=5000)
    assert [i for i, _ in ckpt.list_checkpoints(tmp_path)] == [40000, 45000, 50000]
    save(51234, 52468)
    ckpt.remove_stale(tmp_path, keep_last=3)  # no period: the newest three, whatever they are
    assert [i for i, _ in ckpt.list_checkpoints(tmp_path)] == [50000, 51234, 52468]
