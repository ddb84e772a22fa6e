#!/usr/bin/env bash
# Install r1jax and JAX for TPU on every worker of the slice: uv installs Python $PYTHON_VERSION into
# ~/$VENV (the runtime images' Python is too old for r1jax), then pip installs jax[tpu] and r1jax there.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
if [ -n "$REPO_URL" ]; then
  fetch="rm -rf r1jax && git clone --branch $BRANCH $REPO_URL r1jax"
else  # no remote: copy this checkout to every worker
  tar czf /tmp/r1jax.tgz --exclude=.git --exclude=runs -C "$(dirname "$0")/.." .
  gcloud_tpu scp /tmp/r1jax.tgz "$TPU_NAME":~/r1jax.tgz --worker=all
  fetch="rm -rf r1jax && mkdir r1jax && tar xzf r1jax.tgz -C r1jax"
fi
python="curl -LsSf https://astral.sh/uv/install.sh | sh && rm -rf ~/$VENV && ~/.local/bin/uv venv --seed --python $PYTHON_VERSION ~/$VENV"
on_all_workers "$fetch && $python && cd r1jax && ~/$VENV/bin/pip install -U 'jax[tpu]' && ~/$VENV/bin/pip install -e ."
