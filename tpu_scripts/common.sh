#!/usr/bin/env bash
# Settings shared by the TPU scripts; override any of them in the environment.
set -euo pipefail
: "${TPU_NAME:=r1jax}"
: "${ZONE:=us-central2-b}"
: "${ACCELERATOR:=v4-8}"                 # e.g. v4-32, v5p-64, v6e-8 (a pod slice has several workers)
: "${RUNTIME:=tpu-ubuntu2204-base}"      # v5p: v2-alpha-tpuv5; v5e / v6e: v2-alpha-tpuv5-lite / v2-alpha-tpuv6e
: "${REPO_URL:=}"                        # where workers clone r1jax from (or copy with scp, see setup.sh)
: "${BRANCH:=main}"
: "${PYTHON_VERSION:=3.12}"              # r1jax needs >= 3.11; the runtime images ship Ubuntu 22.04's 3.10
: "${VENV:=r1jax-venv}"                  # the virtual environment on every worker, in its home folder
gcloud_tpu() { gcloud compute tpus tpu-vm "$@" --zone="$ZONE"; }
on_all_workers() { gcloud_tpu ssh "$TPU_NAME" --worker=all --command="$1"; }
