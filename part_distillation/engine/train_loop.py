"""The training loop: a :class:`Trainer` and the hooks that extend it (detectron2's shape).

The trainer runs iterations; everything around them (checkpoints, logging, evaluation,
previews) is a :class:`HookBase` called at fixed points. For a trainer with hooks
``[A, B]`` the calls are::

    A.before_train(); B.before_train()
    for trainer.iter in range(start_iter, max_iter):
        A.before_step(); B.before_step()
        trainer.run_step()      # forward + backward of every micro-batch, then:
                                #   A.after_backward(); B.after_backward()
                                # then clipping and the optimiser step
        A.after_step(); B.after_step()
    A.after_train(); B.after_train()   # also when an iteration raises

For example, a hook that stops nothing but counts::

    class CountSteps(HookBase):
        def __init__(self):
            self.steps = 0
        def after_step(self):
            self.steps += 1
        def state_dict(self):
            return {"steps": self.steps}       # saved in the trainer's checkpoint
        def load_state_dict(self, state):
            self.steps = state["steps"]

    trainer.register_hooks([CountSteps()])
    trainer.train(start_iter=0, max_iter=100)

Hooks reach the trainer through ``self.trainer``, a weak reference (no cycle keeps a
finished trainer alive). Their ``state_dict`` is saved with the trainer's. They exchange
numbers through ``trainer.storage`` (``events.EventStorage``: ``put_scalar``, ``latest``,
``history``), never through attributes set on the trainer.

One step is the global batch: ``accum`` micro-batches of ``per_device_batch`` images on
each of ``world_size`` processes. Gradients of all but the last micro-batch stay local
(``no_sync``); DDP averages over processes, each micro-batch loss is divided by
``accum``, so the step sees the mean gradient over the global batch, whatever the
number of processes. The learning rate is set before every step from a pure function
of the iteration. Mixed precision (``torch.amp``, float16 with a grad scaler) is used on
CUDA only; gradients are unscaled before clipping.
"""
from __future__ import annotations

import contextlib
import logging
import time
import weakref
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from . import distributed as ddp_utils
from .events import EventStorage
from .optim import clip_grad_norm

log = logging.getLogger("part_distillation")

#: ``loss_fn(model, micro_batch) -> {name: weighted scalar loss}``; their sum is minimised.
LossFn = Callable[[nn.Module, Any], Mapping[str, torch.Tensor]]


class HookBase:
    """Called by :class:`Trainer` around training and around each step (see the module notes)."""

    trainer: "Trainer"

    def before_train(self) -> None:
        pass

    def after_train(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def after_backward(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class Trainer:
    """Runs ``max_iter`` optimiser steps of one global batch each.

    ``data`` is a callable ``start_iter -> iterator of micro-batches`` (this rank's, in
    order; see ``engine.sampler``), so that a resumed run starts reading where the
    interrupted one stopped. ``model`` may be wrapped in DDP (``distributed.wrap_ddp``).
    Every step puts into ``storage`` (:class:`~.events.EventStorage`, where hooks read and
    put their numbers) the step's losses (mean over the global batch, all ranks), ``lr``,
    ``grad_norm``, ``data_time`` and ``step_time`` (seconds), and ``images_per_s``;
    ``metrics`` reads them back.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 data: Callable[[int], Iterator[Any]], loss_fn: LossFn, lr_at: Callable[[int], float], *,
                 max_iter: int, accum: int = 1, global_batch: int = 1, clip_norm: float | None = 0.01,
                 amp: bool = False, device: torch.device | str = "cpu"):
        self.model = model
        self.optimizer = optimizer
        self.data = data
        self.loss_fn = loss_fn
        self.lr_at = lr_at
        self.max_iter = int(max_iter)
        self.accum = int(accum)
        self.global_batch = int(global_batch)
        self.clip_norm = clip_norm
        self.device = torch.device(device)
        self.amp = bool(amp) and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        self.iter = 0
        self.start_iter = 0
        self.storage = EventStorage()
        self._step_names: tuple[str, ...] = ()  # what run_step puts (``metrics``)
        self._hooks: list[HookBase] = []
        self._data_iter: Iterator[Any] | None = None

    # -- hooks ------------------------------------------------------------------------
    @property
    def hooks(self) -> tuple[HookBase, ...]:
        return tuple(self._hooks)

    def register_hooks(self, hooks: Iterable[HookBase | None]) -> None:
        """Append hooks (``None`` entries are skipped); they run in registration order."""
        for hook in hooks:
            if hook is None:
                continue
            hook.trainer = weakref.proxy(self)
            self._hooks.append(hook)

    def _hook_names(self) -> list[str]:
        names, seen = [], {}
        for hook in self._hooks:
            name = type(hook).__name__
            seen[name] = seen.get(name, 0) + 1
            names.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
        return names

    def _call(self, method: str) -> None:
        for hook in self._hooks:
            getattr(hook, method)()

    # -- the loop ---------------------------------------------------------------------
    @property
    def metrics(self) -> dict[str, float]:
        """The last step's training scalars (losses, ``total_loss``, ``lr``, ...) from ``storage``."""
        latest = self.storage.latest()
        return {name: latest[name] for name in self._step_names if name in latest}

    @property
    def module(self) -> nn.Module:
        """The model without its DDP wrapper (what is saved and evaluated)."""
        return ddp_utils.unwrap(self.model)

    def train(self, start_iter: int | None = None, max_iter: int | None = None) -> None:
        """Run iterations ``start_iter .. max_iter - 1`` (defaults: ``self.iter``, ``self.max_iter``)."""
        self.start_iter = self.iter if start_iter is None else int(start_iter)
        self.max_iter = self.max_iter if max_iter is None else int(max_iter)
        self.iter = self.start_iter
        self.model.train()
        self._data_iter = iter(self.data(self.start_iter))
        try:
            self._call("before_train")
            for self.iter in range(self.start_iter, self.max_iter):
                self.storage.iter = self.iter
                self._call("before_step")
                self.run_step()
                self._call("after_step")
            self.iter = self.max_iter  # every iteration done (as hooks see it in after_train)
        finally:
            self._call("after_train")
            self._data_iter = None

    def run_step(self) -> None:
        """One optimiser step over the global batch (``accum`` micro-batches here)."""
        assert self._data_iter is not None, "run_step() is called by train()"
        start = time.perf_counter()
        lr = self.lr_at(self.iter)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        is_ddp = isinstance(self.model, nn.parallel.DistributedDataParallel)
        totals: dict[str, torch.Tensor] = {}
        data_time = 0.0
        for step in range(self.accum):
            t0 = time.perf_counter()
            batch = next(self._data_iter)
            data_time += time.perf_counter() - t0
            sync = step == self.accum - 1
            with self.model.no_sync() if is_ddp and not sync else contextlib.nullcontext():
                with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                    losses = dict(self.loss_fn(self.model, batch))
                    total = sum(losses.values())
                if not torch.isfinite(total):
                    raise FloatingPointError(f"loss is {total.item()} at iteration {self.iter}: "
                                             f"{ {k: float(v.detach()) for k, v in losses.items()} }")
                self.scaler.scale(total / self.accum).backward()
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + value.detach().float() / self.accum
        self._call("after_backward")
        self.scaler.unscale_(self.optimizer)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        grad_norm = (clip_grad_norm(params, self.clip_norm) if self.clip_norm
                     else torch.linalg.vector_norm(torch.stack(
                         [p.grad.detach().norm() for p in params if p.grad is not None])))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        totals["grad_norm"] = grad_norm.detach().float()
        metrics = ddp_utils.mean_over_ranks(totals)
        metrics["total_loss"] = sum(v for k, v in metrics.items() if k != "grad_norm")
        metrics["lr"] = lr
        metrics["data_time"] = data_time
        metrics["step_time"] = time.perf_counter() - start
        metrics["images_per_s"] = self.global_batch / max(metrics["step_time"], 1e-9)
        self.storage.put_scalars(metrics, iteration=self.iter)
        self._step_names = tuple(metrics)

    # -- state ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Model, optimiser, grad scaler, ``iteration`` (iterations done = the next to run,
        as seen from ``after_step``) and hook states."""
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": int(self.iter) + 1 if self.iter < self.max_iter else int(self.iter),
            "hooks": {name: hook.state_dict() for name, hook in zip(self._hook_names(), self._hooks)},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.iter = int(state["iteration"])
        hook_states = state.get("hooks", {})
        for name, hook in zip(self._hook_names(), self._hooks):
            if name in hook_states:
                hook.load_state_dict(hook_states[name])

