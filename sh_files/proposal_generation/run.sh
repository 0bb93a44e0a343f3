#!/usr/bin/env bash
# Stage 2: pixel grouping (k-means of Mask2Former Swin-L features, K=4), 40 parallel jobs.
# Output: pseudo_labels/part_labels/proposal_generation/<data>/. Extra args are Hydra overrides.
# Input: stage-1 object records. PD_EXPERIMENT=demo groups EfficientNet-Lite0 features instead
# (configs/stage_tuning/demo_pixel_grouping.yaml).
source "$(dirname "$0")/../common.sh"
pd_array pixel_grouping "${JOBS:-40}" model=mask2former_swinl stage.num_parts=4 \
  launcher.gpus_per_node=1 launcher.cpus_per_task=8 launcher.timeout_min=4320 "$@"
