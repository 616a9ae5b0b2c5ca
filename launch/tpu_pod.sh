#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: the same command runs on every worker (host) of the slice,
# through `gcloud compute tpus tpu-vm ssh --worker=all`.
#
#   TPU_NAME=... ZONE=... [PROJECT=...] BUCKET=... launch/tpu_pod.sh setup
#   TPU_NAME=... ZONE=... launch/tpu_pod.sh train --config=... --workdir=/mnt/gcs/runs/NAME ...
#   TPU_NAME=... ZONE=... launch/tpu_pod.sh sweep --config=... --sweep=NAME --workdir=...
#   TPU_NAME=... ZONE=... launch/tpu_pod.sh logs    # follow worker 0's log
#   TPU_NAME=... ZONE=... launch/tpu_pod.sh stop    # SIGTERM: checkpoint at the next step, exit
#
# `setup` copies this checkout to ~/jaxalign on every worker, installs it with jax[tpu] into
# ~/jaxalign/.venv and mounts gs://$BUCKET at $MOUNT (default /mnt/gcs) with Cloud Storage
# FUSE, at the same path on every worker. Use a workdir under $MOUNT: every process writes
# its own shards of each Orbax checkpoint (tensorstore, through the mount) to
# WORKDIR/checkpoints/, and process 0 writes config.json, metrics.jsonl and tb/ next to them.
# Create the bucket with hierarchical namespace (`gcloud storage buckets create gs://B
# --enable-hierarchical-namespace --uniform-bucket-level-access`): Orbax commits a checkpoint
# by renaming its directory, which is atomic there. A Filestore (NFS) share mounted on every
# worker works as well. `train` and `sweep` run detached (nohup) and log to
# ~/jaxalign-train.log on each worker; JAXALIGN_DISTRIBUTED=auto lets JAX find the other
# workers. Each process reads only its block of rows of every global batch, so
# train.batch_size must be divisible by the number of hosts.
#
# Worked example, v5p-32 (16 chips on 4 hosts; one JAX device per chip):
#
#   gcloud compute tpus tpu-vm create my-v5p --zone=us-east5-a --accelerator-type=v5p-32 \
#       --version=v2-alpha-tpuv5
#   export TPU_NAME=my-v5p ZONE=us-east5-a BUCKET=my-bucket
#   launch/tpu_pod.sh setup
#   launch/tpu_pod.sh train --config=configs/sft.py:demo --workdir=/mnt/gcs/runs/sft-v5p \
#       --config.mesh.data=1 --config.mesh.fsdp=16 --config.train.batch_size=256
#   launch/tpu_pod.sh logs
#   gcloud storage rsync -r gs://my-bucket/runs/sft-v5p runs/sft-v5p   # then TensorBoard/plots
#
# Mesh settings for common slices:
#   v4-8   (4 chips, 1 host):   --config.mesh.data=1 --config.mesh.fsdp=4  (data=4 for small models)
#   v5p-32 (16 chips, 4 hosts): --config.mesh.data=1 --config.mesh.fsdp=16 (or data=4, fsdp=4)
#   large models on v5p-32:     --config.mesh.data=1 --config.mesh.fsdp=8 --config.mesh.tensor=2

set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the name of the TPU VM}"
: "${ZONE:?set ZONE to the zone of the TPU VM}"
MOUNT=${MOUNT:-/mnt/gcs}
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
  : "${BUCKET:?set BUCKET to the GCS bucket for workdirs (without gs://)}"
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
    .venv/bin/pip install --quiet -e . 'jax[tpu]'
    if ! command -v gcsfuse >/dev/null; then
      echo \"deb https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" \
        | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
      curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg \
        | sudo gpg --dearmor --yes -o /etc/apt/trusted.gpg.d/gcsfuse.gpg
      sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
    fi
    sudo mkdir -p ${MOUNT} && sudo chown \$(id -u):\$(id -g) ${MOUNT}
    mountpoint -q ${MOUNT} || gcsfuse --implicit-dirs --rename-dir-limit=200000 \
      --metadata-cache-ttl-secs=0 ${BUCKET} ${MOUNT}"
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
