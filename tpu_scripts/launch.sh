#!/usr/bin/env bash
# Run one training command on every worker at once. The trainer's data path is single-host for now
# (one TPU VM such as v4-8 / v5e-8 / v6e-8); pod slices need the multi-host data path, not yet
# built. Example:
#   tpu_scripts/launch.sh --config=r1zero --config.model.hf_path=/mnt/ckpt/Qwen2.5-1.5B --workdir=runs/run1
source "$(dirname "$0")/common.sh"
args=$(printf ' %q' "$@")
on_all_workers "cd r1jax && nohup python -m r1jax.train$args > train.log 2>&1 &"
echo "started on all workers of $TPU_NAME; logs: tpu_scripts/logs.sh"
