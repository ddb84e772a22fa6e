#!/usr/bin/env bash
# Run one training command on every worker at once, as one multi-host JAX job (`--distributed`:
# each worker calls jax.distributed.initialize(), which finds the slice's other workers itself; a
# single-host VM such as v4-8 is a job of one process), with the Python that setup.sh installed. On a
# pod slice the workdir must be a folder every worker sees (a shared file system). Example:
#   tpu_scripts/launch.sh --config=r1zero_qwen7b --config.model.hf_path=/mnt/ckpt/Qwen2.5-7B \
#       --config.data.train=gsm8k --config.data.data_dir=/mnt/data --workdir=/mnt/shared/run1
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
if [ $# -eq 0 ]; then
  echo "usage: $0 --config=NAME [--config.a.b=value …] [--workdir=DIR]  (flags of python -m r1jax.train)" >&2
  exit 2
fi
args=$(printf ' %q' "$@")
on_all_workers "cd r1jax && nohup ~/$VENV/bin/python -m r1jax.train --distributed$args > train.log 2>&1 < /dev/null &"
echo "started on all workers of $TPU_NAME; logs: tpu_scripts/logs.sh"
