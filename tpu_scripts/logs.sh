#!/usr/bin/env bash
# Follow worker 0's training log.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
gcloud_tpu ssh "$TPU_NAME" --worker=0 --command="tail -f r1jax/train.log"
