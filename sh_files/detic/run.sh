#!/usr/bin/env bash
# Stage 1: Detic object masks for every image, 60 parallel jobs (one GPU each).
# Output: pseudo_labels/object_labels/<data>/detic_predictions/. Extra args are Hydra overrides.
source "$(dirname "$0")/../common.sh"
pd_array detic_labeling "${JOBS:-60}" model=detic_swinb shard.by=class \
  launcher.gpus_per_node=1 launcher.cpus_per_task=8 launcher.timeout_min=4320 "$@"
