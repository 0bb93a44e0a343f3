"""The sample order as a pure function of (seed, iteration): exact resume without loader state.

The training stream is the concatenation of epochs; epoch ``e`` is a permutation of the
dataset drawn from ``(seed, e)`` only. Iteration ``it`` consumes stream positions
``[it * G, (it + 1) * G)`` of the global batch ``G``, cut into ``G / per_device`` micro-
batches; micro-batch ``j`` goes to rank ``j % world_size`` as its accumulation step
``j // world_size``. So the set of micro-batches of an iteration is the same whatever
the number of processes (N processes, or one process accumulating N times), and a run
resumed at iteration ``it`` reads exactly what an uninterrupted run reads.

A sample is named by ``(epoch, index)``; the dataset derives its augmentation from
``(seed, epoch, index)`` (see ``data/part_records.py``), so data workers hold no state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

SampleId = tuple[int, int]  # (epoch, dataset index)


def accumulation_steps(global_batch: int, world_size: int, per_device_batch: int) -> int:
    """``global_batch / (world_size * per_device_batch)``; refuses sizes that do not divide."""
    per_step = world_size * per_device_batch
    if global_batch < 1 or per_device_batch < 1 or global_batch % per_step:
        raise ValueError(f"the global batch {global_batch} is not a multiple of world_size ({world_size}) x "
                         f"per-device batch ({per_device_batch}); change stage.batch_size or "
                         f"stage.per_device_batch")
    return global_batch // per_step


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of ``range(num_samples)`` used in ``epoch``."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num_samples)


@dataclass
class GlobalBatchSampler:
    """Yields this rank's micro-batches (lists of :data:`SampleId`) from ``start_iter`` on.

    Use as a ``DataLoader`` ``batch_sampler``: ``accum`` micro-batches per iteration,
    forever (the trainer decides when to stop).
    """

    num_samples: int
    global_batch: int
    per_device_batch: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    start_iter: int = 0

    def __post_init__(self):
        if self.num_samples < 1:
            raise ValueError("the training set is empty")
        self.accum = accumulation_steps(self.global_batch, self.world_size, self.per_device_batch)
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) >= 2:  # a batch spans at most two epochs
                self._orders.pop(min(self._orders))
            self._orders[epoch] = epoch_order(self.num_samples, self.seed, epoch)
        return self._orders[epoch]

    def micro_batch(self, iteration: int, step: int) -> list[SampleId]:
        """The samples of accumulation step ``step`` of ``iteration`` on this rank."""
        j = step * self.world_size + self.rank
        start = iteration * self.global_batch + j * self.per_device_batch
        out = []
        for position in range(start, start + self.per_device_batch):
            epoch, within = divmod(position, self.num_samples)
            out.append((int(epoch), int(self._order(epoch)[within])))
        return out

    def __iter__(self) -> Iterator[list[SampleId]]:
        iteration = self.start_iter
        while True:
            for step in range(self.accum):
                yield self.micro_batch(iteration, step)
            iteration += 1
