"""The training engine of the training stages (4, 6 and the two baselines): loop and hooks,
event store, optimisation, schedule, deterministic sampling, checkpoints with exact resume,
DDP (see ``train_loop``). It knows no run config, dataset format or model (``recipe``)."""
from .checkpoint import latest_checkpoint, prepare_run_dir
from .events import EventStorage
from .hooks import (Checkpointer, JSONWriter, PeriodicCheckpoint, PeriodicEval, ProgressLog, TensorBoardWriter,
                    read_metrics_log)
from .optim import build_adamw, param_groups
from .sampler import GlobalBatchSampler, accumulation_steps
from .schedule import MultiStepSchedule
from .train_loop import HookBase, Trainer

__all__ = ["Checkpointer", "EventStorage", "GlobalBatchSampler", "HookBase", "JSONWriter", "MultiStepSchedule", "PeriodicCheckpoint",
           "PeriodicEval", "ProgressLog", "TensorBoardWriter", "Trainer", "accumulation_steps",
           "build_adamw", "latest_checkpoint", "param_groups", "prepare_run_dir", "read_metrics_log"]
