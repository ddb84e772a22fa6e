#!/usr/bin/env bash
# Install r1jax and JAX for TPU on every worker of the slice.
source "$(dirname "$0")/common.sh"
if [ -n "$REPO_URL" ]; then
  fetch="rm -rf r1jax && git clone --branch $BRANCH $REPO_URL r1jax"
else  # no remote: copy this checkout to every worker
  tar czf /tmp/r1jax.tgz --exclude=.git --exclude=runs -C "$(dirname "$0")/.." .
  gcloud_tpu scp /tmp/r1jax.tgz "$TPU_NAME":~/r1jax.tgz --worker=all
  fetch="rm -rf r1jax && mkdir r1jax && tar xzf r1jax.tgz -C r1jax"
fi
on_all_workers "$fetch && cd r1jax && pip install -U 'jax[tpu]' && pip install -e ."
