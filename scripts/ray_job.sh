#!/usr/bin/env bash
# Submit a Ray job and follow its logs, as `ray job submit` does; but Ctrl-C (or SIGTERM) here stops the
# job on the cluster too (`ray job stop`), not only the log tail: the job marks its MLflow runs KILLED and
# the same command resumes it later. Exits 0 when the job succeeded, 130 when stopped from here, else 1.
#
#   scripts/ray_job.sh RAY_BIN DASHBOARD_ADDRESS [ray job submit options] -- ENTRYPOINT...
set -uo pipefail
ray_bin=$1 address=$2
shift 2
id="${RAY_JOB_ID_PREFIX:-job}-$(date +%Y%m%d-%H%M%S)-$$"
tail_pid=

stop() {
    trap '' INT TERM
    echo
    echo "Stopping Ray job $id (interrupted here): its MLflow runs are marked KILLED; run the same command again" \
         "to resume from its checkpoints." >&2
    "$ray_bin" job stop --address "$address" "$id" >/dev/null 2>&1 \
        || echo "could not stop Ray job $id: stop it with '$ray_bin job stop --address $address $id'" >&2
    [[ -n "$tail_pid" ]] && kill "$tail_pid" 2>/dev/null
    exit 130
}
trap stop INT TERM

"$ray_bin" job submit --address "$address" --submission-id "$id" --no-wait "$@" || exit 1
# The log tail runs in the background so that this shell handles the signal at once; it ends with the job.
"$ray_bin" job logs --address "$address" --follow "$id" &
tail_pid=$!
wait "$tail_pid"
# (`ray job status` says "Job '<id>' succeeded", "... failed" or "... was stopped")
status=$("$ray_bin" job status --address "$address" "$id" 2>&1 | grep -o "Job '$id' [a-z ]*" | tail -1)
if [[ "$status" != "Job '$id' succeeded" ]]; then
    echo "Ray job $id did not succeed (${status:-no status}); its logs: $ray_bin job logs --address $address $id" >&2
    exit 1
fi
