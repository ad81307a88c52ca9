# shellcheck shell=bash
# Sourced by the launchers: with --dry-run they print each command as one line that a shell reads back
# as the same words, instead of running it.

# The arguments as one shell-quoted line.
quote() {
  local words=() a q="'"
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then words+=("$a"); else words+=("'${a//$q/$q\\$q$q}'"); fi
  done
  printf '%s\n' "${words[*]}"
}

# Run a command, or print it when dry_run=1.
run() {
  if [[ ${dry_run:-0} -eq 1 ]]; then quote "$@"; else "$@"; fi
}
