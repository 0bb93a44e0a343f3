#!/usr/bin/env bash
# Stage 6: PartDistillation training, 8 nodes x 8 GPUs, batch 256, 120k iterations.
# Output: outputs/part_distillation/<data>/.
source "$(dirname "$0")/../common.sh"
pd_job part_distillation model=mask2former_swinl stage.batch_size=256 stage.max_iter=120000 \
  launcher.nodes="${NODES:-8}" launcher.tasks_per_node=8 launcher.gpus_per_node=8 \
  launcher.cpus_per_task=10 launcher.timeout_min=4320 "$@"
