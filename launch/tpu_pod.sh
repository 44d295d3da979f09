#!/usr/bin/env bash
# Runs one command on every worker of a TPU VM pod slice, or of several slices at once
# (multi-slice over the data-centre network), from the repo folder on each worker.
#
#   launch/tpu_pod.sh NAME ZONE setup            # copy this checkout, install jax[tpu] + erg-jax
#   launch/tpu_pod.sh NAME ZONE run python -m launch.sample \
#       --config=configs/sd3.py:large --workdir=/mnt/out/sd3 --config.model.pretrained=...
#
# Multi-slice: create the slices as one queued resource, e.g.
#   gcloud compute tpus queued-resources create NAME-qr --node-count=2 --node-prefix=NAME \
#       --accelerator-type=v5p-64 --runtime-version=RUNTIME --zone=ZONE
# then give the node count and the mesh's DCN axis; the nodes are NAME-0, NAME-1, ...
#   SLICES=2 launch/tpu_pod.sh NAME ZONE setup
#   SLICES=2 launch/tpu_pod.sh NAME ZONE run python -m launch.sample \
#       --config=configs/sd3.py:large --workdir=/mnt/out/sd3 --config.model.pretrained=... \
#       --config.mesh.dcn_data=2 --config.compile_cache_dir=/mnt/out/jax_cache
#
# Every worker of every slice runs the same command: launch.sample calls
# jax.distributed.initialize() (the TPU runtime supplies the coordinator and the slice
# of each device), each process writes only its own samples, and a preempted job rerun
# with the same command finishes the rest; with compile_cache_dir on shared storage it
# also skips compiling. Keep the workdir on storage every worker sees (a mounted bucket
# or filestore) for one shared manifest. Check the memory first, on any machine:
#   python -m launch.sample --config=... --workdir=/tmp/plan --config.dry_run=True \
#       --config.mesh.fsdp=8
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n '2,26p' "$0"; exit 2
fi
NAME=$1; ZONE=$2; ACTION=$3; shift 3
REMOTE_DIR=${REMOTE_DIR:-erg-jax}
SLICES=${SLICES:-1}
if ! [[ "$SLICES" =~ ^[1-9][0-9]*$ ]]; then
  echo "SLICES must be a whole number >= 1, got '$SLICES'" >&2; exit 2
fi
nodes() {
  if [ "$SLICES" -eq 1 ]; then echo "$NAME"; else
    for ((i = 0; i < SLICES; i++)); do echo "$NAME-$i"; done
  fi
}
# Starts the command on all workers of all slices together (the slices wait for each
# other in jax.distributed.initialize) and fails if any of them fails.
ssh_all() {
  local pids=() node status=0
  for node in $(nodes); do
    gcloud compute tpus tpu-vm ssh "$node" --zone="$ZONE" --worker=all --command="$1" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
  return $status
}
case "$ACTION" in
  setup)
    git archive --format=tar.gz -o /tmp/erg-jax.tgz HEAD
    for node in $(nodes); do
      gcloud compute tpus tpu-vm scp /tmp/erg-jax.tgz "$node":/tmp/erg-jax.tgz --zone="$ZONE" --worker=all
    done
    ssh_all "mkdir -p $REMOTE_DIR && tar -xzf /tmp/erg-jax.tgz -C $REMOTE_DIR && cd $REMOTE_DIR \
      && pip install -q 'jax[tpu]' && pip install -q -e ."
    ;;
  run)
    CMD=$(printf '%q ' "$@")
    ssh_all "cd $REMOTE_DIR && $CMD"
    ;;
  *)
    echo "unknown action $ACTION (setup or run)" >&2; exit 2
    ;;
esac
