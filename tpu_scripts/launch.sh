#!/usr/bin/env bash
# Run one training command on every worker at once, as one multi-host JAX job (`--distributed`:
# each worker calls jax.distributed.initialize(), which finds the slice's other workers itself; a
# single-host VM such as v4-8 is a job of one process). On a pod slice the workdir must be a folder
# every worker sees (a shared file system). Example:
#   tpu_scripts/launch.sh --config=r1zero --config.model.hf_path=/mnt/ckpt/Qwen2.5-1.5B --workdir=/mnt/shared/run1
source "$(dirname "$0")/common.sh"
args=$(printf ' %q' "$@")
on_all_workers "cd r1jax && nohup python -m r1jax.train --distributed$args > train.log 2>&1 &"
echo "started on all workers of $TPU_NAME; logs: tpu_scripts/logs.sh"
