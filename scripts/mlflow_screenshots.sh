#!/usr/bin/env bash
# What a user sees in MLflow, captured with headless Chromium (Debian's `chromium` package), for a
# reviewer: the experiment page, a replica run's model and system metric charts, and the evaluation
# run's Table 3 (its overview and the table3.png artifact). Not run in CI.
#
#   scripts/mlflow_screenshots.sh [MLFLOW_URI] [OUT_DIR] [ENSEMBLE_NAME]
#   scripts/mlflow_screenshots.sh http://127.0.0.1:5000 .run/screenshots ensemble-demo     # after `make demo`
#
# Needs a running server holding an ensemble (and ideally an evaluation of it); credentials, if the
# server asks for them, from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (API lookups only: the
# browser pages of an authenticated server need a proxy that logs in).
set -euo pipefail

URI="${1:-${MLFLOW_TRACKING_URI:-http://127.0.0.1:5000}}"
URI="${URI%/}"
OUT="${2:-.run/screenshots}"
ENSEMBLE="${3:-}"
EXPERIMENT="${MLFLOW_EXPERIMENT:-inception-pipeline}"
SIZE="${SCREEN_SIZE:-1600,1400}"
WAIT_MS="${WAIT_MS:-30000}"  # virtual ms: the UI fetches metrics and draws its charts after loading

here="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$here/.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
CHROME="${CHROMIUM:-$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)}"
if [[ -z "$CHROME" ]]; then
    echo "error: headless Chromium not found: install Debian's package (sudo apt-get install chromium) or set CHROMIUM=/path/to/chrome" >&2
    exit 2
fi
if ! curl -fsS "$URI/health" >/dev/null 2>&1; then
    echo "error: no MLflow server answers at $URI (make up, or pass its URL)" >&2
    exit 2
fi
mkdir -p "$OUT"

# The run ids from the tracking API: experiment, an ensemble run, its first replica and latest evaluation.
read -r EXP_ID PARENT REPLICA EVAL < <("$PY" - "$URI" "$EXPERIMENT" "$ENSEMBLE" <<'EOF'
import sys

import mlflow

uri, name, ensemble = sys.argv[1:4]
c = mlflow.MlflowClient(uri)
exp = c.get_experiment_by_name(name)
if exp is None:
    sys.exit(f"error: no experiment '{name}' on {uri}")
f = "tags.kind = 'ensemble'" + (f" and tags.ensemble = '{ensemble}'" if ensemble else "")
parents = c.search_runs([exp.experiment_id], f, max_results=1, order_by=["attributes.start_time DESC"])
if not parents:
    sys.exit(f"error: no ensemble run{' named ' + ensemble if ensemble else ''} in experiment '{name}'")
p = parents[0].info.run_id
kids = c.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{p}'", order_by=["attributes.start_time DESC"])
rep = sorted((k for k in kids if k.data.tags.get("kind") == "replica"), key=lambda k: int(k.data.tags["replica"]))
ev = [k for k in kids if k.data.tags.get("kind") == "evaluation"]
print(exp.experiment_id, p, rep[0].info.run_id if rep else "-", ev[0].info.run_id if ev else "-")
EOF
)

shot() {  # name url
    local file="$OUT/$1.png"
    "$CHROME" --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size="$SIZE" \
        --virtual-time-budget="$WAIT_MS" --run-all-compositor-stages-before-draw --screenshot="$file" "$2" >/dev/null 2>&1 || true
    if [[ -s "$file" ]]; then echo "$file  <- $2"; else echo "warning: no screenshot for $2" >&2; fi
}

base="$URI/#/experiments/$EXP_ID"
shot 1-experiment-runs "$base/runs"
shot 2-ensemble-run "$base/runs/$PARENT"
if [[ "$REPLICA" != "-" ]]; then
    shot 3-replica-model-metrics "$base/runs/$REPLICA/model-metrics"
    shot 4-replica-system-metrics "$base/runs/$REPLICA/system-metrics"
fi
if [[ "$EVAL" != "-" ]]; then
    shot 5-evaluation-overview "$base/runs/$EVAL"
    shot 6-evaluation-table3-chart "$base/runs/$EVAL/artifacts/table3.png"
    curl -fsS -o "$OUT/table3.png" "$URI/get-artifact?path=table3.png&run_uuid=$EVAL" && echo "$OUT/table3.png (the chart itself)"
else
    echo "note: ensemble $PARENT has no evaluation run yet (jobs/evaluate_ensemble.py): no Table 3 screenshots" >&2
fi
shot 7-registered-ensemble "$URI/#/models/googlenet-ensemble"
echo "screenshots in $OUT"
