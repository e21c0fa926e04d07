"""Ray 2.60's token authentication, as the cloud configs turn it on: `ray_cluster.yaml` (RAY_AUTH_MODE=token
in every container, the token file copied to each node) and the KubeRay RayJobs (KubeRay injects
RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from a Secret). A real Ray head started that way must refuse a
client without the token and serve one with it."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import BIN, RAY_STOP_S, REPO, free_port, stop_group, wait_until


def test_launcher_config_turns_token_auth_on_without_a_secret_in_it():
    text = (REPO / "ray_cluster.yaml").read_text()
    cluster = yaml.safe_load(text)
    assert "--env RAY_AUTH_MODE=token" in cluster["docker"]["run_options"]
    # the token and the MLflow credentials come from the user's machine (outside the repo), into every node
    assert cluster["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    assert cluster["file_mounts"]["/home/ray/.mlflow/credentials"] == "~/.mlflow/credentials"
    assert "RAY_AUTH_TOKEN=" not in text and "RAY_AUTH_MODE=disabled" not in text


def _status(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _answers(url: str, token: str) -> bool:
    try:
        return _status(url, token) == 200
    except OSError:  # not listening yet
        return False


@pytest.fixture(scope="module")
def token_cluster():
    """A Ray head on loopback with RAY_AUTH_MODE=token and the token in RAY_AUTH_TOKEN, as KubeRay starts it."""
    tmp = Path(tempfile.mkdtemp(prefix="iptok-", dir="/tmp"))
    token = secrets.token_hex(32)
    dash = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update(HOME=str(tmp / "home"), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=f"{BIN}:{env['PATH']}",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
           "--node-ip-address", "127.0.0.1", "--port", str(free_port()),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
           "--temp-dir", str(tmp / "ray"), "--num-cpus", "1"]
    log = tmp / "ray.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{dash}"
        wait_until(lambda: _answers(f"{url}/api/version", token), 120, "ray head with token auth", proc, log)
        yield url, token, tmp
    finally:
        stop_group(proc, timeout=RAY_STOP_S)
        shutil.rmtree(tmp, ignore_errors=True)


def test_job_server_refuses_requests_without_the_token(token_cluster):
    url, token, _ = token_cluster
    assert _status(f"{url}/api/jobs/") == 401  # no token
    assert _status(f"{url}/api/jobs/", "not-the-token") == 403
    assert _status(f"{url}/api/jobs/", token) == 200


def test_ray_job_cli_needs_the_token(token_cluster):
    """`ray job` from a laptop after a port-forward: RAY_AUTH_MODE=token and the token in a file (the
    launcher's ~/.ray/auth_token, or RAY_AUTH_TOKEN_PATH)."""
    url, token, tmp = token_cluster
    token_file = tmp / "client-token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    base.update(HOME=str(tmp / "client-home"))

    def ray_job_list(**env):
        return subprocess.run([str(BIN / "ray"), "job", "list", "--address", url], capture_output=True, text=True,
                              env={**base, **env}, timeout=120)

    refused = ray_job_list(RAY_AUTH_MODE="token")  # no token anywhere
    assert refused.returncode != 0 and "AuthenticationError" in refused.stderr, refused.stderr[-2000:]
    accepted = ray_job_list(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    assert accepted.returncode == 0, accepted.stderr[-2000:]
