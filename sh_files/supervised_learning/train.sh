#!/usr/bin/env bash
# The supervised baseline: Mask2Former trained on a part dataset's train split, from the COCO
# instance weights, nothing frozen; 4 nodes x 8 GPUs, batch 128 (4 per GPU), lr 1e-4, 20k
# iterations (the reference's supervised_learning/{prop,semseg}/*.sh).
# Usage: train.sh [proposal|semantic] [overrides...]   (default: semantic)
#   the dataset: stage.dataset=partimagenet|pascal_part|cityscapes_part stage.dataset_root=...
#   (PartImageNet: stage.image_root=<ImageNet-1k train>; Pascal-Part: stage.annotations_root=...)
# Output: outputs/supervised_learning/<dataset>_<variant>/ (checkpoints, tensorboard, manifest).
source "$(dirname "$0")/../common.sh"
VARIANT=semantic
case "${1:-}" in proposal|semantic) VARIANT=$1; shift ;; esac
# the demo trains its pretrained CPU model on the synthetic dataset's PartImageNet-format json
# (configs/stage_tuning/demo_supervised_learning.yaml)
MODEL=$([ "$PD_EXPERIMENT" = demo ] && echo mask2former_effnet || echo mask2former_swinl)
pd_job supervised_learning "model=$MODEL" "stage.variant=$VARIANT" \
  launcher.nodes="${NODES:-4}" launcher.tasks_per_node=8 launcher.gpus_per_node=8 \
  launcher.cpus_per_task=10 launcher.timeout_min=4320 "$@"
