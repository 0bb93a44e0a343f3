#!/usr/bin/env bash
# Stage 5: part ranking, partitioned over object classes, 50 parallel jobs.
# Output: pseudo_labels/part_labels/part_ranking/<data>/.
source "$(dirname "$0")/../common.sh"
pd_array part_ranking "${JOBS:-50}" model=mask2former_swinl shard.by=class stage.num_clusters=8 \
  launcher.gpus_per_node=1 launcher.cpus_per_task=8 launcher.timeout_min=4320 "$@"
