"""MLflow: a reachable tracking server is checked before any work; runs of each stage are logged.

There is no silent local fallback: a job asked to track to a server it cannot reach fails before it
starts, naming the URI.
"""

from __future__ import annotations

import json
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_EXPERIMENT = "inception-pipeline"


class TrackingError(Exception):
    pass


def resolve_uri(uri: str | None) -> str | None:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def require_server(uri: str, timeout: float = 5.0) -> None:
    """Fail with a one-line message naming the URI if an http(s) tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return  # file:/sqlite: stores are opened by mlflow itself and fail loudly there
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            if r.status != 200:
                raise TrackingError(f"MLflow tracking server {uri} answered /health with HTTP {r.status}")
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingError(f"MLflow tracking server {uri} is not reachable ({reason}); start it "
                            "(make up) or point --mlflow-uri / MLFLOW_TRACKING_URI at a running one") from None
    require_access(uri)


def require_access(uri: str) -> None:
    """One authenticated read before any work: a server with authentication (MLflow's basic-auth app
    leaves /health open) that refuses this client's credentials fails the job here, not after it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except MlflowException as e:
        text = str(e)
        if "401" in text or "403" in text or "not authenticated" in text.lower() or "permission" in text.lower():
            who = os.environ.get("MLFLOW_TRACKING_USERNAME")
            raise TrackingError(
                f"MLflow tracking server {uri} refused " + (f"user {who!r}" if who else "a client without credentials")
                + ": set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the "
                "job's environment (on a cluster: the Ray nodes' environment)") from None
        raise


def log_shard_run(uri: str, experiment: str, cfg, manifests: dict[str, dict], seconds: float,
                  images_written: int) -> str:
    """One MLflow run per shard job: settings as params, counts as metrics, manifests as artifacts."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=f"shard-{cfg.dataset}", tags={"stage": "shard", "dataset": cfg.dataset}) as run:
        mlflow.log_params({**cfg.fingerprint(), "root": cfg.root, "out": str(Path(cfg.out).resolve()),
                           "splits": ",".join(cfg.splits), "workers": cfg.workers})
        metrics = {"shard/seconds": seconds, "shard/images_per_s": images_written / max(seconds, 1e-9)}
        for split, m in manifests.items():
            metrics[f"shard/{split}/num_samples"] = m["num_samples"]
            metrics[f"shard/{split}/skipped"] = len(m["skipped"])
            metrics[f"shard/{split}/repaired"] = len(m["repaired"])
            metrics[f"shard/{split}/num_shards"] = len(m["shards"])
        mlflow.log_metrics(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            for split, m in manifests.items():
                p = Path(tmp) / f"{split}.json"
                p.write_text(json.dumps(m, indent=1, sort_keys=True))
                mlflow.log_artifact(str(p), artifact_path="manifests")
        return run.info.run_id
