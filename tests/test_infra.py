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


# ------------------------------------------------------------------ network, permissions, secrets

def test_cluster_nodes_use_our_security_group_and_instance_profiles_not_rays_defaults(cluster):
    """Without SecurityGroupIds Ray's launcher makes a group with SSH open to 0.0.0.0/0; without an
    IamInstanceProfile it gives the head EC2 and S3 full access (ray.autoscaler._private.aws.config)."""
    assert "0.0.0.0/0" not in yaml.safe_dump(cluster)  # (the comments may name it)
    for name, node_type in cluster["available_node_types"].items():
        nc = node_type["node_config"]
        assert nc["SecurityGroupIds"] == ["sg-0123456789abcdef0"], name  # the placeholder docs/guides/aws.md names
        want = "inception-pipeline-head" if name == cluster["head_node_type"] else "inception-pipeline-node"
        assert nc["IamInstanceProfile"]["Arn"].endswith(f":instance-profile/{want}"), name


def test_node_policy_grants_s3_on_the_project_buckets_only():
    import json

    for name in ("node-policy.json", "head-autoscaler-policy.json"):
        policy = json.loads((REPO / "infra" / "aws" / name).read_text())
        for st in policy["Statement"]:
            actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
            resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
            assert st["Effect"] == "Allow" and not any(a.endswith(":*") or a == "*" for a in actions), st
            if any(a.startswith("s3:") for a in actions):
                assert all(r.startswith(("arn:aws:s3:::inception-pipeline-shards", "arn:aws:s3:::inception-pipeline-runs"))
                           for r in resources), st
            if any(a in ("ec2:TerminateInstances", "ec2:StopInstances") for a in actions):
                assert st["Condition"]["StringEquals"]["aws:ResourceTag/ray-cluster-name"] == "inception-pipeline"
            if "iam:PassRole" in actions:
                assert resources == ["arn:aws:iam::*:role/inception-pipeline-node"]
    node = json.loads((REPO / "infra" / "aws" / "node-policy.json").read_text())
    assert {a.split(":")[0] for st in node["Statement"] for a in st["Action"]} == {"s3"}


@pytest.mark.parametrize("cidr,ok", [("0.0.0.0/0", False), ("10.0.0.0/4", False), ("any", False),
                                     ("198.51.100.0/24", True)])
def test_security_group_script_refuses_ssh_from_anywhere(tmp_path, cidr, ok):
    """The script stops before calling AWS when SSH_CIDR is the internet; with a range, it calls `aws`
    (here a stand-in on PATH that records its arguments)."""
    import subprocess

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "aws").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\necho sg-0abc\n')
    (fake / "aws").chmod(0o755)
    p = subprocess.run([str(REPO / "infra" / "aws" / "create_security_group.sh")], capture_output=True, text=True,
                       env={"PATH": f"{fake}:/usr/bin:/bin", "SSH_CIDR": cidr, "VPC_ID": "vpc-1"})
    if ok:
        assert p.returncode == 0 and p.stdout.strip() == "sg-0abc", p.stderr
        calls = (tmp_path / "calls").read_text()
        assert f"--port 22 --cidr {cidr}" in calls and "0.0.0.0/0" not in calls
    else:
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and not (tmp_path / "calls").exists(), p.stderr


def test_mlflow_image_runs_as_an_unprivileged_user():
    docker = (REPO / "infra" / "mlflow" / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", docker, re.M)
    assert users and users[-1] not in ("root", "0") and users[-1].split(":")[0] != "0"


SECRET_FILES = ["infra/mlflow/.env", "infra/mlflow/prod.env", "infra/mlflow/.env.local", ".env.production", ".env"]


def test_env_files_never_travel_with_a_submitted_job(tmp_path, monkeypatch):
    """Ray's own working-dir packager (what `ray job submit --working-dir .` uploads) leaves out .env files,
    through .gitignore and, with .gitignore not read (RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1), .rayignore."""
    import shutil
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    work = tmp_path / "work"
    (work / "infra" / "mlflow").mkdir(parents=True)
    (work / "jobs").mkdir()
    for name in (".gitignore", ".rayignore"):
        shutil.copy(REPO / name, work / name)
    for secret in SECRET_FILES:
        (work / secret).write_text("POSTGRES_PASSWORD=secret\n")
    (work / "infra" / "mlflow" / "docker-compose.yml").write_text("services: {}\n")
    (work / "jobs" / "shard_dataset.py").write_text("print('job')\n")
    for include_gitignore in (True, False):
        pkg = tmp_path / f"pkg-{include_gitignore}.zip"
        create_package(str(work), pkg, include_gitignore=include_gitignore)
        names = set(zipfile.ZipFile(pkg).namelist())
        assert "jobs/shard_dataset.py" in names and "infra/mlflow/docker-compose.yml" in names, names
        assert not [n for n in names if ".env" in n], names


# ------------------------------------------------------------------ the head's role, request by request

def _matches(pattern, value: str) -> bool:
    import fnmatch

    return any(fnmatch.fnmatchcase(value, p) for p in ([pattern] if isinstance(pattern, str) else pattern))


def _condition_holds(condition: dict, ctx: dict) -> bool:
    """IAM's rule for the operators the head's policy uses: every operator and key must hold; a key the
    request lacks fails StringEquals/ArnLike, and passes ForAllValues (no value to disagree)."""
    for op, keys in condition.items():
        for key, want in keys.items():
            want = [want] if isinstance(want, str) else want
            have = ctx.get(key)
            if op == "StringEquals":
                ok = have is not None and have in want
            elif op == "ArnLike":
                ok = have is not None and _matches(want, have)
            elif op == "ForAllValues:StringEquals":
                ok = all(v in want for v in (have or []))
            else:
                raise AssertionError(f"operator {op} is not modelled by this test: add it here first")
            if not ok:
                return False
    return True


def _allowed(policy: dict, action: str, resource: str, ctx: dict) -> bool:
    return any(st["Effect"] == "Allow" and _matches(st["Action"], action) and _matches(st["Resource"], resource)
               and _condition_holds(st.get("Condition", {}), ctx) for st in policy["Statement"])


def test_head_role_manages_this_clusters_workers_and_nothing_else(cluster):
    """The head's role is every submitted job's: it must let Ray's autoscaler launch, tag and terminate this
    cluster's workers (the tags of ray.autoscaler.tags, the calls of its AWSNodeProvider) and let a job do
    nothing else with instances: not tag an arbitrary instance as the cluster's and then terminate it, not
    relabel the head a worker, not launch other instance types, in other regions or security groups."""
    import json

    from ray.autoscaler import tags

    policy = json.loads((REPO / "infra" / "aws" / "head-autoscaler-policy.json").read_text())
    name, region = cluster["cluster_name"], cluster["provider"]["region"]
    assert cluster["provider"]["cache_stopped_nodes"] is False  # (else the autoscaler also stops, starts, relabels)
    head = cluster["head_node_type"]
    workers = {t["node_config"]["InstanceType"] for n, t in cluster["available_node_types"].items() if n != head}
    (sg,) = {g for t in cluster["available_node_types"].values() for g in t["node_config"]["SecurityGroupIds"]}
    acct = "123456789012"
    instance = f"arn:aws:ec2:{region}:{acct}:instance/i-0123456789abcdef0"
    cluster_tag = f"aws:ResourceTag/{tags.TAG_RAY_CLUSTER_NAME}"
    kind_tag = f"aws:ResourceTag/{tags.TAG_RAY_NODE_KIND}"
    worker_tags = {cluster_tag: name, kind_tag: tags.NODE_KIND_WORKER}
    head_tags = {cluster_tag: name, kind_tag: tags.NODE_KIND_HEAD}

    node_profile = f"arn:aws:iam::{acct}:instance-profile/inception-pipeline-node"

    def launch(instance_type="g5.12xlarge", where=region, group=sg, kind=tags.NODE_KIND_WORKER,
               profile=node_profile) -> bool:
        """RunInstances as AWSNodeProvider._create_node calls it: every resource it touches, and CreateTags
        for the instance's launch tags (TagSpecifications)."""
        launch_tags = {tags.TAG_RAY_CLUSTER_NAME: name, tags.TAG_RAY_NODE_KIND: kind, "Name": "ray-w",
                       tags.TAG_RAY_NODE_STATUS: tags.STATUS_UNINITIALIZED, tags.TAG_RAY_LAUNCH_CONFIG: "h",
                       tags.TAG_RAY_USER_NODE_TYPE: "gpu-g5"}
        ctx = {"aws:RequestedRegion": where, "ec2:InstanceType": instance_type, "ec2:InstanceProfile": profile,
               "aws:TagKeys": list(launch_tags), **{f"aws:RequestTag/{k}": v for k, v in launch_tags.items()}}
        new = f"arn:aws:ec2:{where}:{acct}:instance/*"
        others = [f"arn:aws:ec2:{where}::image/ami-0abc", f"arn:aws:ec2:{where}:{acct}:subnet/subnet-1",
                  f"arn:aws:ec2:{where}:{acct}:network-interface/*", f"arn:aws:ec2:{where}:{acct}:volume/*",
                  f"arn:aws:ec2:{where}:{acct}:key-pair/ray-autoscaler", f"arn:aws:ec2:{where}:{acct}:security-group/{group}"]
        return (_allowed(policy, "ec2:RunInstances", new, ctx)
                and all(_allowed(policy, "ec2:RunInstances", r, ctx) for r in others)
                and _allowed(policy, "ec2:CreateTags", new, {**ctx, "ec2:CreateAction": "RunInstances"})
                and _allowed(policy, "iam:PassRole", "arn:aws:iam::123456789012:role/inception-pipeline-node",
                             {"iam:PassedToService": "ec2.amazonaws.com"}))

    def tag(resource_tags: dict, key: str, value: str) -> bool:
        """CreateTags on an existing instance, as AWSNodeProvider._create_tags calls it (one key a call)."""
        return _allowed(policy, "ec2:CreateTags", instance, {"aws:RequestedRegion": region, **resource_tags,
                                                              "aws:TagKeys": [key], f"aws:RequestTag/{key}": value})

    def terminate(resource_tags: dict) -> bool:
        return _allowed(policy, "ec2:TerminateInstances", instance, {"aws:RequestedRegion": region, **resource_tags})

    # what the autoscaler does
    assert all(launch(t) for t in workers), workers
    for key in (tags.TAG_RAY_NODE_STATUS, tags.TAG_RAY_RUNTIME_CONFIG, tags.TAG_RAY_FILE_MOUNTS_CONTENTS):
        assert tag(worker_tags, key, "x") and tag(head_tags, key, "x"), key  # NodeUpdater's status tags
    assert terminate(worker_tags)
    assert _allowed(policy, "ec2:DescribeInstances", "*", {"aws:RequestedRegion": region})
    # what a job must not do
    assert not tag({}, tags.TAG_RAY_CLUSTER_NAME, name)  # claim someone else's instance for the cluster
    assert not tag({}, tags.TAG_RAY_NODE_STATUS, "x")
    assert not tag(head_tags, tags.TAG_RAY_NODE_KIND, tags.NODE_KIND_WORKER)  # relabel the head a worker
    assert not tag(worker_tags, tags.TAG_RAY_CLUSTER_NAME, "other")
    assert not terminate({}) and not terminate({cluster_tag: "other", kind_tag: "worker"})
    assert not terminate(head_tags)
    assert not any(_allowed(policy, a, instance, {"aws:RequestedRegion": region, **worker_tags})
                   for a in ("ec2:StopInstances", "ec2:StartInstances", "ec2:ModifyInstanceAttribute", "ec2:DeleteTags"))
    assert not launch("x2iedn.32xlarge")  # any type but the cluster's workers
    assert not launch(where="eu-west-1")
    assert not launch(group="sg-0fffffffffffffff0")  # a group with SSH open, say
    assert not launch(kind=tags.NODE_KIND_HEAD)
    assert not launch(profile="arn:aws:iam::123456789012:instance-profile/inception-pipeline-head")
    assert not _allowed(policy, "ec2:DescribeInstances", "*", {"aws:RequestedRegion": "eu-west-1"})


def test_env_files_stay_out_of_git_and_of_docker_builds(tmp_path):
    """`.env`, `*.env` and `.env.*` at any depth: git never offers them for a commit (.gitignore), and a
    docker build never sends them to the daemon (.dockerignore, as docker's own client applies it)."""
    import shutil
    import subprocess

    from docker.utils.build import exclude_paths

    (tmp_path / "infra" / "mlflow").mkdir(parents=True)
    (tmp_path / "pipeline").mkdir()
    for name in (".gitignore", ".dockerignore"):
        shutil.copy(REPO / name, tmp_path / name)
    for secret in SECRET_FILES:
        (tmp_path / secret).write_text("POSTGRES_PASSWORD=secret\n")
    (tmp_path / "infra" / "mlflow" / "docker-compose.yml").write_text("services: {}\n")
    (tmp_path / "pipeline" / "environment.py").write_text("")  # a name with "env" in it stays in
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    untracked = subprocess.run(["git", "-C", str(tmp_path), "status", "--porcelain", "--untracked-files=all"],
                               capture_output=True, text=True, check=True).stdout.split("\n")
    offered = {line[3:] for line in untracked if line.startswith("?? ")}
    assert {"infra/mlflow/docker-compose.yml", "pipeline/environment.py"} <= offered, offered
    assert not offered & set(SECRET_FILES), offered
    patterns = [p for p in (REPO / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    sent = set(exclude_paths(str(tmp_path), patterns))
    assert {"infra/mlflow/docker-compose.yml", "pipeline/environment.py"} <= sent, sent
    assert not sent & set(SECRET_FILES), sent


def test_dashboard_and_job_server_listen_on_loopback_only(cluster):
    """`ray dashboard ray_cluster.yaml` reaches them through an SSH tunnel to the head's loopback (the
    containers use the host's network): nothing else on the VPC may reach the job server."""
    (start,) = [c for c in cluster["head_start_ray_commands"] if c.startswith("ray start --head")]
    hosts = re.findall(r"--dashboard-host[= ](\S+)", start)
    assert hosts == ["127.0.0.1"], start
    for c in cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]:
        assert "0.0.0.0" not in c and "::" not in c, c
