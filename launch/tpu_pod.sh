#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: the same command runs on every worker (host) of the slice,
# through `gcloud compute tpus tpu-vm ssh --worker=all`.
#
#   TPU_NAME=... ZONE=... [PROJECT=...] launch/tpu_pod.sh setup
#   TPU_NAME=... ZONE=... launch/tpu_pod.sh train --config=... --workdir=gs://BUCKET/runs/NAME ...
#   TPU_NAME=... ZONE=... launch/tpu_pod.sh sweep --config=... --sweep=NAME --workdir=gs://...
#   TPU_NAME=... ZONE=... launch/tpu_pod.sh logs    # follow worker 0's log
#   TPU_NAME=... ZONE=... launch/tpu_pod.sh stop    # SIGTERM: checkpoint at the next step, exit
#
# `setup` copies this checkout to ~/jaxalign on every worker and installs it with jax[tpu]
# and the gcs extra (gcsfs) into ~/jaxalign/.venv. The workdir is a gs:// URL, written
# straight to the bucket with the TPU VM's service account (no mount): every process
# writes its own shards of each Orbax checkpoint to WORKDIR/checkpoints/ through
# tensorstore's GCS driver, and process 0 writes config.json, metrics.jsonl, tb/ and the
# checkpoint manifests next to them through gcsfs (see jaxalign/storage.py for what an
# atomic write means on a bucket). A plain bucket works: Orbax marks a finished checkpoint
# with a commit_success.txt object rather than a rename. A local path shared by every
# worker (a Filestore/NFS mount) works as well. `train` and `sweep` run detached (nohup)
# and log to ~/jaxalign-train.log on each worker; JAXALIGN_DISTRIBUTED=auto lets JAX find
# the other workers. Each process reads only its block of rows of every global batch, so
# train.batch_size must be divisible by the number of hosts. Data, init_from and tokenizer
# may be gs:// URLs too (jsonl:gs://..., parquet:gs://..., hf:gs://...).
#
# Worked example, v5p-32 (16 chips on 4 hosts; one JAX device per chip):
#
#   gcloud compute tpus tpu-vm create my-v5p --zone=us-east5-a --accelerator-type=v5p-32 \
#       --version=v2-alpha-tpuv5
#   export TPU_NAME=my-v5p ZONE=us-east5-a
#   launch/tpu_pod.sh setup
#   launch/tpu_pod.sh train --config=configs/sft.py:demo --workdir=gs://my-bucket/runs/sft-v5p \
#       --config.mesh.data=1 --config.mesh.fsdp=16 --config.train.batch_size=256
#   launch/tpu_pod.sh logs
#   tensorboard --logdir=gs://my-bucket/runs/sft-v5p/tb      # or launch.plot / launch.eval on it
#
# GRPO on v5p-64 (32 chips, 8 hosts) with the sampler on chips of its own, one rollout ahead
# of the trainer: each host gives rl.rollout_devices / 8 = 1 chip to the sampler
# (tensor-parallel over those 8 chips on ICI), the other 24 train FSDP; the weights are
# copied across before each rollout (logged: handoff/bytes, time/handoff_s; rollout/overlap,
# rl/policy_lag; the README's RL section has the plan this follows):
#
#   launch/tpu_pod.sh train --config=configs/grpo.py:hf --workdir=gs://my-bucket/runs/grpo-v5p \
#       --config.model.init_from=hf:gs://my-bucket/models/my-sft --config.mesh.data=1 \
#       --config.mesh.fsdp=24 --config.rl.rollout_devices=8 --config.rl.rollout_mesh.tensor=8 \
#       --config.rl.async_steps=1
#
# Mesh settings for common slices:
#   v4-8   (4 chips, 1 host):   --config.mesh.data=1 --config.mesh.fsdp=4  (data=4 for small models)
#   v5p-32 (16 chips, 4 hosts): --config.mesh.data=1 --config.mesh.fsdp=16 (or data=4, fsdp=4)
#   large models on v5p-32:     --config.mesh.data=1 --config.mesh.fsdp=8 --config.mesh.tensor=2

set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the name of the TPU VM}"
: "${ZONE:?set ZONE to the zone of the TPU VM}"
REMOTE_DIR=${REMOTE_DIR:-jaxalign}
LOG=jaxalign-train.log
GCLOUD_ARGS=(--zone="${ZONE}")
if [[ -n "${PROJECT:-}" ]]; then
  GCLOUD_ARGS+=(--project="${PROJECT}")
fi

# Runs a shell command on every worker of the slice.
on_all_workers() {
  gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${GCLOUD_ARGS[@]}" --worker=all --command="$1"
}

setup() {
  local tarball
  tarball=$(mktemp --suffix=.tgz)
  tar czf "${tarball}" --exclude=.venv --exclude=.git --exclude=runs --exclude=__pycache__ \
    -C "$(dirname "$0")/.." .
  gcloud compute tpus tpu-vm scp "${tarball}" "${TPU_NAME}:jaxalign.tgz" "${GCLOUD_ARGS[@]}" \
    --worker=all
  rm -f "${tarball}"
  on_all_workers "set -e
    mkdir -p ~/${REMOTE_DIR} && tar xzf ~/jaxalign.tgz -C ~/${REMOTE_DIR}
    cd ~/${REMOTE_DIR} && python3 -m venv .venv
    .venv/bin/pip install --quiet --upgrade pip
    .venv/bin/pip install --quiet -e '.[gcs]' 'jax[tpu]'"
}

# Starts `python -m <module> <args>` detached on every worker.
start() {
  local module=$1
  shift
  local args
  args=$(printf '%q ' "$@")
  # `cd` on its own line: `cd && cmd &` would background a subshell, and $! (the pid
  # `stop` signals) would not be the trainer's.
  on_all_workers "cd ~/${REMOTE_DIR} || exit 1
    JAXALIGN_DISTRIBUTED=auto nohup .venv/bin/python -m ${module} ${args} \
      > ~/${LOG} 2>&1 < /dev/null &
    echo \$! > ~/jaxalign-train.pid; echo \"\$(hostname): started \$(cat ~/jaxalign-train.pid)\""
}

case "${1:-}" in
  setup) setup ;;
  train) shift; start launch.train "$@" ;;
  sweep) shift; start launch.sweep "$@" ;;
  logs)
    gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${GCLOUD_ARGS[@]}" --worker=0 \
      --command="tail -n 100 -f ~/${LOG}" ;;
  stop) on_all_workers "kill -TERM \$(cat ~/jaxalign-train.pid) 2>/dev/null || true" ;;
  *)
    echo "usage: TPU_NAME=... ZONE=... $0 setup|train ARGS|sweep ARGS|logs|stop" >&2
    exit 2 ;;
esac
