#!/usr/bin/env bash
# Create a TPU VM or pod slice: TPU_NAME, ZONE, ACCELERATOR, RUNTIME from the environment (see common.sh).
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
gcloud_tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$RUNTIME" "$@"
