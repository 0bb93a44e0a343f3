#!/usr/bin/env bash
# Stage 3: dense-CRF refinement on CPU (no GPU: the launcher's default), one process per shard
# (set JOBS to the cores you have).
# Records of stage 2 are split over the JOBS jobs by a hash of their key. Add
# stage.follow=true to refine stage 2's records while it still runs (the reference's
# polling loop), stage.workers=N for N CRF processes in each job, stage.variant=fast.
# Output: pseudo_labels/part_labels/proposal_generation_dcrf/<data>/.
source "$(dirname "$0")/../common.sh"
pd_array dense_crf "${JOBS:-100}" launcher.cpus_per_task=1 \
  launcher.timeout_min=4320 "$@"
