#!/usr/bin/env bash
# Stage 5: part ranking, partitioned over object classes, 50 parallel jobs (K=8, the
# stage's default; the demo's K and image size: configs/stage_tuning/demo_part_ranking.yaml).
# Input: the dense_crf records and the newest proposal_learning checkpoint
# (stage.checkpoint_iteration=40000 for the reference's choice).
# Output: pseudo_labels/part_labels/part_ranking/<data>/.
source "$(dirname "$0")/../common.sh"
MODEL=$([ "$PD_EXPERIMENT" = demo ] && echo mask2former_effnet || echo mask2former_swinl)
pd_array part_ranking "${JOBS:-50}" "model=$MODEL" shard.by=class \
  launcher.gpus_per_node=1 launcher.cpus_per_task=8 launcher.timeout_min=4320 "$@"
