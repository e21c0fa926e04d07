"""MLflow: a reachable tracking server is checked before any work; runs of each stage are logged.

There is no silent local fallback: a job asked to track to a server it cannot reach fails before it
starts, naming the URI.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import tempfile
import threading
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path

DEFAULT_EXPERIMENT = "inception-pipeline"
ENSEMBLE_MODEL = "googlenet-ensemble"  # the registered pyfunc of a trained ensemble (pipeline.serving)


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
    client = mlflow.MlflowClient(uri)
    mlflow.set_experiment(experiment_id=setup_experiment(client, experiment))
    counts = ", ".join(f"{split}: {m['num_samples']:,} images" for split, m in manifests.items())
    out = cfg.out.rstrip("/") if "://" in cfg.out else str(Path(cfg.out).resolve())  # s3://: the URI, not a path
    note = (f"Shard job: {cfg.dataset} ({counts}) written to `{out}`. Manifests under Artifacts; the splits under Datasets.")
    with mlflow.start_run(run_name=f"shard-{cfg.dataset}", tags={"stage": "shard", "dataset": cfg.dataset,
                                                                 "mlflow.note.content": note,
                                                                 **source_tags("jobs/shard_dataset.py")}) as run:
        log_datasets(client, run.info.run_id, [(f"{out}/{cfg.dataset}/{split}", m, "shards")
                                               for split, m in manifests.items()])
        mlflow.log_params({**cfg.fingerprint(), "root": cfg.root, "out": out,
                           "splits": ",".join(cfg.splits), "workers": cfg.workers})
        metrics = {"shard/seconds": seconds, "shard/images_per_s": images_written / max(seconds, 1e-9)}
        for split, m in manifests.items():
            metrics[f"shard/{split}/num_samples"] = m["num_samples"]
            metrics[f"shard/{split}/skipped"] = len(m["skipped"])
            metrics[f"shard/{split}/repaired"] = len(m["repaired"])
            metrics[f"shard/{split}/num_shards"] = len(m["shards"])
        mlflow.log_metrics(metrics)
        log_run_settings(client, run.info.run_id, {"shard": {**asdict(cfg), "out": str(Path(cfg.out).resolve())
                                                              if "://" not in cfg.out else cfg.out}})
        with tempfile.TemporaryDirectory() as tmp:
            for split, m in manifests.items():
                p = Path(tmp) / f"{split}.json"
                p.write_text(json.dumps(m, indent=1, sort_keys=True))
                mlflow.log_artifact(str(p), artifact_path="manifests")
        return run.info.run_id


# ------------------------------------------------------------------ settings and versions of every run

PACKAGES = {"torch": "torch", "torchvision": "torchvision", "dali": "nvidia-dali-cuda120", "ray": "ray",
            "mlflow": "mlflow"}


def environment() -> dict[str, str]:
    """What a run's numbers depend on besides its settings, as MLflow tags `env.*`: Python and the
    versions of torch, torchvision, DALI, Ray and MLflow; where a GPU is visible, the CUDA version torch
    was built for, the driver and the GPU's name."""
    import importlib.metadata
    import platform

    env = {"env.python": platform.python_version()}
    for tag, dist in PACKAGES.items():
        if tag in ("torch", "torchvision"):  # the module's version names its CUDA build (2.14.1+cu130)
            try:
                env[f"env.{tag}"] = __import__(tag).__version__
                continue
            except Exception:
                pass
        try:
            env[f"env.{tag}"] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            if tag == "dali":  # another CUDA build of the DALI wheel
                dists = [d for d in importlib.metadata.distributions()
                         if (d.metadata["Name"] or "").startswith("nvidia-dali")]
                if dists:
                    env["env.dali"] = f"{dists[0].version} ({dists[0].metadata['Name']})"
    try:
        import torch

        if torch.cuda.is_available():
            env["env.cuda"] = str(torch.version.cuda)
            env["env.gpu"] = torch.cuda.get_device_name(0)
            env["env.gpu_count"] = str(torch.cuda.device_count())
            driver = _driver_version()
            if driver:
                env["env.driver"] = driver
    except Exception:  # a broken CUDA install must not stop the run: the tags just lack it
        pass
    return env


def pinned_requirements(*dists: str) -> list[str]:
    """`name==version` of each installed distribution, for a logged model's requirements.txt ("nvidia-dali":
    the DALI wheel this interpreter imports, whichever CUDA build); a local version label (torch's
    `+cu126`) is left out, as pip installs from PyPI. Given to MLflow instead of its inference, which
    loads the model in a fresh interpreter (~9 s of CPU a model) and lists whatever that interpreter
    imported: packages the model never uses, this pipeline (not an installable requirement), and for the
    ensemble not torch, DALI or Pillow."""
    import importlib.metadata

    from packaging.version import Version

    out = []
    for dist in dists:
        if dist == "nvidia-dali":
            dist = _dali_distribution() or "nvidia-dali-cuda120"
        try:
            out.append(f"{dist}=={Version(importlib.metadata.version(dist)).public}")
        except importlib.metadata.PackageNotFoundError:  # (not installed here: named, unpinned)
            out.append(dist)
    return out


def _dali_distribution() -> str | None:
    """The name of the installed distribution that provides the `nvidia.dali` this interpreter imports
    (DALI's wheels are one per CUDA build: nvidia-dali-cuda120, -cuda130...)."""
    import importlib.metadata
    import importlib.util

    try:
        spec = importlib.util.find_spec("nvidia.dali")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    origin = Path(spec.origin).resolve()
    for d in importlib.metadata.distributions():
        name = d.metadata["Name"] or ""
        if name.startswith("nvidia-dali") and Path(d.locate_file("nvidia/dali/__init__.py")).resolve() == origin:
            return name
    return None


def _driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            v = pynvml.nvmlSystemGetDriverVersion()
            return v.decode() if isinstance(v, bytes) else str(v)
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None


def log_run_settings(client, run_id: str, settings: dict, env: dict[str, str] | None = None) -> None:
    """Save a run's resolved settings as its `settings.yaml` artifact (what --dry-run prints), and the
    versions of `environment()` as `env.*` tags."""
    from pipeline.cli import settings_yaml

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "settings.yaml"
        path.write_text(settings_yaml(settings))
        client.log_artifact(run_id, str(path))
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in (environment() if env is None else env).items()])


# ------------------------------------------------------------------ what the MLflow UI shows a user

EXPERIMENT_NOTE = """GoogLeNet (Szegedy et al., 2015) reproduced as a Ray + DALI + MLflow pipeline.

- **shard-*** runs: the shard job (WebDataset tars, manifests as artifacts; datasets: the splits written).
- **ensemble-*** runs: one per trained ensemble (the recipe as params), with a child run per replica
  (`replica-<i>-<strategy>`: per-epoch validation, per-step training metrics, system metrics, the
  Polyak weights) and the evaluation runs (`evaluate-*`: the paper's Table 3 with 95% intervals and
  paired tests, as a table, a chart and metrics).
- Registered models: `googlenet-replica` (each replica) and `googlenet-ensemble` (the seven replicas
  and the 1/10/144-crop scheme as one pyfunc: `mlflow.pyfunc.load_model("models:/googlenet-ensemble@latest-complete")`,
  the newest finished ensemble, or `.../<version>`).

Primary metric: `val/top1_err` (lower is better)."""


def setup_experiment(client, name: str) -> str:
    """The experiment's id (created if missing), tagged so that MLflow's UI opens it as model training
    (not GenAI traces), with a description and `val/top1_err` (lower is better) as primary metric."""
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(name)
    tags = {"mlflow.experimentKind": "custom_model_development", "mlflow.note.content": EXPERIMENT_NOTE,
            "mlflow.experiment.primaryMetric.name": "val/top1_err",
            "mlflow.experiment.primaryMetric.greaterIsBetter": "false"}
    have = exp.tags if exp else {}
    for k, v in tags.items():
        if have.get(k) != v:
            client.set_experiment_tag(exp_id, k, v)
    return exp_id


def source_tags(entry: str) -> dict[str, str]:
    """MLflow's source tags for a run started by one of the jobs: the entry point, and the git commit
    when the code runs from a git checkout."""
    import subprocess

    tags = {"mlflow.source.name": entry, "mlflow.source.type": "JOB"}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    if len(commit) == 40:
        tags["mlflow.source.git.commit"] = commit
    return tags


def manifest_digest(manifest: dict) -> str:
    """A split's content fingerprint: sha256 over its shards' sha256s (the same shards give the same
    digest, wherever they are stored). MLflow shows it as the dataset digest."""
    import hashlib

    return hashlib.sha256("\n".join(s["sha256"] for s in manifest["shards"]).encode()).hexdigest()[:16]


def split_dataset(split_dir, manifest: dict):
    """A split as an MLflow dataset: name `<dataset>/<split>`, source the split's folder, digest from
    the manifest's shard sha256 list (the same shards give the same digest, anywhere)."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    digest = manifest_digest(manifest)
    name = f"{manifest.get('dataset', Path(str(split_dir)).parent.name)}/{manifest.get('split', Path(str(split_dir)).name)}"
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local path is a local source
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(split_dir))
    return MetaDataset(source, name=name, digest=digest)


def log_datasets(client, run_id: str, splits: list[tuple[object, dict, str]]) -> None:
    """Log (split folder, manifest, context) as the run's dataset inputs (context: training,
    validation, evaluation, shards)."""
    from mlflow.entities import DatasetInput, InputTag

    inputs = [DatasetInput(split_dataset(d, m)._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", ctx)])
              for d, m, ctx in splits]
    client.log_inputs(run_id, datasets=inputs)


# ------------------------------------------------------------------ waiting out a tracking server that is down

TRACKING_WAIT_ENV, DEFAULT_TRACKING_WAIT_S = "INCEPTION_TRACKING_WAIT_S", 900
# (MLflow's client retries 5xx answers and connection errors itself, then raises "Max retries exceeded";
# a server dying mid-answer gives "Connection broken")
_UNREACHABLE = re.compile(r"Max retries exceeded|Connection refused|Connection aborted|Connection reset|"
                          r"Connection broken|IncompleteRead|RemoteDisconnected|timed out|status code 50[0234]|"
                          r"(?:500|502|503|504) Server Error|TEMPORARILY_UNAVAILABLE")


def tracking_unreachable(error: BaseException) -> bool:
    """Whether an MLflow client error means the server could not be reached or answered 5xx (it restarts,
    its database fails over, a proxy in front of it has no backend), rather than refusing the request."""
    return bool(_UNREACHABLE.search(f"{type(error).__name__}: {error}"))


def tracking_wait_s() -> int:
    from pipeline.config import env_int

    return env_int(TRACKING_WAIT_ENV, DEFAULT_TRACKING_WAIT_S, 0, "seconds")


def short_client_retries() -> None:
    """MLflow's own retries inside one call, shortened in this process (unless set): its default backoff
    grows to two minutes a wait, long after the server is back; the waiting is `wait_for_tracking`'s."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def wait_for_tracking(fn, *args, uri: str = "", who: str = "the job", **kwargs):
    """fn(*args, **kwargs), waiting out a tracking server that cannot be reached: the call is retried
    every few seconds (doubling from 1 s to at most 10 s) for up to $INCEPTION_TRACKING_WAIT_S (default
    900) seconds, then one TrackingError says so. An error that is not about reaching the server (a
    refused request) is raised at once. The one waiting policy of every tracking call of the training
    (driver, replicas' tasks, rank 0's logger)."""
    import time

    deadline, delay, wait_s = None, 1.0, None
    while True:
        try:
            result = fn(*args, **kwargs)
        except Exception as e:
            if not tracking_unreachable(e):
                raise
            now = time.monotonic()
            if deadline is None:
                wait_s = tracking_wait_s()
                deadline, since = now + wait_s, now
                print(f"MLflow at {uri} cannot be reached; {who} waits for it, up to {wait_s} s ({TRACKING_WAIT_ENV})",
                      flush=True)
            if now >= deadline:
                last = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
                raise TrackingError(f"MLflow at {uri} could not be reached for {wait_s} s ({TRACKING_WAIT_ENV}); the "
                                    "checkpoints are intact: run the same command again once it is back, it resumes "
                                    f"and logs what MLflow lacks (last error: {last})") from None
            time.sleep(min(delay, max(0.0, deadline - now)))
            delay = min(delay * 2, 10.0)
            continue
        if deadline is not None:
            print(f"MLflow at {uri} reached again after {time.monotonic() - since:,.0f} s; {who} goes on", flush=True)
        return result


class PatientClient:
    """An MlflowClient whose every call waits out a tracking server that cannot be reached
    (`wait_for_tracking`). `raw` is the plain client, for calls that must not wait (marking runs ended
    while the job stops)."""

    def __init__(self, uri: str, who: str = "the job"):
        import mlflow

        short_client_retries()
        self.raw, self.uri, self.who = mlflow.MlflowClient(uri), uri, who

    def __getattr__(self, name):
        attr = getattr(self.raw, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            return wait_for_tracking(attr, *args, uri=self.uri, who=self.who, **kwargs)

        return call


class JobStopped(BaseException):
    """The job was asked to stop (SIGTERM: what `ray job stop` sends first, then SIGKILL 3 s later;
    or SIGINT). A BaseException, so that no `except Exception` on the way swallows it."""


@contextlib.contextmanager
def stop_on_signals():
    """Within the block, SIGTERM raises JobStopped in the main thread (and SIGINT KeyboardInterrupt, as
    usual), so that the job can mark its MLflow runs KILLED before it exits. Ray's driver handler
    (`sys.exit`) is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise JobStopped(signal.Signals(signum).name)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def stop_of(error: BaseException) -> BaseException | None:
    """The stop (JobStopped or KeyboardInterrupt) behind an error, if any: raised inside a C extension
    (Ray's `wait`), the stop arrives wrapped in a SystemError whose cause it is."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, JobStopped | KeyboardInterrupt):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def end_runs(client, run_ids, error: BaseException) -> str:
    """Mark runs ended by `error`: KILLED when the job was stopped (JobStopped, KeyboardInterrupt,
    SystemExit from a signal), else FAILED with the error as the run's `error` tag. Best effort: a
    tracking server that is down must not hide the original error. Returns the status used."""
    client = getattr(client, "raw", client)  # (never wait here: a stop gives seconds)
    stop = stop_of(error) or (error if isinstance(error, SystemExit) else None)
    status = "KILLED" if stop is not None else "FAILED"
    text = (f"stopped ({stop})" if stop is not None else f"{type(error).__name__}: {error}")[:5000]
    # States first (the part that matters, and `ray job stop` sends SIGKILL 3 s after SIGTERM by
    # default), in the order given (callers put the parent run first), then the error tags.
    for run_id in run_ids:
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, status=status)
    for run_id in run_ids:
        with contextlib.suppress(Exception):
            client.set_tag(run_id, "error", text)
    return status
