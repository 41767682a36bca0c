#!/usr/bin/env bash
# Train cimd_jax on a Cloud TPU VM slice (single host or a pod slice).
#
# Usage:
#   bash launch/tpu_vm.sh create              # create the TPU VM
#   bash launch/tpu_vm.sh install             # copy the repo and install on every worker
#   bash launch/tpu_vm.sh train [main flags]  # start training on every worker
#   bash launch/tpu_vm.sh delete              # delete the TPU VM
#
# Every command runs on all workers (--worker=all). On TPU, JAX finds the other
# hosts itself in jax.distributed.initialize() (main.py --distributed). Use a
# gs:// WORKDIR so all hosts write one checkpoint copy and one set of logs.
#
# What to edit (or export before running): TPU_NAME, ZONE, ACCELERATOR (e.g.
# v4-32), RUNTIME (the TPU software version), PROJECT, WORKDIR, CONFIG.
set -euo pipefail

TPU_NAME="${TPU_NAME:-cimd-jax}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR="${ACCELERATOR:-v4-8}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null)}"
WORKDIR="${WORKDIR:-gs://YOUR_BUCKET/cimd_jax/run1}"
CONFIG="${CONFIG:-configs/lidc.py}"
REMOTE_DIR="cimd_jax"

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
    --worker=all --command="$1"
}

cmd="${1:-}"
shift || true
case "$cmd" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
    ;;
  install)
    gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" --project="$PROJECT" \
      --worker=all "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" \
      "$TPU_NAME:~/$REMOTE_DIR"
    # The TPU build of jax replaces the CPU one from requirements.txt.
    ssh_all "cd ~/$REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt && .venv/bin/pip install -q 'jax[tpu]==0.10.2' && .venv/bin/pip install -q --no-deps -e ."
    ;;
  train)
    extra="$*"
    ssh_all "cd ~/$REMOTE_DIR && TF_CPP_MIN_LOG_LEVEL=3 nohup .venv/bin/python -m cimd_jax.main --distributed --mode=train --config=$CONFIG --workdir=$WORKDIR $extra > train.log 2>&1 &"
    echo "started; follow with: gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0 --command='tail -f ~/$REMOTE_DIR/train.log'"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --quiet
    ;;
  *)
    echo "usage: bash launch/tpu_vm.sh create|install|train|delete [flags]" >&2
    exit 2
    ;;
esac
