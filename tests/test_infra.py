"""Cluster configs validated offline: Ray's cluster-config schema, the KubeRay RayJobs, the image,
the production MLflow definition, and the storage URIs each stage accepts."""

import copy
import os
import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from pipeline.config import ConfigError, ShardConfig, load_recipe


def ray_validate(cfg):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((REPO / "ray_cluster.yaml").read_text())


def test_ray_cluster_yaml_passes_rays_validator(cluster):
    ray_validate(cluster)
    assert cluster["provider"]["type"] == "aws" and cluster["head_node_type"] == "head"


def test_broken_cluster_configs_fail_the_validator(cluster):
    broken = copy.deepcopy(cluster)
    del broken["head_node_type"]
    with pytest.raises(ValueError, match="head_node_type"):
        ray_validate(broken)
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["head"]["node_config_typo"] = {}
    with pytest.raises(Exception, match="node_config_typo|Additional properties"):
        ray_validate(broken)


def test_gpu_nodes_can_host_the_paper_ensemble(cluster):
    r = load_recipe("imagenet-paper")
    need = r.ensemble.replicas * r.ensemble.workers_per_replica * r.ensemble.gpus_per_worker
    types = cluster["available_node_types"]
    best = max(t["resources"].get("GPU", 0) * min(t["max_workers"], cluster["max_workers"]) for t in types.values())
    assert need == 28 and best >= need
    per_worker_cpu = max(t["resources"].get("CPU", 0) / max(t["resources"].get("GPU", 1), 1) for t in types.values())
    assert per_worker_cpu >= r.ensemble.cpus_per_worker


@pytest.mark.parametrize("name,script", [("rayjob-train.yaml", "jobs/train_ensemble.py"),
                                         ("rayjob-evaluate.yaml", "jobs/evaluate_ensemble.py"),
                                         ("rayjob-shard.yaml", "jobs/shard_dataset.py")])
def test_kuberay_rayjobs(name, script):
    job = yaml.safe_load((REPO / "infra" / "kuberay" / name).read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["entrypoint"].split()[:2] == ["python", script] and (REPO / script).is_file()
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0"
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    image = dockerfile_image()
    for pod in pods:
        (c,) = pod["spec"]["containers"]
        assert c["image"] == image
        env = {e["name"]: e for e in c["env"]}
        assert "secretKeyRef" in env["MLFLOW_TRACKING_URI"]["valueFrom"]
        assert any(m["mountPath"] == "/data" for m in c["volumeMounts"])
    gpus = [int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
            for g in cluster["workerGroupSpecs"]]
    assert all(n > 0 for n in gpus) if name != "rayjob-shard.yaml" else gpus == [0]  # sharding needs CPUs only


def dockerfile_image() -> str:
    text = (REPO / "infra" / "docker" / "Dockerfile").read_text()
    (tag,) = re.findall(r"-t (\S+) \.", text)
    return tag


IMAGE_FILES = ["ray_cluster.yaml", "infra/docker/Dockerfile", "infra/kuberay/rayjob-evaluate.yaml",
               "infra/kuberay/rayjob-shard.yaml", "infra/kuberay/rayjob-train.yaml"]


def image_refs(root: Path) -> dict[str, list[str]]:
    """Every image reference of the cluster configs: `image:` values and the Dockerfile's build tag."""
    refs = {}
    for f in IMAGE_FILES:
        text = (root / f).read_text()
        refs[f] = re.findall(r"^\s*image:\s*(\S+)", text, flags=re.M) + re.findall(r"-t (\S+) \.", text)
    return refs


def test_the_image_tag_is_written_once():
    image = (REPO / "infra" / "IMAGE").read_text().strip()
    refs = image_refs(REPO)
    assert all(refs.values()) and {r for rs in refs.values() for r in rs} == {image}, refs


def test_make_set_image_changes_it_in_every_config(tmp_path):
    import shutil
    import subprocess

    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    shutil.copy(REPO / "ray_cluster.yaml", tmp_path / "ray_cluster.yaml")
    shutil.copytree(REPO / "infra", tmp_path / "infra")
    new = "registry.example.com/team/inception-pipeline:2.0-gpu"
    subprocess.run(["make", "-s", "set-image", f"IMAGE={new}"], cwd=tmp_path, check=True, capture_output=True)
    assert (tmp_path / "infra" / "IMAGE").read_text().strip() == new
    refs = image_refs(tmp_path)
    assert {r for rs in refs.values() for r in rs} == {new}, refs
    p = subprocess.run(["make", "-s", "set-image", "IMAGE=no-tag"], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode != 0 and "needs a tag" in p.stderr
    assert (tmp_path / "infra" / "IMAGE").read_text().strip() == new


def test_image_is_the_one_every_config_runs(cluster):
    text = (REPO / "infra" / "docker" / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0-" in text and "pip install" in text and "pyproject.toml" in text
    assert cluster["docker"]["image"] == dockerfile_image()
    ignore = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignore and ".run" in ignore


def test_production_mlflow_binds_loopback_and_keeps_secrets_out():
    text = (REPO / "infra" / "mlflow" / "docker-compose.yml").read_text()
    compose = yaml.safe_load(text)
    assert set(compose["services"]) >= {"postgres", "minio", "mlflow"}
    for svc in compose["services"].values():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), port
    assert "${POSTGRES_PASSWORD" in text and "${MINIO_ROOT_PASSWORD" in text
    env = compose["services"]["postgres"]["environment"]
    assert env["POSTGRES_PASSWORD"].startswith("${")
    mlflow = compose["services"]["mlflow"]
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://") and "s3://" in mlflow["command"]
    for name, svc in compose["services"].items():
        command = f"{svc.get('command', '')} {svc.get('entrypoint', '')}"
        assert "pip install" not in command, name  # nothing installed at start: the image has it, pinned
        assert "PASSWORD" not in command and "ROOT_USER" not in command, name  # no secret on a command line
        image = svc.get("image", "")
        assert ":" in image and image.split(":", 1)[1] not in ("latest", "16") and "." in image.split(":", 1)[1], image
    docker = (REPO / "infra" / "mlflow" / "Dockerfile").read_text()
    assert re.search(r"psycopg2-binary==[\d.]+ boto3==[\d.]+", docker) and mlflow["build"] == "."


def test_storage_uris_fail_early_where_unsupported():
    assert load_recipe("demo", ["ensemble.storage_path=s3://bucket/ray"]).ensemble.storage_path == "s3://bucket/ray"
    with pytest.raises(ConfigError, match="ensemble.storage_path: 'ftp://'"):
        load_recipe("demo", ["ensemble.storage_path=ftp://host/x"])
    # shards: s3:// only (the object store tested, tests/test_s3.py)
    assert load_recipe("demo", ["data.shards=s3://bucket/shards"]).data.shards == "s3://bucket/shards"
    assert ShardConfig(out="s3://bucket/shards").validate().out == "s3://bucket/shards"
    with pytest.raises(ConfigError, match="data.shards: 'gs://' is not supported"):
        load_recipe("demo", ["data.shards=gs://bucket/shards"])
    with pytest.raises(ConfigError, match="out: 'gs://' is not supported"):
        ShardConfig(out="gs://bucket/shards").validate()
    with pytest.raises(ConfigError, match="names no bucket"):
        ShardConfig(out="s3:///shards").validate()


def test_dockerfile_passes_hadolint():
    import subprocess
    import sys
    from pathlib import Path

    hadolint = Path(sys.executable).parent / "hadolint"
    for dockerfile in (REPO / "infra" / "docker" / "Dockerfile", REPO / "infra" / "mlflow" / "Dockerfile"):
        p = subprocess.run([str(hadolint), str(dockerfile)], capture_output=True, text=True)
        assert p.returncode == 0, f"{dockerfile}: {p.stdout + p.stderr}"


def test_down_leaves_alone_a_process_that_took_a_stale_pid(tmp_path):
    """After a reboot a recorded PID can belong to an unrelated program: `down` must not signal it."""
    import signal
    import subprocess
    import time

    from conftest import BIN

    other = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        pids = tmp_path / "run" / "pids"
        pids.mkdir(parents=True)
        (pids / "ray.pid").write_text(f"{other.pid}\n")
        (pids / "mlflow.pid").write_text("999999999\n")  # no such process
        p = subprocess.run(["bash", str(REPO / "infra" / "local" / "services.sh"), "down"], capture_output=True,
                           text=True, env={**os.environ, "VENV": str(BIN.parent), "RUN_DIR": str(tmp_path / "run")},
                           timeout=60)
        assert p.returncode == 0, p.stderr
        assert f"ray: stale pid file: pid {other.pid} is now another program (sleep 300" in p.stdout
        assert "mlflow: was not running (stale pid 999999999)" in p.stdout
        time.sleep(0.2)
        assert other.poll() is None  # still running: not signalled
        assert not (pids / "ray.pid").exists()
    finally:
        os.killpg(other.pid, signal.SIGKILL)
        other.wait()
