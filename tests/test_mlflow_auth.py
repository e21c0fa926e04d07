"""MLflow with its basic-auth app, as infra/mlflow runs it: the server refuses a client without credentials
(HTTP 401) and serves one that sets MLflow's standard MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD
(or keeps them in ~/.mlflow/credentials), the project's shard job included.

The server is real (`mlflow server --app-name basic-auth` on loopback, SQLite stores) with the project's
infra/mlflow/basic_auth.ini, only its user store moved from PostgreSQL to SQLite, and a fresh admin password
given through MLFLOW_AUTH_ADMIN_PASSWORD. The tests that need it are `slow` (the server takes 10-30 s to start
here, the shard job joins the session's Ray cluster).
"""

from __future__ import annotations

import base64
import configparser
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from conftest import BIN, REPO, make_fashion_mnist, mlflow_server_process

MLFLOW_DIR = REPO / "infra" / "mlflow"
CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def test_server_definition_turns_basic_auth_on_without_a_secret_in_it():
    compose = yaml.safe_load((MLFLOW_DIR / "docker-compose.yml").read_text())
    mlflow = compose["services"]["mlflow"]
    assert "--app-name basic-auth" in mlflow["command"]
    env = mlflow["environment"]
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"].startswith("${MLFLOW_AUTH_ADMIN_PASSWORD:?")
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"].startswith("${MLFLOW_FLASK_SERVER_SECRET_KEY:?")
    assert env["PGPASSWORD"] == "${POSTGRES_PASSWORD}"
    ini = configparser.ConfigParser()
    ini.read(MLFLOW_DIR / "basic_auth.ini")
    auth = ini["mlflow"]
    assert "admin_password" not in auth and auth["admin_username"] == "admin"
    db = urlparse(auth["database_uri"])
    assert db.scheme == "postgresql" and db.password is None and db.hostname == "postgres"
    # the user store's database is created beside the tracking database on a fresh volume
    assert f"CREATE DATABASE {db.path.lstrip('/')} OWNER mlflow;" in (MLFLOW_DIR / "initdb" / "10-mlflow-auth.sql").read_text()
    assert "./initdb:/docker-entrypoint-initdb.d:ro" in compose["services"]["postgres"]["volumes"]
    docker = (MLFLOW_DIR / "Dockerfile").read_text()
    assert "COPY basic_auth.ini /etc/mlflow/basic_auth.ini" in docker
    assert "ENV MLFLOW_AUTH_CONFIG_PATH=/etc/mlflow/basic_auth.ini" in docker and "Flask-WTF==" in docker


@dataclass
class AuthServer:
    url: str
    admin_password: str
    pipeline_password: str  # of the non-admin user `pipeline` the jobs log as


def _call(url: str, method: str = "GET", body: dict | None = None, user: tuple[str, str] | None = None):
    """(HTTP status, body) of one REST call, with HTTP basic auth when `user` is given."""
    headers = {"Content-Type": "application/json"}
    if user:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(user).encode()).decode()
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture(scope="module")
def auth_server():
    import flask_wtf  # noqa: F401  (the basic-auth app's dependency, `mlflow[auth]`: Flask-WTF in the dev extra)

    tmp = Path(tempfile.mkdtemp(prefix="ipmlauth-"))
    ini = configparser.ConfigParser()
    ini.read(MLFLOW_DIR / "basic_auth.ini")
    ini["mlflow"]["database_uri"] = f"sqlite:///{tmp}/auth.db"  # the project's config, SQLite for PostgreSQL
    with open(tmp / "basic_auth.ini", "w") as f:
        ini.write(f)
    admin_password = secrets.token_urlsafe(24)
    env = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_VARS}
    env.update(MLFLOW_AUTH_CONFIG_PATH=str(tmp / "basic_auth.ini"), MLFLOW_AUTH_ADMIN_PASSWORD=admin_password,
               MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(32))
    try:
        # (stop_timeout: the server's job consumers can hold SIGTERM for 30 s; then SIGKILL)
        with mlflow_server_process(tmp, env=env, args=("--app-name", "basic-auth"),
                                   what="mlflow server with basic auth", stop_timeout=10) as url:
            pipeline_password = secrets.token_urlsafe(24)
            # the admin creates the jobs' user through the auth app's REST API (docs/operations/mlflow-server.md)
            status, text = _call(f"{url}/api/2.0/mlflow/users/create", "POST",
                                 {"username": "pipeline", "password": pipeline_password}, ("admin", admin_password))
            assert status == 200, text
            yield AuthServer(url, admin_password, pipeline_password)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_requests_without_valid_credentials_are_refused(auth_server):
    url = auth_server.url
    create = f"{url}/api/2.0/mlflow/experiments/create"
    assert _call(create, "POST", {"name": "anonymous"})[0] == 401
    assert _call(create, "POST", {"name": "wrong-password"}, ("pipeline", "not-the-password"))[0] == 401
    assert _call(f"{url}/api/2.0/mlflow/experiments/search?max_results=1")[0] == 401
    assert _call(f"{url}/api/2.0/mlflow/users/create", "POST", {"username": "eve", "password": "x" * 16},
                 ("pipeline", auth_server.pipeline_password))[0] == 403  # only the admin makes users
    # /health stays open (for probes), so a reachable server says nothing about the client's credentials
    assert _call(f"{url}/health")[0] == 200
    status, body = _call(create, "POST", {"name": "by-pipeline"}, ("pipeline", auth_server.pipeline_password))
    assert status == 200 and json.loads(body)["experiment_id"]


@pytest.fixture
def clean_credentials(monkeypatch, tmp_path):
    """No MLflow credentials in the environment nor in ~/.mlflow/credentials (HOME is a fresh folder)."""
    for name in CREDENTIAL_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.mark.slow
def test_client_authenticates_with_the_standard_variables(auth_server, clean_credentials, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(auth_server.url)
    with pytest.raises(MlflowException, match="401"):
        client.create_experiment("client-without-credentials")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "pipeline")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", auth_server.pipeline_password)
    experiment_id = client.create_experiment("client-with-credentials")
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "val/top1_err", 0.25)
    client.set_terminated(run.info.run_id)
    assert client.get_run(run.info.run_id).data.metrics == {"val/top1_err": 0.25}


@pytest.mark.slow
def test_client_authenticates_with_the_credentials_file(auth_server, clean_credentials):
    """ray_cluster.yaml copies ~/.mlflow/credentials to every node; MLflow's client reads it there."""
    from mlflow import MlflowClient

    (clean_credentials / ".mlflow").mkdir(parents=True)
    (clean_credentials / ".mlflow" / "credentials").write_text(
        f"[mlflow]\nmlflow_tracking_username = pipeline\nmlflow_tracking_password = {auth_server.pipeline_password}\n")
    assert MlflowClient(auth_server.url).create_experiment("client-with-credentials-file")


# ----------------------------------------------------------------- the project's own job

def _shard_job(ray_cluster, server: AuthServer, tmp_path: Path, **credentials) -> subprocess.CompletedProcess:
    """jobs/shard_dataset.py on a tiny Fashion-MNIST, joining the test cluster, logging to the auth server."""
    root = make_fashion_mnist(tmp_path / "fmnist", n_train=20, n_val=10)
    env = {k: v for k, v in ray_cluster.env.items() if k not in CREDENTIAL_VARS}
    env.update(HOME=str(tmp_path / "home"), **credentials)  # no ~/.mlflow/credentials either
    cmd = [str(BIN / "python"), str(REPO / "jobs" / "shard_dataset.py"), "--source", "fashion-mnist",
           "--root", str(root), "--out", str(tmp_path / "shards"), "--workers", "1", "--mlflow-uri", server.url]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)


@pytest.mark.slow
def test_shard_job_logs_with_credentials_from_the_environment(ray_cluster, auth_server, tmp_path):
    p = _shard_job(ray_cluster, auth_server, tmp_path, MLFLOW_TRACKING_USERNAME="pipeline",
                   MLFLOW_TRACKING_PASSWORD=auth_server.pipeline_password)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    (line,) = [x for x in p.stdout.splitlines() if x.startswith("MLflow: shard run ")]
    run_id = line.split()[3]
    status, body = _call(f"{auth_server.url}/api/2.0/mlflow/runs/get?run_id={run_id}",
                         user=("admin", auth_server.admin_password))
    assert status == 200 and {"key": "stage", "value": "shard"} in json.loads(body)["run"]["data"]["tags"]


@pytest.mark.slow
def test_shard_job_without_credentials_fails_early_with_a_clear_error(ray_cluster, auth_server, tmp_path):
    p = _shard_job(ray_cluster, auth_server, tmp_path)
    assert p.returncode == 2, p.stderr[-3000:]  # the job's documented exit status for bad input/arguments
    assert "Traceback" not in p.stderr and "MLFLOW_TRACKING_USERNAME" in p.stderr, p.stderr[-3000:]
    assert not list((tmp_path / "shards").rglob("manifest.json"))  # refused before doing the work
