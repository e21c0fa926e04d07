#!/usr/bin/env bash
# Submit a Ray job and follow its logs, as `ray job submit` does; but Ctrl-C (or SIGTERM, or the terminal
# closing: SIGHUP) here stops the job on the cluster too (`ray job stop`), not only the log tail: the job
# marks its MLflow runs KILLED and the same command resumes it later. Exits 0 when the job succeeded,
# 1 when it failed or was stopped elsewhere, 130 (Ctrl-C) / 143 (SIGTERM) / 129 (SIGHUP) when stopped here.
#
#   scripts/ray_job.sh RAY_BIN DASHBOARD_ADDRESS [ray job submit options] -- ENTRYPOINT...
set -uo pipefail
ray_bin=$1 address=$2
shift 2
id="${RAY_JOB_ID_PREFIX:-job}-$(date +%Y%m%d-%H%M%S)-$$"
tail_pid=

stop() {  # $1: the exit status that names the signal
    trap '' INT TERM HUP
    [[ -n "$tail_pid" ]] && kill "$tail_pid" 2>/dev/null
    # (each call bounded: an interrupt must end this script even when the dashboard does not answer)
    case "$(job_state 30)" in
        SUCCEEDED|FAILED|STOPPED) exit "$1" ;;  # (it had ended already: nothing to stop)
    esac
    echo >&2
    echo "Stopping Ray job $id (interrupted here): its MLflow runs are marked KILLED; run the same command again" \
         "to resume from its checkpoints." >&2
    timeout 90 "$ray_bin" job stop --address "$address" "$id" >/dev/null 2>&1
    case $? in
        0) ;;
        124) echo "Ray job $id was asked to stop but had not ended 90 s later: see '$ray_bin job status --address" \
                  "$address $id'; stop it again with '$ray_bin job stop --address $address $id'" >&2 ;;
        *) echo "could not stop Ray job $id: stop it with '$ray_bin job stop --address $address $id'" >&2 ;;
    esac
    exit "$1"
}
trap 'stop 130' INT
trap 'stop 143' TERM
trap 'stop 129' HUP

job_state() {  # PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED ("Job '<id>' succeeded", "Status for job ...: RUNNING");
               # $1: seconds to wait for the answer (default: as long as it takes), else UNKNOWN
    local line
    local status=("$ray_bin" job status --address "$address" "$id")
    [[ -n "${1:-}" ]] && status=(timeout "$1" "${status[@]}")
    line=$("${status[@]}" 2>&1 | grep -E "Job '$id' |Status for job '$id'" | tail -1)
    case "$line" in
        *"' succeeded"*) echo SUCCEEDED ;;
        *"' failed"*) echo FAILED ;;
        *"' was stopped"*) echo STOPPED ;;
        *": "*) echo "${line##*: }" ;;
        *) echo UNKNOWN ;;
    esac
}

"$ray_bin" job submit --address "$address" --submission-id "$id" --no-wait "$@" || exit 1
# The log tail runs in the background so that this shell handles a signal at once. It ends with the job,
# or earlier if its connection drops (the dashboard restarting): then the job is waited for without it.
"$ray_bin" job logs --address "$address" --follow "$id" &
tail_pid=$!
wait "$tail_pid"
tail_pid=
said=
while :; do
    state=$(job_state)
    case "$state" in
        SUCCEEDED) exit 0 ;;
        FAILED|STOPPED)
            echo "Ray job $id ${state,,}; its logs: $ray_bin job logs --address $address $id" >&2
            exit 1 ;;
        PENDING|RUNNING)
            [[ -n "$said" ]] || echo "(the log stream of Ray job $id ended while it is $state; waiting for it to end:" \
                "$ray_bin job logs --address $address --follow $id)" >&2
            said=1
            sleep 5 & wait $! ;;
        *) echo "Ray job $id: its state could not be read ($state); its logs: $ray_bin job logs --address $address $id" >&2
            exit 1 ;;
    esac
done
