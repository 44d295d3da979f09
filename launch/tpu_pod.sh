#!/usr/bin/env bash
# Runs one command on every worker of a TPU VM pod, from the repo folder on each worker.
#
#   launch/tpu_pod.sh NAME ZONE setup            # copy this checkout, install jax[tpu] + erg-jax
#   launch/tpu_pod.sh NAME ZONE run python -m launch.sample \
#       --config=configs/sd3.py:large --workdir=/mnt/out/sd3 --config.model.checkpoint=...
#
# Every worker runs the same command: launch.sample calls jax.distributed.initialize()
# (the TPU runtime supplies the coordinator), each process writes only its own samples,
# and a preempted pod rerun with the same command finishes the rest. Keep the workdir on
# storage every worker sees (a mounted bucket or filestore) for one shared manifest.
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n '2,12p' "$0"; exit 2
fi
NAME=$1; ZONE=$2; ACTION=$3; shift 3
REMOTE_DIR=${REMOTE_DIR:-erg-jax}
ssh_all() {
  gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="$1"
}
case "$ACTION" in
  setup)
    git archive --format=tar.gz -o /tmp/erg-jax.tgz HEAD
    gcloud compute tpus tpu-vm scp /tmp/erg-jax.tgz "$NAME":/tmp/erg-jax.tgz --zone="$ZONE" --worker=all
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
