"""MLflow's usage telemetry is off in every process that imports the pipeline (drivers, Ray workers, the
served model), unless the user turns it on: offline, its background thread failed tracking requests."""

import os
import subprocess
import sys

from conftest import REPO

PROBE = ("import pipeline, mlflow; from mlflow.telemetry import get_telemetry_client; "
         "print('client', get_telemetry_client() is not None)")
# what mlflow itself reads as "a test or CI run" (telemetry off there anyway): not in a user's environment
NOT_A_USER = {"PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"}


def probe(code: str = PROBE, **extra) -> str:
    env = {k: v for k, v in os.environ.items() if k not in NOT_A_USER} | extra
    p = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout.strip().splitlines()[-1]


def test_telemetry_is_off_unless_the_user_turns_it_on():
    assert probe() == "client False"
    assert probe(MLFLOW_DISABLE_TELEMETRY="false") == "client True"  # the user's choice stands


def test_telemetry_is_off_when_mlflow_was_imported_first():
    """As in `mlflow models serve`: MLflow starts, then loads the served model, which imports the pipeline."""
    assert probe(PROBE.replace("import pipeline, mlflow", "import mlflow; import pipeline")) == "client False"
