#!/usr/bin/env bash
# Run one training stage on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE [--project P] [--setup] -- \
#       --config configs/vif.py:xllava_13b --workdir gs://bucket/runs/vif --config.init=...
#
# --setup first copies this repository to every worker and runs `make install` there. The same
# `xllava train` command then starts on all workers at once (jax.distributed finds the pod by
# itself); each worker's output goes to logs/<TPU_NAME>/worker_<i>.log here, collected at the end.
set -euo pipefail

[[ $# -ge 2 && "$1" != -* ]] || { sed -n '2,9p' "$0"; exit 2; }
tpu=$1 zone=$2; shift 2
project=() setup=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --project) project=(--project "$2"); shift 2 ;;
    --setup) setup=1; shift ;;
    --) shift; break ;;
    *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
[[ $# -gt 0 ]] || { echo "give the xllava train arguments after --" >&2; exit 2; }

ssh_all() { gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" "${project[@]}" --worker=all --command "$1"; }
repo=$(cd "$(dirname "$0")/.." && pwd)
if [[ $setup -eq 1 ]]; then
  gcloud compute tpus tpu-vm scp --recurse "$repo" "$tpu":~/xllava_jax --zone "$zone" "${project[@]}" --worker=all
  ssh_all "cd ~/xllava_jax && make install && .venv/bin/pip install -q 'jax[tpu]==0.10.2'"
fi
quoted=$(printf '%q ' "$@")
ssh_all "cd ~/xllava_jax && mkdir -p logs && .venv/bin/xllava train $quoted > logs/worker_\$(hostname).log 2>&1" || status=$?
mkdir -p "logs/$tpu"
gcloud compute tpus tpu-vm scp "$tpu":~/xllava_jax/logs/* "logs/$tpu/" --zone "$zone" "${project[@]}" --worker=all || true
exit "${status:-0}"
