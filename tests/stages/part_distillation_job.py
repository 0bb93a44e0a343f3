"""Run stage 6 once on given records in this process (the kill -9 tests start it as a subprocess).

``python -m tests.stages.part_distillation_job RECORDS DATA_ROOT RUN_DIR [kill_after_iter N | kill_during_save N]``
"""
from __future__ import annotations

import sys

import torch

from part_distillation.config import DataConfig, ModelConfig, PartDistillationStageConfig, RunConfig
from part_distillation.launch import JobContext
from part_distillation.stages import part_distillation, training

from ..engine.toy import KillAt, RecordLoss, kill_during_save_of


def config(records, data_root, run_dir, **stage) -> RunConfig:
    """The tiny stage-6 config of these tests (K = 4: the synthetic dataset's parts per class)."""
    settings = dict(input=str(records), output=str(run_dir), batch_size=2, per_device_batch=2, max_iter=12,
                    steps=[8], lr=1e-3, image_size=64, num_workers=0, num_points=256, checkpoint_period=3,
                    keep_last=2, log_period=1, preview_period=0, parts_per_class=4, deterministic=True)
    settings.update(stage)
    return RunConfig(stage=PartDistillationStageConfig(**settings),
                     data=DataConfig(name="synthetic", root=str(data_root)),
                     model=ModelConfig(name="mask2former", size="tiny", device="cpu"), seed=0)


def main(records, data_root, run_dir, *kill) -> None:
    torch.set_num_threads(1)
    extra = [RecordLoss(f"{run_dir}/losses.jsonl")]
    if kill and kill[0] == "kill_after_iter":
        extra.append(KillAt(int(kill[1])))
    if kill and kill[0] == "kill_during_save":
        kill_during_save_of(int(kill[1]))
    real_build = training.build_trainer

    def build_trainer(*args, **kwargs):  # the stage's own trainer, plus the test's hooks
        trainer, checkpointer = real_build(*args, **kwargs)
        trainer.register_hooks(extra)
        return trainer, checkpointer

    training.build_trainer = build_trainer  # the one wiring's
    part_distillation.run(config(records, data_root, run_dir), JobContext())


if __name__ == "__main__":
    main(*sys.argv[1:])
