#!/usr/bin/env bash
# Run one training stage on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE [--project P] [--setup] [--dry-run] -- \
#       --config configs/vif.py:xllava_13b --workdir gs://bucket/runs/vif --config.init=...
#
# --setup first copies this repository's sources to ~/xllava_jax on every worker and runs
# `make install-tpu` there (a .venv-tpu with libtpu). The same `xllava train` command then starts on all
# workers at once (jax.distributed finds the pod by itself); each worker's output goes to
# logs/<TPU_NAME>/worker_<host>.log here, collected at the end. --dry-run prints the gcloud commands.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
source "$repo/launch/common.sh"

[[ $# -ge 2 && "$1" != -* ]] || { sed -n '2,10p' "$0"; exit 2; }
tpu=$1 zone=$2; shift 2
where=(--zone "$zone") setup=0 dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --project) where+=(--project "$2"); shift 2 ;;
    --setup) setup=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
[[ $# -gt 0 ]] || { echo "give the xllava train arguments after --" >&2; exit 2; }
where+=(--worker=all)

ssh_all() { run gcloud compute tpus tpu-vm ssh "$tpu" "${where[@]}" --command "$1"; }
if [[ $setup -eq 1 ]]; then
  ssh_all "mkdir -p ~/xllava_jax"
  run gcloud compute tpus tpu-vm scp --recurse "$repo"/{setup.py,Makefile,xllava_jax,configs,launch} \
    "$tpu:~/xllava_jax/" "${where[@]}"
  ssh_all "cd ~/xllava_jax && make install-tpu"
fi
train="mkdir -p logs && .venv-tpu/bin/xllava train $(quote "$@") > logs/worker_\$(hostname).log 2>&1"
ssh_all "cd ~/xllava_jax && $train" || status=$?
run mkdir -p "logs/$tpu"
run gcloud compute tpus tpu-vm scp "$tpu:~/xllava_jax/logs/*" "logs/$tpu/" "${where[@]}" || true
exit "${status:-0}"
