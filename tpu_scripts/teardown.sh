#!/usr/bin/env bash
# Delete the TPU VM / slice. Its disks go with it: copy runs/ off first.
source "$(dirname "$0")/common.sh"
gcloud_tpu delete "$TPU_NAME" --quiet
