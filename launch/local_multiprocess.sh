#!/usr/bin/env bash
# Run one training stage as N processes on this machine (jax.distributed over 127.0.0.1, CPU
# collectives through gloo), each process with D fake CPU devices: a multi-host run in miniature.
#
#   launch/local_multiprocess.sh [-n PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT] [--dry-run] -- \
#       --config configs/vif.py:demo --workdir runs/mp --config.data.corpus=...
#
# Logs go to WORKDIR/process_<i>.log; the script exits non-zero if any process fails. --dry-run prints
# the command of each process instead of running it. XLLAVA names the xllava executable (default .venv's).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/launch/common.sh"

procs=2 devices=4 port=${XLLAVA_PORT:-29477} dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n) procs=$2; shift 2 ;;
    -d) devices=$2; shift 2 ;;
    -p) port=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ $# -gt 0 ]] || { echo "give the xllava train arguments after --" >&2; exit 2; }

workdir=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  [[ "${args[i]}" == "--workdir" ]] && workdir="${args[i+1]:-}"
done
[[ -n "$workdir" ]] || { echo "--workdir is required" >&2; exit 2; }
run mkdir -p "$workdir"

xllava=${XLLAVA:-"$here/.venv/bin/xllava"}
pids=()
for ((i = 0; i < procs; i++)); do
  cmd=(env "XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices" JAX_PLATFORMS=cpu
       "$xllava" train "$@" --coordinator "127.0.0.1:$port" --num-processes "$procs" --process-id "$i")
  log="$workdir/process_$i.log"
  if [[ $dry_run -eq 1 ]]; then
    echo "$(quote "${cmd[@]}") > $(quote "$log") 2>&1 &"
    continue
  fi
  "${cmd[@]}" >"$log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
[[ $status -eq 0 ]] || { echo "a process failed; see $workdir/process_*.log" >&2; tail -n 5 "$workdir"/process_*.log >&2; }
exit $status
