#!/usr/bin/env bash
# Stage 4: part-proposal Mask2Former, 8 nodes x 8 GPUs, batch 512, 50k iterations.
# Output: outputs/proposal_learning/<data>/ (checkpoints, logs).
source "$(dirname "$0")/../common.sh"
pd_job proposal_learning model=mask2former_swinl stage.batch_size=512 stage.max_iter=50000 \
  launcher.nodes="${NODES:-8}" launcher.tasks_per_node=8 launcher.gpus_per_node=8 \
  launcher.cpus_per_task=10 launcher.timeout_min=4320 "$@"
