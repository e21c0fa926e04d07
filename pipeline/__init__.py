"""inception-pipeline: GoogLeNet (Szegedy et al., CVPR 2015) as a Ray + DALI + MLflow pipeline."""

import os as _os

__version__ = "0.1.0"

_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def _default_ray_to_loopback() -> None:
    """Keep a *local* Ray cluster on loopback.

    On Linux, Ray replaces 127.0.0.1 with the machine's routable address (so that other nodes
    could join), which opens the GCS/raylet ports on that interface. For the laptop setup we
    want every port on loopback, and Ray only keeps 127.0.0.1 when
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0. It must be set before `ray` is imported, and only when
    the cluster is (or will be) local: a driver joining a real multi-node cluster needs its
    routable address, so an explicit non-loopback RAY_ADDRESS leaves the variable alone.

    Ray 2.60 also switches token authentication on for a new local cluster (and whenever
    ~/.ray/auth_token exists), after which every client needs the token. A loopback-only cluster
    gets RAY_AUTH_MODE=disabled unless the user set a mode; clusters configure their own.
    """
    address = _os.environ.get("RAY_ADDRESS", "")
    host = address.split("://")[-1].rsplit(":", 1)[0] if address else ""
    if not address or host in _LOOPBACK:
        _os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        _os.environ.setdefault("RAY_AUTH_MODE", "disabled")


_default_ray_to_loopback()


def _quiet_logs() -> None:
    """Job logs show each progress line once: no per-file artifact progress bars from MLflow (a replica
    downloads and uploads weights; their bars only add noise to `ray job logs`). Set the variable to
    true to have them back."""
    _os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _no_mlflow_telemetry() -> None:
    """MLflow's usage telemetry off unless the user turns it on (MLFLOW_DISABLE_TELEMETRY=false): it
    contacts an outside server from every driver and worker, and where that server cannot be reached
    (a cluster without internet access) its background thread removes an environment variable while a
    tracking request in another thread reads the environment, which failed that request with
    `API request ... failed with exception '_MLFLOW_TELEMETRY_SESSION_ID'` and a replica's attempt with it.
    Read when mlflow is imported; where it already is (`mlflow models serve` loading the served model),
    its telemetry is set up again under this setting."""
    _os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import sys

    if "mlflow.telemetry" in sys.modules:
        try:
            sys.modules["mlflow.telemetry"].set_telemetry_client()
        except Exception:  # (telemetry is best effort on MLflow's side too)
            pass


_no_mlflow_telemetry()


_quiet_logs()
