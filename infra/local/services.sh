#!/usr/bin/env bash
# Local services for the laptop setup: a Ray head (GCS + dashboard/job server) and an MLflow tracking
# server, both on 127.0.0.1 only. Used by `make up` / `make down` / `make status`.
#
#   infra/local/services.sh up|down|status
#
# Settings (environment; the Makefile passes its variables):
#   VENV=.venv  RUN_DIR=.run  RAY_PORT=6379  RAY_DASHBOARD_PORT=8265  RAY_CLIENT_PORT=10001
#   RAY_AGENT_PORT=52365  RAY_NUM_CPUS=(all)  RAY_TEMP_DIR=/tmp/inception-ray-$RAY_PORT  MLFLOW_PORT=5000
#
# `up` is idempotent: services whose recorded PID is alive and answering are reused. Jobs submitted to
# this Ray head find the MLflow server through MLFLOW_TRACKING_URI, set in the head's environment.
# `down` first stops this cluster's running jobs (`ray job stop`: SIGTERM, so each marks its MLflow
# runs KILLED, then SIGKILL) and waits for their driver processes to exit, then stops Ray, then
# MLflow (which the stopping jobs still write to). It stops exactly the processes `up` started: each
# was started in its own session (setsid), so its process group is the recorded PID, and only that
# group is signalled.
set -euo pipefail

VENV=${VENV:-.venv}
RUN_DIR=${RUN_DIR:-.run}
RAY_PORT=${RAY_PORT:-6379}
RAY_DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}
RAY_CLIENT_PORT=${RAY_CLIENT_PORT:-10001}
RAY_AGENT_PORT=${RAY_AGENT_PORT:-52365}
RAY_NUM_CPUS=${RAY_NUM_CPUS:-}
RAY_TEMP_DIR=${RAY_TEMP_DIR:-/tmp/inception-ray-$RAY_PORT}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
# Ray swaps 127.0.0.1 for the routable address unless this is 0 (see pipeline/__init__.py).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# Ray 2.60 turns token auth on for a new cluster whenever ~/.ray/auth_token exists, and then every
# client (ray status, job submit, the health check) needs the token. This cluster listens on
# loopback only, so we pin the mode instead of depending on what is in the home folder.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
# MLflow's usage telemetry off in the server and every job unless the user turns it on (pipeline/__init__.py).
export MLFLOW_DISABLE_TELEMETRY=${MLFLOW_DISABLE_TELEMETRY:-true}

mkdir -p "$RUN_DIR"
RUN_DIR=$(cd "$RUN_DIR" && pwd)
VENV=$(cd "$VENV" 2>/dev/null && pwd) || { echo "services: no virtualenv at ${VENV}; run 'make install'" >&2; exit 1; }
# Jobs run `python ...` with the head's environment: make that the project's interpreter.
export PATH="$VENV/bin:$PATH"
PIDS="$RUN_DIR/pids"
LOGS="$RUN_DIR/logs"
MLFLOW_DIR="$RUN_DIR/mlflow"
mkdir -p "$PIDS" "$LOGS" "$MLFLOW_DIR/artifacts"

die() { echo "services: $*" >&2; exit 1; }

# alive NAME PATTERN: the recorded PID runs and its command line still matches (guards PID reuse).
alive() {
  local f="$PIDS/$1.pid" pid
  [[ -f $f ]] || return 1
  pid=$(<"$f")
  [[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$2"
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

http_ok() {
  "$VENV/bin/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' "$1" 2>/dev/null
}
# (the dashboard first: `ray status` imports Ray, a second or two of CPU per try while Ray starts)
ray_ready() { http_ok "http://127.0.0.1:$RAY_DASHBOARD_PORT/api/version" &&
              timeout 20 "$VENV/bin/ray" status --address "127.0.0.1:$RAY_PORT" >/dev/null 2>&1; }
mlflow_ready() { http_ok "http://127.0.0.1:$MLFLOW_PORT/health"; }

# wait_for NAME CHECK SECONDS
wait_for() {
  local name=$1 check=$2 limit=$3 t=0
  while ! $check; do
    if ! alive "$name" "${name}"; then
      tail -n 20 "$LOGS/$name.log" >&2 || true
      die "$name exited during start-up (log: $LOGS/$name.log)"
    fi
    (( t++ >= limit )) && { tail -n 20 "$LOGS/$name.log" >&2; stop "$name"; die "$name did not answer within ${limit}s (log: $LOGS/$name.log)"; }
    sleep 1
  done
}

start_ray() {
  if alive ray "ray start"; then echo "ray: already running (pid $(<"$PIDS/ray.pid"))"; return; fi
  for p in "$RAY_PORT" "$RAY_DASHBOARD_PORT"; do
    port_busy "$p" && die "port $p on 127.0.0.1 is taken by another process; set RAY_PORT / RAY_DASHBOARD_PORT"
  done
  local cpus=()
  [[ -n $RAY_NUM_CPUS ]] && cpus=(--num-cpus "$RAY_NUM_CPUS")
  # Submitted jobs inherit the head's environment: they find this MLflow server without --mlflow-uri.
  # A stopped job gets 30 s (Ray's default: 3 s) between SIGTERM and SIGKILL to mark its runs KILLED.
  MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT RAY_JOB_STOP_WAIT_TIME_S=${RAY_JOB_STOP_WAIT_TIME_S:-30} \
    setsid "$VENV/bin/ray" start --head --block --disable-usage-stats \
    --node-ip-address 127.0.0.1 --port "$RAY_PORT" \
    --dashboard-host 127.0.0.1 --dashboard-port "$RAY_DASHBOARD_PORT" \
    --ray-client-server-port "$RAY_CLIENT_PORT" --dashboard-agent-listen-port "$RAY_AGENT_PORT" \
    --temp-dir "$RAY_TEMP_DIR" "${cpus[@]}" >"$LOGS/ray.log" 2>&1 </dev/null &
  echo $! >"$PIDS/ray.pid"
  wait_for ray ray_ready 90
  echo "ray: up (pid $(<"$PIDS/ray.pid")), address 127.0.0.1:$RAY_PORT, dashboard http://127.0.0.1:$RAY_DASHBOARD_PORT"
}

start_mlflow() {
  if alive mlflow "mlflow"; then echo "mlflow: already running (pid $(<"$PIDS/mlflow.pid"))"; return; fi
  port_busy "$MLFLOW_PORT" && die "port $MLFLOW_PORT on 127.0.0.1 is taken by another process; set MLFLOW_PORT"
  # One worker: the default four take ~40 s to start and this server has one user. No job runner: its
  # eight worker processes serve MLflow's GenAI jobs, which this pipeline never submits (measured: 2.3 GiB
  # and 20 CPU-seconds in its first 17 s with it, 0.5 GiB and 4 CPU-seconds without).
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}" \
  setsid "$VENV/bin/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    --backend-store-uri "sqlite:///$MLFLOW_DIR/mlflow.db" \
    --artifacts-destination "$MLFLOW_DIR/artifacts" >"$LOGS/mlflow.log" 2>&1 </dev/null &
  echo $! >"$PIDS/mlflow.pid"
  wait_for mlflow mlflow_ready 120
  echo "mlflow: up (pid $(<"$PIDS/mlflow.pid")), http://127.0.0.1:$MLFLOW_PORT"
}

# stop NAME PATTERN [leader]: signal the recorded process group only if the PID still runs what we
# started (its command line matches); a stale pid file whose PID now belongs to another program is
# dropped. With `leader`, SIGTERM goes to the group's leader first, which stops its own processes in
# order (`ray start --block` often does so in seconds; SIGTERM to every Ray process at once has them wait
# for each other for about 30 s); what is left after 15 s gets SIGTERM, then SIGKILL.
stop() {
  local name=$1 pattern=${2:-$1} order=${3:-group} f="$PIDS/$1.pid" pid
  [[ -f $f ]] || { echo "$name: not started by us"; return 0; }
  pid=$(<"$f")
  if alive "$name" "$pattern"; then
    if [[ $order == leader ]]; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 30); do
        pgrep -g "$pid" >/dev/null 2>&1 || break
        sleep 0.5
      done
    fi
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do
      pgrep -g "$pid" >/dev/null 2>&1 || break
      sleep 1
    done
    if pgrep -g "$pid" >/dev/null 2>&1; then kill -KILL -- "-$pid" 2>/dev/null || true; fi
    echo "$name: stopped (pid $pid)"
  elif [[ -d /proc/$pid ]]; then
    echo "$name: stale pid file: pid $pid is now another program ($(tr '\0' ' ' <"/proc/$pid/cmdline" | cut -c1-60)); left alone"
  else
    echo "$name: was not running (stale pid $pid)"
  fi
  rm -f "$f"
}

# stop_jobs: stop every running or pending job of this Ray head, then wait (at most 60 s) until their
# driver processes have exited. Ray sends SIGTERM, and SIGKILL RAY_JOB_STOP_WAIT_TIME_S later (30 s here).
stop_jobs() {
  alive ray "ray start" || return 0
  http_ok "http://127.0.0.1:$RAY_DASHBOARD_PORT/api/version" || return 0
  "$VENV/bin/python" - "http://127.0.0.1:$RAY_DASHBOARD_PORT" <<'EOF' || echo "jobs: could not stop the running jobs (see above)" >&2
import os, sys, time
from ray.job_submission import JobStatus, JobSubmissionClient

client = JobSubmissionClient(sys.argv[1])
live = [j for j in client.list_jobs() if j.status in (JobStatus.PENDING, JobStatus.RUNNING) and j.submission_id]
pids = {j.driver_info.pid for j in live if j.driver_info and j.driver_info.pid}
for j in live:
    print(f"jobs: stopping {j.submission_id} ({j.entrypoint[:80]})")
    client.stop_job(j.submission_id)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    stopped = all(client.get_job_status(j.submission_id).is_terminal() for j in live)
    if stopped and not any(os.path.exists(f"/proc/{p}") for p in pids):
        break
    time.sleep(0.5)
left = [p for p in pids if os.path.exists(f"/proc/{p}")]
if left:
    sys.exit(f"jobs: driver process(es) {left} still running after 60 s")
if live:
    print(f"jobs: {len(live)} stopped")
EOF
}

write_env() {
  cat >"$RUN_DIR/services.env" <<EOF
# source this file to talk to the local services from a shell
export RAY_ADDRESS=127.0.0.1:$RAY_PORT
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_AUTH_MODE=$RAY_AUTH_MODE
export RAY_JOB_ADDRESS=http://127.0.0.1:$RAY_DASHBOARD_PORT
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
EOF
}

case "${1:-}" in
  up)
    start_ray
    start_mlflow
    write_env
    echo "services: env in $RUN_DIR/services.env"
    ;;
  down)
    stop_jobs
    stop ray "ray start" leader
    stop mlflow mlflow
    ;;
  status)
    rc=0
    if alive ray "ray start" && ray_ready; then echo "ray: running (pid $(<"$PIDS/ray.pid"))"; else echo "ray: down"; rc=1; fi
    if alive mlflow "mlflow" && mlflow_ready; then echo "mlflow: running (pid $(<"$PIDS/mlflow.pid"))"; else echo "mlflow: down"; rc=1; fi
    exit $rc
    ;;
  *)
    die "usage: $0 up|down|status"
    ;;
esac
