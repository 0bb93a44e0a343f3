#!/usr/bin/env bash
# Stage 5: part ranking, partitioned over object classes, 50 parallel jobs (K=8, the
# stage's default; the demo's K and image size: configs/stage_tuning/demo_part_ranking.yaml).
# Input: the dense_crf records and the proposal_learning checkpoint: with PD_EXPERIMENT=in22k
# or in1k the 40k one, as the reference (configs/stage_tuning/<experiment>_part_ranking.yaml),
# with the demo the newest; stage.checkpoint_iteration=<N> or stage.checkpoint=<file> override it.
# Output: pseudo_labels/part_labels/part_ranking/<data>/.
source "$(dirname "$0")/../common.sh"
MODEL=$([ "$PD_EXPERIMENT" = demo ] && echo mask2former_effnet || echo mask2former_swinl)
pd_array part_ranking "${JOBS:-50}" "model=$MODEL" shard.by=class \
  launcher.gpus_per_node=1 launcher.cpus_per_task=8 launcher.timeout_min=4320 "$@"
