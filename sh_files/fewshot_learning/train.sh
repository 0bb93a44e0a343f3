#!/usr/bin/env bash
# The few-shot baseline: a PartDistillation model fine-tuned on a percentage of a part
# dataset's labelled train images; 1 node x 8 GPUs, batch 32 (4 per GPU), lr 1e-4, 20k
# iterations, nothing frozen (the reference's fewshot_learning/{prop,semseg}/*.sh).
# Usage: train.sh [proposal|semantic] [overrides...]   (default: semantic)
#   stage.checkpoint=<stage-6 run folder or file> (default: outputs/part_distillation/<data>)
#   stage.percent=1 stage.subset_seed=0; the dataset as in ../supervised_learning/train.sh
# Output: outputs/fewshot_learning/<dataset>_<variant>_<percent>pct_seed<seed>/ with
# fewshot_subset.json (the images trained on) next to the checkpoints.
source "$(dirname "$0")/../common.sh"
VARIANT=semantic
case "${1:-}" in proposal|semantic) VARIANT=$1; shift ;; esac
# the demo fine-tunes its PartDistillation model, the pretrained CPU model
# (configs/stage_tuning/demo_fewshot_learning.yaml)
MODEL=$([ "$PD_EXPERIMENT" = demo ] && echo mask2former_effnet || echo mask2former_swinl)
pd_job fewshot_learning "model=$MODEL" "stage.variant=$VARIANT" \
  launcher.nodes="${NODES:-1}" launcher.tasks_per_node=8 launcher.gpus_per_node=8 \
  launcher.cpus_per_task=10 launcher.timeout_min=1440 "$@"
