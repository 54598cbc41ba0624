#!/bin/bash
# The churn job's script (deploy/k8s/churn-job.yaml mounts it from the ConfigMap peer-churn).
# Reads a schedule, one event per line: "SECONDS ACTION SLOT" (from
# `scripts/experiment.py SCENARIO --print-schedule`), and at each time acts on pod peer-SLOT:
#   kill  -> kubectl delete pod --grace-period=0 --force   (SIGKILL: no checkpoint, no goodbye)
#   leave -> kubectl delete pod                           (SIGTERM: the daemon leaves gracefully)
#   join  -> nothing to do: the StatefulSet recreates a deleted pod with its volume (same identity)
# Each event goes to stdout as a JSON line; `kubectl logs job/peer-churn > RUN/events.jsonl` gives
# `scripts/experiment.py --collect RUN` the kills it cannot see in the peers' own files.
set -u
SCHEDULE=${1:-/schedule/schedule.txt}
PREFIX=${PEER_POD_PREFIX:-peer-}
KUBECTL=${KUBECTL:-kubectl}
start=$(date +%s.%N)
echo "{\"time\": $start, \"action\": \"run_start\"}"
while read -r at action slot; do
  case "$at" in ''|'#'*) continue ;; esac
  wait=$(awk -v s="$start" -v a="$at" -v n="$(date +%s.%N)" 'BEGIN { d = s + a - n; print (d > 0 ? d : 0) }')
  sleep "$wait"
  pod="$PREFIX$slot"
  case "$action" in
    kill)  $KUBECTL delete pod "$pod" --grace-period=0 --force --wait=false >&2 ;;
    leave) $KUBECTL delete pod "$pod" --wait=false >&2 ;;
    join)  ;;
    *) echo "churn: unknown action '$action' at $at" >&2; exit 2 ;;
  esac
  rc=$?
  echo "{\"time\": $(date +%s.%N), \"action\": \"$action\", \"peer\": \"$pod\", \"at\": $at, \"rc\": $rc}"
done < "$SCHEDULE"
echo "{\"time\": $(date +%s.%N), \"action\": \"schedule_done\"}"
