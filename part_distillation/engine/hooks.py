"""The standard hooks: periodic checkpoints, progress line, TensorBoard, a JSON-lines metrics
log, previews, evaluation.

Order matters and follows detectron2's ``DefaultTrainer``: the checkpoint is written
before evaluation and logging, so a crash in either never loses the step.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from . import checkpoint as ckpt
from . import distributed
from .train_loop import HookBase

log = logging.getLogger("part_distillation")

#: Where :class:`PeriodicEval` puts its results in the trainer's event store.
EVAL_PREFIX = "eval/"
#: :class:`JSONWriter`'s file in the run folder: one JSON object per logged step.
METRICS_FILE = "metrics.jsonl"


def _due(trainer, period: int) -> bool:
    """Whether the iteration just finished is a multiple of ``period`` or the last one."""
    done = trainer.iter + 1
    return period > 0 and (done % period == 0 or done == trainer.max_iter)


class Checkpointer:
    """Saves and restores a trainer (plus every rank's RNG states) under ``run_dir``."""

    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 3, period: int | None = None):
        self.run_dir = Path(run_dir)
        self.keep_last = int(keep_last)
        self.period = period  # keep_last counts the periodic saves only (ckpt.remove_stale)

    def save(self, trainer) -> Path | None:
        """Write ``checkpoints/model_<iterations done>.pth`` atomically (rank 0 writes).

        Collective: every rank must call it (RNG states are gathered from all ranks).
        """
        rng = distributed.all_gather_objects(ckpt.rng_state())
        path = None
        if distributed.is_main():
            state = trainer.state_dict()
            state["rng"] = rng
            state["world_size"] = len(rng)
            path = ckpt.checkpoint_path(self.run_dir, state["iteration"])
            ckpt.save_atomic(state, path)
            ckpt.remove_stale(self.run_dir, self.keep_last, self.period)
            log.info("saved %s", path)
        distributed.barrier()
        return path

    def resume(self, trainer) -> bool:
        """Load the newest checkpoint into ``trainer`` (and this rank's RNG); False if none."""
        path = ckpt.latest_checkpoint(self.run_dir)
        if path is None:
            return False
        state = ckpt.load_checkpoint(path, map_location="cpu")
        trainer.load_state_dict(state)
        rng = state.get("rng") or []
        rank = distributed.rank()
        if len(rng) == distributed.world_size():
            ckpt.set_rng_state(rng[rank])
        else:
            log.warning("%s was written by %d processes, this run has %d: RNG states not restored "
                        "(the run continues, but not bitwise as the original)", path, len(rng),
                        distributed.world_size())
        log.info("resumed from %s at iteration %d", path, trainer.iter)
        return True


class PeriodicCheckpoint(HookBase):
    """Checkpoint every ``period`` iterations, after the last one, and (``every_minutes`` > 0)
    whenever that much time has passed since the last save, so a preempted job loses at most
    a few minutes. Rank 0's clock decides for all ranks (one broadcast per step)."""

    def __init__(self, checkpointer: Checkpointer, period: int, every_minutes: float = 0.0):
        self.checkpointer = checkpointer
        self.period = int(period)
        self.every_s = float(every_minutes) * 60.0
        self._last_save = time.monotonic()

    def before_train(self) -> None:
        self._last_save = time.monotonic()

    def _time_is_up(self) -> bool:
        if self.every_s <= 0:
            return False
        flag = torch.tensor([float(time.monotonic() - self._last_save >= self.every_s)])
        if distributed.world_size() > 1:
            import torch.distributed as dist

            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.broadcast(flag, src=0)
        return bool(flag.item())

    def after_step(self) -> None:
        if _due(self.trainer, self.period) or self._time_is_up():
            self.checkpointer.save(self.trainer)
            self._last_save = time.monotonic()


class ProgressLog(HookBase):
    """A log line every ``period`` iterations: losses, lr, images/s, data time, ETA."""

    def __init__(self, period: int = 20, prefix: str = "train"):
        self.period = int(period)
        self.prefix = prefix
        self._start = 0.0
        self._start_iter = 0

    def before_train(self) -> None:
        self._start = time.perf_counter()
        self._start_iter = self.trainer.iter

    def after_step(self) -> None:
        trainer = self.trainer
        if not _due(trainer, self.period) or not distributed.is_main():
            return
        done = trainer.iter + 1
        elapsed = time.perf_counter() - self._start
        per_iter = elapsed / max(done - self._start_iter, 1)
        eta = datetime.timedelta(seconds=int(per_iter * (trainer.max_iter - done)))
        m = trainer.storage.latest()
        log.info("[%s] iter %d/%d  loss %.4f  lr %.3g  %.2f img/s  data %.3fs  step %.3fs  eta %s",
                 self.prefix, done, trainer.max_iter, m.get("total_loss", float("nan")), m.get("lr", 0.0),
                 m.get("images_per_s", 0.0), m.get("data_time", 0.0), m.get("step_time", 0.0), eta)


class TensorBoardWriter(HookBase):
    """Scalars every ``period`` iterations (each loss term, lr, images/s, data time) on rank 0,
    the ``eval/`` scalars at the step they were put (``trainer.storage``), and images from ``preview(trainer) -> {tag: (3, H, W) uint8}`` every ``preview_period``
    (called on rank 0 only)."""

    def __init__(self, log_dir: str | os.PathLike, period: int = 20,
                 preview: Callable[[Any], Mapping[str, np.ndarray | torch.Tensor]] | None = None,
                 preview_period: int = 0):
        self.log_dir = str(log_dir)
        self.period = int(period)
        self.preview = preview
        self.preview_period = int(preview_period)
        self._writer = None

    def before_train(self) -> None:
        if distributed.is_main():
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self.log_dir, purge_step=self.trainer.iter + 1)

    def after_step(self) -> None:
        trainer = self.trainer
        done = trainer.iter + 1
        if _due(trainer, self.period) and self._writer is not None:
            for name, value in trainer.metrics.items():
                tag = f"loss/{name}" if name.startswith("loss") or name == "total_loss" else f"train/{name}"
                self._writer.add_scalar(tag, value, done)
        evaluated = trainer.storage.put_at(trainer.iter, prefix=EVAL_PREFIX)  # PeriodicEval's, this step
        if self._writer is not None and evaluated:
            for name, value in evaluated.items():
                self._writer.add_scalar(name, value, done)
            self._writer.flush()
        if self.preview is not None and self._writer is not None and _due(trainer, self.preview_period):
            # rank 0 only: the preview must not run collectives (use trainer.module, not the DDP model)
            for tag, image in self.preview(trainer).items():
                self._writer.add_image(tag, torch.as_tensor(np.asarray(image)), done, dataformats="CHW")
        if self._writer is not None and _due(trainer, self.period):
            self._writer.flush()

    def after_train(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class JSONWriter(HookBase):
    """``<run_dir>/metrics.jsonl`` on rank 0: every ``period`` iterations a line
    ``{"iteration": <done>, <loss terms, lr, ...>}``, and at a step :class:`PeriodicEval` ran
    (registered before this hook) its ``eval/`` values too; so the training curves are a file any
    script reads (:func:`read_metrics_log`), without TensorBoard. A resumed run first drops
    the lines after the checkpoint it resumed from, as TensorBoard's ``purge_step``."""

    def __init__(self, run_dir: str | os.PathLike, period: int = 20):
        self.path = Path(run_dir) / METRICS_FILE
        self.period = int(period)

    def before_train(self) -> None:
        if not distributed.is_main() or not self.path.is_file():
            return
        from part_distillation.store.files import atomic_write_bytes

        kept = [line for line, parsed in _parsed_lines(self.path.read_text(encoding="utf-8"))
                if parsed["iteration"] <= self.trainer.iter]
        atomic_write_bytes(self.path, "".join(line + "\n" for line in kept).encode("utf-8"))

    def after_step(self) -> None:
        trainer = self.trainer
        if not distributed.is_main():
            return
        evaluated = trainer.storage.put_at(trainer.iter, prefix=EVAL_PREFIX)
        if not evaluated and not _due(trainer, self.period):
            return
        line = {"iteration": trainer.iter + 1, **(trainer.metrics if _due(trainer, self.period) else {}),
                **evaluated}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")


def _parsed_lines(text: str) -> list[tuple[str, dict]]:
    """Each complete line of a metrics log with its object (``iteration`` an int); a line cut
    short by a kill is left out."""
    out = []
    for line in text.splitlines():
        try:
            parsed = json.loads(line)
            parsed["iteration"] = int(parsed["iteration"])
        except (ValueError, KeyError, TypeError):
            continue
        out.append((line, parsed))
    return out


def read_metrics_log(run_dir: str | os.PathLike) -> list[dict]:
    """The lines of ``<run_dir>/metrics.jsonl`` (:class:`JSONWriter`), oldest first; a line cut
    short by a kill is left out; [] when there is none."""
    try:
        text = (Path(run_dir) / METRICS_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [parsed for _, parsed in _parsed_lines(text)]


class PeriodicEval(HookBase):
    """Call ``evaluate(trainer) -> {name: float}`` every ``period`` iterations and after the
    last one (all ranks); the results go to ``trainer.storage`` as ``eval/<name>`` and are
    logged; :class:`TensorBoardWriter` (registered after it) writes them at that step.
    The training stages pass ``evaluation.during_training.training_evaluation``."""

    def __init__(self, evaluate: Callable[[Any], Mapping[str, float]], period: int):
        self.evaluate = evaluate
        self.period = int(period)

    def after_step(self) -> None:
        if _due(self.trainer, self.period):
            results = dict(self.evaluate(self.trainer))
            self.trainer.storage.put_scalars(results, prefix=EVAL_PREFIX, iteration=self.trainer.iter)
            self.trainer.model.train()
            if distributed.is_main():
                log.info("[eval] iter %d: %s", self.trainer.iter + 1,
                         ", ".join(f"{k} {v:.4g}" for k, v in results.items()))
