#!/usr/bin/env bash
# Delete the TPU VM / slice. Its disks go with it: copy runs/ off first.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
gcloud_tpu delete "$TPU_NAME" --quiet
