#!/usr/bin/env bash
# Delete the TPU VM / slice (checkpoints on gs:// are kept; local disks are lost).
source "$(dirname "$0")/common.sh"
gcloud_tpu delete "$TPU_NAME" --quiet
