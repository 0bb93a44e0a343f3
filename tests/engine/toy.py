"""A tiny stand-in training setup for the engine tests (the model does not matter there).

``train(run_dir, ...)`` runs the real engine (sampler, trainer, checkpoints, resume) on a
small regression problem whose loss uses torch's RNG (dropout) and numpy's global RNG
(label noise), so a resume that lost either RNG state would not be bitwise equal.
Run as a script it trains once (used by the kill -9 tests in a subprocess).
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from part_distillation.engine import (Checkpointer, GlobalBatchSampler, HookBase, MultiStepSchedule,
                                      PeriodicCheckpoint, Trainer, build_adamw)
from part_distillation.engine import checkpoint as ckpt
from part_distillation.engine import distributed

NUM_SAMPLES = 24


def make_model(seed: int = 0, dropout: float = 0.2) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 1))


def sample(seed: int, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A sample as a pure function of (seed, epoch, index): x fixed per index, jitter per epoch."""
    x = torch.from_numpy(np.random.default_rng([seed, index]).normal(size=4).astype(np.float32))
    jitter = np.random.default_rng([seed, epoch, index]).normal(scale=0.01, size=4).astype(np.float32)
    x = x + torch.from_numpy(jitter)
    y = x.sum(0, keepdim=True) * 0.5
    return x, y


def loss_without_noise(model, batch):
    x, y = batch
    pred = model(x)
    return {"loss_mse": ((pred - y) ** 2).mean(), "loss_l1": 0.1 * (pred - y).abs().mean()}


def loss_fn(model, batch):
    x, y = batch
    noise = torch.from_numpy(np.random.normal(scale=0.01, size=tuple(y.shape)).astype(np.float32))
    pred = model(x)
    return {"loss_mse": ((pred - y - noise) ** 2).mean(), "loss_l1": 0.1 * (pred - y).abs().mean()}


def data_factory(seed: int, global_batch: int, per_device_batch: int):
    def data(start_iter: int):
        sampler = GlobalBatchSampler(NUM_SAMPLES, global_batch, per_device_batch, seed=seed,
                                     rank=distributed.rank(), world_size=distributed.world_size(),
                                     start_iter=start_iter)
        for ids in sampler:
            xs, ys = zip(*(sample(seed, e, i) for e, i in ids))
            yield torch.stack(xs), torch.stack(ys)
    return data


class RecordLoss(HookBase):
    """Appends ``{"iter", "loss"}`` lines to a file (rank 0)."""

    def __init__(self, path):
        self.path = Path(path)

    def after_step(self):
        if distributed.is_main():
            with open(self.path, "a") as f:
                f.write(json.dumps({"iter": self.trainer.iter, "loss": self.trainer.metrics["total_loss"]}) + "\n")


class KillAt(HookBase):
    """SIGKILL this process after iteration ``iteration`` (simulates a crash between checkpoints)."""

    def __init__(self, iteration: int):
        self.iteration = iteration

    def after_step(self):
        if self.trainer.iter == self.iteration:
            os.kill(os.getpid(), signal.SIGKILL)


def kill_during_save_of(iteration: int) -> None:
    """Make the checkpoint write of ``iteration`` die half-way (partial temp file, then SIGKILL)."""
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("iteration") == iteration:
            f.write(b"PK\x03\x04 partial checkpoint")
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)


    torch.save = dying_save


def train(run_dir, *, max_iter: int = 12, global_batch: int = 4, per_device_batch: int = 2, seed: int = 0,
          period: int = 3, extra_hooks=(), clip_norm: float | None = 0.01, noise: bool = True) -> Trainer:
    """Train the toy model; ``noise=False``: no dropout and no label noise (no RNG in the loss)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    model = make_model(seed, dropout=0.2 if noise else 0.0)  # same initial weights on every rank
    distributed.seed_all(seed, distributed.rank())  # then different noise per rank
    wrapped = distributed.wrap_ddp(model, torch.device("cpu"))
    optimizer = build_adamw(model, lr=1e-2, weight_decay=0.05)
    accum = global_batch // (distributed.world_size() * per_device_batch)
    trainer = Trainer(wrapped, optimizer, data_factory(seed, global_batch, per_device_batch),
                      loss_fn if noise else loss_without_noise,
                      MultiStepSchedule(1e-2, steps=(8,)), max_iter=max_iter, accum=accum,
                      global_batch=global_batch, clip_norm=clip_norm)
    checkpointer = Checkpointer(run_dir, keep_last=2)
    trainer.register_hooks([PeriodicCheckpoint(checkpointer, period), RecordLoss(run_dir / "losses.jsonl"),
                            *extra_hooks])
    checkpointer.resume(trainer)
    trainer.train()
    return trainer


if __name__ == "__main__":  # python -m tests.engine.toy RUN_DIR [kill_after_iter N | kill_during_save N]
    run_dir = sys.argv[1]
    hooks = []
    if len(sys.argv) > 3 and sys.argv[2] == "kill_after_iter":
        hooks.append(KillAt(int(sys.argv[3])))
    if len(sys.argv) > 3 and sys.argv[2] == "kill_during_save":
        kill_during_save_of(int(sys.argv[3]))
    train(run_dir, extra_hooks=hooks)


def slurm_training_job(run_dir: str) -> dict:
    """Runs in every task of a SLURM job: the launcher's process group, then the toy training."""
    from part_distillation.launch import distributed_context

    with distributed_context() as context:
        trainer = train(run_dir, max_iter=6, global_batch=4, per_device_batch=2, period=3, noise=False)
        return {"rank": context.rank, "world_size": context.world_size, "accum": trainer.accum,
                "on_slurm": context.on_slurm,
                "params": {k: v.tolist() for k, v in trainer.module.state_dict().items()}}
