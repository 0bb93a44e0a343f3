# Sourced by every script here: run the one entry point from the project root with the
# project's environment. Override with PD_PYTHON, PD_LAUNCHER (submitit_slurm,
# submitit_local or basic for in-process) and PD_EXPERIMENT (in22k, in1k, demo).
set -euo pipefail
PD_ROOT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$PD_ROOT_DIR"
if [ -z "${PD_PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PD_PYTHON=.venv/bin/python; else PD_PYTHON=python3; fi
fi
PD_LAUNCHER=${PD_LAUNCHER:-submitit_slurm}
PD_EXPERIMENT=${PD_EXPERIMENT:-in22k}

# pd_array STAGE JOBS [overrides...]: one job per shard, as a SLURM array.
pd_array() {
  local stage=$1 jobs=$2; shift 2
  exec "$PD_PYTHON" -m part_distillation -m "hydra/launcher=$PD_LAUNCHER" \
    "experiment=$PD_EXPERIMENT" "stage=$stage" "shard.count=$jobs" "shard.index=range(0,$jobs)" "$@"
}

# pd_job STAGE [overrides...]: one (multi-node) job.
pd_job() {
  local stage=$1; shift
  exec "$PD_PYTHON" -m part_distillation -m "hydra/launcher=$PD_LAUNCHER" \
    "experiment=$PD_EXPERIMENT" "stage=$stage" "$@"
}
