"""Object storage without a cloud: a real S3 API server (moto's `moto_server`, the `s3_server` fixture)
on loopback, reached through the standard AWS variables by boto3, pyarrow (Ray Train's storage), DALI's
own S3 client and MLflow's artifact proxy.

- DALI 2.4's webdataset reader streams s3:// tars and index files (endpoint from AWS_ENDPOINT_URL or
  AWS_ENDPOINT_URL_S3);
- the shard job writes `--out s3://...` byte-identical to a local run, resumes, repairs, refuses;
- `open_split(s3://...)` and the DALI loaders read through a sha256-checked node-local copy, filled once
  per node by concurrent readers;
- an MLflow server whose artifacts live in the bucket serves them to clients holding no S3 credentials.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import (
    BIN,
    RAY_STOP_S,
    REPO,
    RayCluster,
    free_port,
    http_ok,
    jpeg_bytes,
    make_fashion_mnist,
    mlflow_server_process,
    ray_head,
    small_tmpfs,
    stop_group,
    wait_until,
    write_test_split,
)

from pipeline.shards.format import MANIFEST, ShardError, dump_json
from pipeline.shards.splits import iter_samples, open_split
from pipeline.shards.storage import objstore
from pipeline.shards.storage.s3 import content_names

AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION",
            "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def upload_split(local: Path, uri: str) -> None:
    """Put a local split in the bucket the way the shard job does: shards first, manifest last."""
    for f in sorted(local.iterdir()):
        if f.is_file() and f.name != MANIFEST:
            objstore.upload(f, objstore.join(uri, f.name))
    objstore.upload(local / MANIFEST, objstore.join(uri, MANIFEST))


def small_split(tmp_path: Path, n: int = 30, per_shard: int = 8) -> Path:
    images = [jpeg_bytes(seed=i, size=(40 + i % 7, 32 + i % 5)) for i in range(n)]
    return write_test_split(tmp_path / "local" / "train", images, [i % 3 for i in range(n)], per_shard=per_shard)


def env_without_aws(**extra) -> dict:
    return {**{k: v for k, v in os.environ.items() if k not in AWS_VARS}, **extra}


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def without_job_token(manifest: dict) -> dict:
    """`manifest` with its object names as any job would give them: the uploading job's token (the last
    part of each s3:// name) left out."""
    for s in manifest["shards"]:
        for k in ("name", "index"):
            s[k] = re.sub(r"-[0-9a-f]{8}(\.(?:tar|idx))$", r"\1", s[k])
    return manifest


def as_on_s3(local_split: Path) -> dict:
    """A local run's manifest with the object names an s3:// run gives its shards (the tar's sha256 in
    the name), without the job's token: what the s3:// run of the same settings writes, byte for byte
    once dumped and its names read through `without_job_token`."""
    m = json.loads((local_split / MANIFEST).read_text())
    for s in m["shards"]:
        tar, idx = content_names(s["name"].removesuffix(".tar"), s["sha256"], "x" * 8)
        s["name"], s["index"] = tar.replace("-xxxxxxxx.", "."), idx.replace("-xxxxxxxx.", ".")
    return m


def assert_same_split_as_local(uri: str, local_split: Path) -> None:
    """The s3:// split is the local run's: manifest (the job's token in names aside) byte-identical, every
    tar and index too."""
    raw = objstore.read_bytes(objstore.join(uri, MANIFEST)).decode()
    got = json.loads(raw)
    assert raw == dump_json(got) and dump_json(without_job_token(json.loads(raw))) == dump_json(as_on_s3(local_split))
    local = json.loads((local_split / MANIFEST).read_text())["shards"]
    for s, ls in zip(got["shards"], local, strict=True):
        assert objstore.read_bytes(objstore.join(uri, s["name"])) == (local_split / ls["name"]).read_bytes()
        assert objstore.read_bytes(objstore.join(uri, s["index"])) == (local_split / ls["index"]).read_bytes()


# ------------------------------------------------------------------------------ DALI reads s3:// itself

@pytest.mark.parametrize("endpoint_var", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"])
def test_dali_streams_tars_and_index_files_from_s3(s3_env, tmp_path, endpoint_var):
    local = small_split(tmp_path)
    uri = s3_env.uri(f"direct-{endpoint_var.lower()}", "train")
    upload_split(local, uri)
    want = [(s["meta"]["source"], s["label"]) for s in iter_samples(local)]
    env = env_without_aws(**{k: v for k, v in s3_env.env.items() if k != "AWS_ENDPOINT_URL"},
                          **{endpoint_var: s3_env.endpoint}, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, str(REPO / "tests" / "s3_dali_read.py"), uri], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["epoch_size"] == len(want)
    assert list(zip(got["keys"], got["labels"], strict=True)) == want  # every sample, in shard order


def test_dali_without_an_endpoint_goes_to_aws_and_names_the_object(s3_env, tmp_path):
    """The variables are what points DALI at the server: without one it asks AWS itself (unreachable
    here) and reports the object it could not read."""
    local = small_split(tmp_path, n=4)
    uri = s3_env.uri("direct-noendpoint", "train")
    upload_split(local, uri)
    env = env_without_aws(**{k: v for k, v in s3_env.env.items() if k != "AWS_ENDPOINT_URL"},
                          PYTHONPATH=str(REPO))
    script = ("from nvidia.dali import fn, pipeline_def\n"
              "@pipeline_def(batch_size=1, num_threads=1, device_id=None)\n"
              f"def p(): return fn.readers.webdataset(paths=[{objstore.join(uri, 'test-split-000000.tar')!r}], ext=['jpg'])\n"
              "x = p(); x.build(); x.run()\n")
    p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "test-split-000000.tar" in p.stderr and "amazonaws.com" in p.stderr, p.stderr[-2000:]


# ------------------------------------------------------------------ node-local copy for the readers

LOCALIZE = ("import sys; from pipeline.shards.cache import localize; "
            "print('dir', localize(sys.argv[1], log=print))")


def test_open_split_on_s3_fetches_a_verified_local_copy_once_per_node(s3_env, tmp_path):
    local = small_split(tmp_path)
    uri = s3_env.uri("cache", "train")
    upload_split(local, uri)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # two readers on one node at once (e.g. two replicas): one fills the cache, the other waits and reuses it
    procs = [subprocess.Popen([sys.executable, "-c", LOCALIZE, uri], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    fetched = sorted(int(re.search(r"\((\d+) of (\d+) shards fetched\)", o[0]).group(1))
                     if "fetched" in o[0] else 0 for o in outs)
    n_shards = len(json.loads((local / MANIFEST).read_text())["shards"])
    assert fetched == [0, n_shards]  # one process fetched every shard, the other none (or found it complete)

    info = open_split(uri, verify="sha256")
    assert info.dir.parent == Path(os.environ["INCEPTION_SHARD_CACHE"], "s3", s3_env.bucket, "cache", "train")
    assert [s["sha256"] for s in info.manifest["shards"]] == [sha(p.read_bytes()) for p in info.tars]
    assert list(iter_samples(uri)) == list(iter_samples(local))

    # a new version of the split, filled by another process while this one still reads the old version:
    # only the shard that changed is downloaded, and the old version's files stay exactly as they were
    # (replacing them in place would hand this reader a tar whose offsets are not its index's)
    images = [jpeg_bytes(seed=i, size=(40 + i % 7, 32 + i % 5)) for i in range(30)]
    images[-1] = jpeg_bytes(seed=1234)
    local2 = write_test_split(tmp_path / "local2" / "train", images, [i % 3 for i in range(30)], per_shard=8)
    upload_split(local2, uri)
    p = subprocess.run([sys.executable, "-c", LOCALIZE, uri + "/"], env=env, capture_output=True, text=True,
                       timeout=300)  # a trailing slash names the same split
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"(1 of {n_shards} shards fetched, {n_shards - 1} unchanged ones linked" in p.stdout, p.stdout
    new_dir = Path(p.stdout.split("dir ")[-1].strip())
    assert new_dir != info.dir and new_dir.parent == info.dir.parent
    assert list(iter_samples(info.dir)) == list(iter_samples(local))  # what this process opened, unchanged
    assert list(iter_samples(new_dir)) == list(iter_samples(local2))
    assert [sha(p.read_bytes()) for p in info.tars] == [s["sha256"] for s in info.manifest["shards"]]

    # once no process reads the old version, the next fill removes it
    from pipeline.shards import cache

    os.close(cache._in_use.pop(info.dir))
    lines = []
    assert cache.localize(uri, log=lines.append) == new_dir
    assert not info.dir.exists() and any("an older version" in ln for ln in lines), lines
    # the linked shards lost their other link (a new ctime, nothing else): still trusted, not fetched again
    lines = []
    assert cache.localize(uri, log=lines.append) == new_dir
    assert not [ln for ln in lines if "fetched" in ln], lines
    assert list(iter_samples(uri)) == list(iter_samples(local2))


def test_a_damaged_object_or_missing_manifest_is_refused(s3_env, tmp_path, monkeypatch):
    local = small_split(tmp_path, n=10)
    uri = s3_env.uri("damaged", "train")
    with pytest.raises(ShardError, match="no manifest.json"):
        open_split(uri)  # nothing there yet
    upload_split(local, uri)
    tar = local / "test-split-000001.tar"
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF  # same size, other bytes
    objstore.write_bytes(objstore.join(uri, tar.name), bytes(data))
    with pytest.raises(ShardError, match="test-split-000001.tar: sha256 or size differs"):
        open_split(uri)
    assert not any(p.name == tar.name or ".tmp-" in p.name
                   for p in Path(os.environ["INCEPTION_SHARD_CACHE"]).rglob("*"))  # nothing unverified kept


def test_dali_train_and_eval_loaders_read_an_s3_split(s3_env, tmp_path):
    from pipeline.data.dali_eval import DALIEvalLoader
    from pipeline.data.dali_train import DALITrainLoader, TrainPipelineConfig
    from pipeline.data.sampling import get_strategy

    local = small_split(tmp_path, n=24)
    uri = s3_env.uri("loaders", "train")
    upload_split(local, uri)
    train = DALITrainLoader(uri, TrainPipelineConfig(get_strategy("inception", 32), batch_size=4, device="cpu"))
    labels = [int(y) for _, ys in train for y in ys]
    assert len(labels) == 24 and sorted(labels) == sorted(i % 3 for i in range(24))
    ev = DALIEvalLoader(uri, n_crops=10, input_size=32, batch_size=5, device="cpu")
    batches = list(ev)
    assert sum(x.shape[0] for x, _ in batches) == 24 and batches[0][0].shape[1:] == (10, 3, 32, 32)
    assert ev.keys == [f"s{i:06d}" for i in range(24)]


# ------------------------------------------------------------------------ the shard job writing to s3://

@pytest.fixture(scope="module")
def s3_ray(s3_server):
    """A Ray head whose processes see the S3 server through the AWS variables, as a cloud node with an
    instance profile (or the variables in its environment) does. Jobs join it with RAY_ADDRESS."""
    # (the node's local copies of s3:// splits in INCEPTION_SHARD_CACHE)
    with ray_head("ipray3-", env_without_aws(), lambda tmp: {**s3_server.env, "PYTHONPATH": str(REPO),
                                                              "INCEPTION_SHARD_CACHE": str(tmp / "shard-cache")}) as cluster:
        yield cluster


def shard_job(env: dict, root: Path, out: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "jobs" / "shard_dataset.py"), "--source", "fashion-mnist", "--root", str(root),
           "--out", out, "--samples-per-shard", "16", "--workers", "2", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_shard_job_writes_to_s3_byte_identical_resumes_and_refuses(s3_ray, s3_server, tmp_path, monkeypatch):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("INCEPTION_SHARD_CACHE", str(tmp_path / "cache"))
    root = make_fashion_mnist(tmp_path / "fmnist", n_train=70, n_val=20)
    out = s3_server.uri("jobs", "run1")
    ref = shard_job(s3_ray.env, root, str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    p = shard_job(s3_ray.env, root, out)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"shards written under {out}/fashion-mnist" in p.stdout

    for split in ("train", "val"):
        assert_same_split_as_local(objstore.join(out, "fashion-mnist", split), tmp_path / "ref" / "fashion-mnist" / split)
    train_uri = objstore.join(out, "fashion-mnist", "train")
    names = json.loads(objstore.read_bytes(objstore.join(train_uri, MANIFEST)))["shards"]
    assert len(names) == 5  # 70 images, 16 per shard

    # resume: nothing to write; then a damaged tar, a lost one and a bogus index file (another shard's,
    # over the good one) are rewritten, and only those
    p = shard_job(s3_ray.env, root, out)
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(re.findall(r"shard +\d+ verified", p.stdout)) == 5 + 2 and not re.search(r"shard +\d+ written", p.stdout)
    damaged, lost = names[1]["name"], names[3]["name"]
    data = bytearray(objstore.read_bytes(objstore.join(train_uri, damaged)))
    data[1000] ^= 0xFF
    objstore.write_bytes(objstore.join(train_uri, damaged), bytes(data))
    objstore.delete(objstore.join(train_uri, lost))
    objstore.write_bytes(objstore.join(train_uri, names[4]["index"]),
                         objstore.read_bytes(objstore.join(train_uri, names[0]["index"])))
    p = shard_job(s3_ray.env, root, out)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(re.findall(r"\[train\] shard +(\d+) written", p.stdout)) == ["1", "3", "4"], p.stdout
    ref_train = tmp_path / "ref" / "fashion-mnist" / "train"
    assert_same_split_as_local(train_uri, ref_train)

    # other settings on the same output: refused before writing, exit 2, one line
    p = shard_job(s3_ray.env, root, out, "--seed", "5")
    assert p.returncode == 2 and "made with other settings: seed=0 (now 5)" in p.stderr, p.stderr[-2000:]
    # a URI scheme with no tested store behind it
    p = shard_job(s3_ray.env, root, "gs://bucket/x")
    assert p.returncode == 2 and "'gs://' is not supported" in p.stderr

    # readers: the split opened by its URI is the local reference, sample for sample (its shards' names aside)
    def samples(split):
        return [{k: v for k, v in s.items() if k != "shard"} for s in iter_samples(split)]

    assert samples(train_uri) == samples(ref_train)


# ----------------------------------------------------------------------- MLflow artifacts in the bucket

@pytest.fixture(scope="module")
def mlflow_s3(s3_server):
    """An MLflow server whose artifact store is the bucket (`--artifacts-destination s3://...`): it alone
    holds the S3 settings, as the compose file's server holds MinIO's; clients reach artifacts through it."""
    tmp = Path(tempfile.mkdtemp(prefix="ipmlflow3-"))
    server_env = {**env_without_aws(), **s3_server.env, "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint}
    try:
        with mlflow_server_process(tmp, f"s3://{s3_server.bucket}/mlflow", server_env) as url:
            yield url
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bucket_objects(s3_server, prefix: str) -> dict[str, int]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name=s3_server.env["AWS_REGION"],
                      aws_access_key_id=s3_server.env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=s3_server.env["AWS_SECRET_ACCESS_KEY"])
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_server.bucket, Prefix=prefix):
        out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    return out


def no_s3_access(monkeypatch, tmp_path) -> None:
    """This process has no S3 settings or credentials of its own."""
    for k in (*AWS_VARS, "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


@pytest.mark.slow
def test_mlflow_serves_artifacts_stored_in_s3_to_clients_without_credentials(s3_server, mlflow_s3, tmp_path,
                                                                              monkeypatch):
    import mlflow

    no_s3_access(monkeypatch, tmp_path)
    client = mlflow.MlflowClient(mlflow_s3)
    run = client.create_run(client.create_experiment("s3-artifacts"))
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied through the server
    weights = os.urandom(300_000)
    (tmp_path / "weights.pt").write_bytes(weights)
    table = "| models | crops | top-1 err |\n|---|---|---|\n| 7 | 144 | 0.333 |\n"
    (tmp_path / "table3.md").write_text(table)
    client.log_artifact(run.info.run_id, str(tmp_path / "weights.pt"), "model")
    client.log_artifact(run.info.run_id, str(tmp_path / "table3.md"), "eval")

    keys = bucket_objects(s3_server, "mlflow/")
    wkey = next(k for k in keys if k.endswith(f"{run.info.run_id}/artifacts/model/weights.pt"))
    assert keys[wkey] == len(weights)
    assert objstore_bytes(s3_server, wkey) == weights  # the object in the bucket is the file

    back = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="model/weights.pt",
                                                    dst_path=str(tmp_path / "back"), tracking_uri=mlflow_s3))
    assert back.read_bytes() == weights
    assert [f.path for f in client.list_artifacts(run.info.run_id, "eval")] == ["eval/table3.md"]
    got = Path(client.download_artifacts(run.info.run_id, "eval/table3.md", str(tmp_path / "back2")))
    assert got.read_text() == table


def objstore_bytes(s3_server, key: str) -> bytes:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name=s3_server.env["AWS_REGION"],
                      aws_access_key_id=s3_server.env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=s3_server.env["AWS_SECRET_ACCESS_KEY"])
    return s3.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()


# ------------------------------- a node lost mid-training, everything in the bucket: shards, checkpoints, artifacts

class NodeCluster:
    """tests/node_cluster.py in its own process: a multi-node Ray cluster on loopback, driven a command a line."""

    def __init__(self, folder: Path, names: list[str], env: dict):
        self.err = folder / "node_cluster.err"
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "node_cluster.py"), str(folder), *names],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                         env=env, start_new_session=True)
        self.info = self._answer("READY")

    def _answer(self, word: str) -> dict:
        while line := self.proc.stdout.readline():
            if line.startswith(word + " "):
                return json.loads(line[len(word) + 1:])
        raise AssertionError(f"the cluster process ended before {word}: {self.err.read_text()[-3000:]}")

    def ask(self, command: str, word: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._answer(word)

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(60)
        except (OSError, subprocess.TimeoutExpired):
            pass
        stop_group(self.proc, timeout=RAY_STOP_S)


def worker_replica(cluster: RayCluster, pid: int, pattern: str) -> int:
    """The replica whose line `pattern` (with the replica as its group) the worker process `pid` printed."""
    [log] = [f for f in cluster.worker_logs() if f.stem.endswith(f"-{pid}")]
    return int(re.search(pattern, log.read_text(errors="replace")).group(1))


@pytest.mark.slow
def test_a_node_lost_mid_training_with_everything_on_s3(s3_server, mlflow_s3, tmp_path, monkeypatch):
    """A head and two worker nodes of 1 CPU on loopback, each node with its own node-local shard cache;
    shards, Ray Train checkpoints and MLflow artifacts all in the bucket, no shared filesystem. Two
    replicas train at once, one on each worker node; a third node joins during epoch 2 (spare capacity,
    as an autoscaler's replacement would be: the one place the lost replica can go while the other
    replica holds its node). Mid-epoch 3, every process of one replica's node is SIGKILLed at once (its
    raylet and object store, its agents, its workers), as when a spot node is reclaimed or a kernel
    panics. Ray Train restarts that replica's worker group on a live node (the new one, or the other
    replica's once that one has finished: Ray notices the lost node seconds after the kill, and the
    other replica was in its last epoch too), which reads the shards through its own cache (the new
    node fills it from the bucket) and resumes from epoch 2's checkpoint, read back from S3; the other
    replica trains on untouched. Every epoch is logged once, one run and one registered version per
    replica, the final weights are the final epoch's, and the evaluation reads the s3:// shards and
    logs Table 3 to the bucket."""
    import mlflow
    from test_kill import EPOCHS, check_exactly_once, finish, log_sizes, start, wait_for_worker_line

    folder = Path(tempfile.mkdtemp(prefix="ipnodes-", dir="/tmp"))  # short: Ray's socket paths are limited
    env = {**env_without_aws(), **s3_server.env, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    nodes, proc = NodeCluster(folder, ["a", "b"], env), None
    try:
        info = nodes.info
        # TMPDIR: the driver caches its corrupt-image scan there when checkpoints are in object storage
        env = {**env, "RAY_ADDRESS": info["address"], "MLFLOW_TRACKING_URI": mlflow_s3, "TMPDIR": str(tmp_path)}
        cluster = RayCluster(info["address"], "", env, Path(info["temp_dir"]))
        root = make_fashion_mnist(tmp_path / "fmnist", n_train=1200, n_val=200)
        shards_out = s3_server.uri("e2e", "shards")
        p = shard_job(env, root, shards_out, "--samples-per-shard", "400")
        assert p.returncode == 0, p.stderr[-3000:]
        storage = s3_server.uri("e2e", "ray_results")
        sets = {"data.shards": f"{shards_out}/fashion-mnist", "data.limit_train": 640, "data.limit_val": 128,
                "data.batch_size": 64, "schedule.epochs": EPOCHS, "ensemble.replicas": 2, "ensemble.max_concurrent": 2,
                "ensemble.storage_path": storage, "ensemble.name": "s3-e2e", "ensemble.max_failures": 3,
                "tracking.uri": mlflow_s3, "tracking.log_every": 2}
        cmd = [sys.executable, str(REPO / "jobs" / "train_ensemble.py"), "--recipe", "demo"] + \
            [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
        log, since = tmp_path / "train.log", log_sizes(cluster)
        proc = start(cmd, env, log)
        for replica in (0, 1):  # both replicas hold their nodes (a and b) ...
            wait_for_worker_line(cluster, rf"replica {replica} \(\S+\) epoch 2/{EPOCHS} step 2/10", proc, since)
        added = nodes.ask("add c", "ADDED")  # ... before the spare node joins
        at = rf"replica (\d) \(\S+\) epoch 3/{EPOCHS} step 4/10"
        pid = wait_for_worker_line(cluster, at, proc, since)
        since = log_sizes(cluster)
        killed = nodes.ask(f"kill {pid}", "KILLED")
        t_kill = time.monotonic()
        lost = worker_replica(cluster, pid, at)
        assert pid in killed["pids"] and len(killed["pids"]) >= 3  # the worker, the raylet, the node's agents
        assert killed["alive_after"] == []  # every one of them gone
        wait_for_worker_line(cluster, rf"replica {lost} \(\S+\): resuming after epoch 2 from its checkpoint", proc,
                             since, timeout=600)
        recovered_s = time.monotonic() - t_kill
        out = finish(proc, log, timeout=900)
        print(f"node {killed['name']} lost mid-epoch 3 of replica {lost}: it resumed on another node "
              f"{recovered_s:.0f} s after the kill, after epoch 2 (epoch 3's first 4 of 10 steps trained again)")
        alive = nodes.ask("nodes", "NODES")
        assert alive[killed["node_id"]] is False and alive[added["node_id"]] is True

        no_s3_access(monkeypatch, tmp_path)  # from here on the test sees the bucket only through MLflow
        children = {int(c.data.tags["replica"]): c for c in check_exactly_once(mlflow_s3, "s3-e2e", 2, tmp_path)}
        # The lost replica resumed from epoch 2's checkpoint, read back from the bucket (there is no other
        # storage): also when the kill came before Ray's controller registered it, the worker finds it under
        # its run's prefix itself (_Context.load lists checkpoint_* there, as it globs a run folder).
        assert children[lost].data.tags["resumed_from_epoch"] == "2", out[-3000:]
        other = children[1 - lost].data.tags
        assert "resumed_from_epoch" not in other  # the other replica was not interrupted
        other_node = "b" if killed["name"] == "a" else "a"
        assert other["ray_node_id"] == info["nodes"][other_node]
        # it finished on a live node: the new one, or the other replica's once that one had finished
        ids = {**info["nodes"], "c": added["node_id"]}
        [finished_on] = [n for n, i in ids.items() if i == children[lost].data.tags["ray_node_id"]]
        assert finished_on in ("c", other_node), (finished_on, killed["name"])
        ckpts = {k for k in bucket_objects(s3_server, "e2e/ray_results/") if "checkpoint_" in k}
        assert ckpts, "no Ray Train checkpoint in the bucket"
        assert not (REPO / "s3:").exists()  # no URI taken for a relative path anywhere
        split = Path("s3", s3_server.bucket, "e2e", "shards", "fashion-mnist", "train")
        for name in {"a", "b", finished_on}:  # each node that trained read its own verified copy
            assert list((folder / f"cache-{name}" / split).glob(f"v-*/{MANIFEST}")), name
        arts = bucket_objects(s3_server, "mlflow/")
        for c in children.values():
            assert any(k.endswith(f"{c.info.run_id}/artifacts/weights/polyak_state_dict.pt") for k in arts)

        ev = subprocess.run([sys.executable, str(REPO / "jobs" / "evaluate_ensemble.py"), "--ensemble-run", "s3-e2e",
                             "--crops", "1,10", "--limit", "40", "--workers", "1", "--mlflow-uri", mlflow_s3],
                            env=env, capture_output=True, text=True, timeout=600)
        assert ev.returncode == 0, (ev.stdout[-2000:], ev.stderr[-3000:])
        client = mlflow.MlflowClient(mlflow_s3)
        exp = client.get_experiment_by_name("inception-pipeline")
        [erun] = client.search_runs([exp.experiment_id], "tags.kind = 'evaluation'")
        names = {k.rsplit("/", 1)[-1] for k in bucket_objects(s3_server, "mlflow/")
                 if f"/{erun.info.run_id}/artifacts/" in k}
        assert "table3.json" in names, names  # Table 3, stored in the bucket
    finally:
        if proc and proc.poll() is None:  # (a failed check: the driver started here is stopped here)
            proc.kill()
            proc.wait()
        nodes.close()
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------- the node-local cache: verified, private, bounded

def flip_byte_keep_stamp_visible(path: Path, at: int = 700) -> os.stat_result:
    """Flip one byte in place (same size) and put the mtime back: only the bytes (and ctime) differ."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    return st


def test_a_flipped_byte_in_a_cached_tar_is_detected_and_fetched_again(s3_env, tmp_path):
    from pipeline.shards.cache import localize

    local = small_split(tmp_path)
    uri = s3_env.uri("flipped", "train")
    upload_split(local, uri)
    dest = localize(uri)
    tar = dest / "test-split-000001.tar"
    flip_byte_keep_stamp_visible(tar)
    lines = []
    assert localize(uri, log=lines.append) == dest
    assert lines and "(1 of 4 shards fetched)" in lines[0], lines
    assert tar.read_bytes() == (local / tar.name).read_bytes()

    # damage that leaves no trace in the file's metadata (the recorded stamp is rewritten to match, as bit
    # rot would leave it): trusted by the cheap check, caught by a sha256 open, which fetches it again
    flip_byte_keep_stamp_visible(tar)
    from pipeline.shards.cache import VERIFIED
    from pipeline.shards.cachedir import file_stamp

    state = json.loads((dest / VERIFIED).read_text())
    state[tar.name]["stamp"] = file_stamp(tar)
    (dest / VERIFIED).write_text(json.dumps(state))
    info = open_split(uri, verify="sha256")
    assert [sha(p.read_bytes()) for p in info.tars] == [s["sha256"] for s in info.manifest["shards"]]
    assert list(iter_samples(uri)) == list(iter_samples(local))


def test_the_shard_cache_is_a_private_per_user_folder(s3_env, tmp_path, monkeypatch):
    import stat

    from pipeline.shards.cache import localize

    upload_split(small_split(tmp_path, n=4), uri := s3_env.uri("private", "train"))
    monkeypatch.delenv("INCEPTION_SHARD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = tmp_path / "xdg" / "inception-pipeline" / "shards"
    assert localize(uri).is_relative_to(root) and stat.S_IMODE(root.stat().st_mode) == 0o700
    root.chmod(0o777)  # e.g. pre-created by someone else in a shared folder
    with pytest.raises(ShardError, match="writable by group or others"):
        localize(uri)
    root.chmod(0o700)
    if os.getuid() == 0:
        os.chown(root, 65534, 65534)
        with pytest.raises(ShardError, match="owned by uid 65534"):
            localize(uri)
        os.chown(root, 0, 0)
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert localize(uri).is_relative_to(tmp_path / "home" / ".cache" / "inception-pipeline" / "shards")
    monkeypatch.setenv("INCEPTION_SHARD_CACHE", str(tmp_path / "mine"))  # still overridable
    assert localize(uri).is_relative_to(tmp_path / "mine")


def test_the_cache_holds_the_current_manifest_only_and_evicts_the_least_recently_used(s3_env, tmp_path):
    from pipeline.shards.cache import localize

    local = small_split(tmp_path, n=30)
    a, b = s3_env.uri("lru", "a"), s3_env.uri("lru", "b")
    upload_split(local, a)
    upload_split(local, b)
    dest_a = localize(a)
    (dest_a / "test-split-000099.tar").write_bytes(b"left from an older version")
    (dest_a / "test-split-000000.tar.tmp-4242").write_bytes(b"left by a killed fill")
    (dest_a.parent / "test-split-000000.tar").write_bytes(b"a copy in an older layout")
    localize(a)
    assert not (dest_a / "test-split-000099.tar").exists() and not list(dest_a.glob("*.tmp-*"))
    assert sorted(p.name for p in dest_a.parent.iterdir()) == [".cache.lock", dest_a.name]
    # a new version with fewer shards: once no process reads the old version, its shards leave the cache
    local2 = write_test_split(tmp_path / "v2" / "train", [jpeg_bytes(seed=i) for i in range(10)],
                              [i % 3 for i in range(10)], per_shard=8)
    upload_split(local2, a)
    from pipeline.shards import cache

    os.close(cache._in_use.pop(dest_a))  # this process stops reading the first version
    dest_a2 = localize(a)
    assert not dest_a.exists()
    dest_a = dest_a2
    assert sorted(p.name for p in dest_a.glob("*.tar")) == ["test-split-000000.tar", "test-split-000001.tar"]

    size_a = sum(p.stat().st_size for p in dest_a.iterdir())
    size_b = sum((local / s["name"]).stat().st_size + (local / s["index"]).stat().st_size
                 for s in json.loads((local / MANIFEST).read_text())["shards"])
    env = {**os.environ, "PYTHONPATH": str(REPO), "INCEPTION_SHARD_CACHE_GB": str((size_b + size_a / 2) / 1e9)}

    def localize_in_new_process(uri):
        p = subprocess.run([sys.executable, "-c", LOCALIZE, uri], env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        return p.stdout

    # a is being read by this process: over the cap, but not removed
    out = localize_in_new_process(b)
    assert dest_a.is_dir() and "over the" in out, out
    # read by no process, and least recently used: removed to make room
    os.close(cache._in_use.pop(dest_a))  # this process stops reading a
    out = localize_in_new_process(b)
    assert not dest_a.exists() and f"removed {dest_a}" in out, out
    assert list(iter_samples(b)) == list(iter_samples(local))
    assert list(iter_samples(a)) == list(iter_samples(local2))  # fetched again when needed


FILL_FILE_LIMIT = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                   "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); "
                   "from pipeline.shards.cache import localize; localize(sys.argv[1])")


def test_a_fill_that_runs_out_of_space_leaves_no_temporary(s3_env, tmp_path):
    """A file-size limit makes the disk 'full' at 4 KB: the fill fails and removes its temporary."""
    upload_split(small_split(tmp_path, n=10), uri := s3_env.uri("full", "train"))
    p = subprocess.run([sys.executable, "-c", FILL_FILE_LIMIT, uri], env={**os.environ, "PYTHONPATH": str(REPO)},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "File too large" in p.stderr, p.stderr[-2000:]
    cache = Path(os.environ["INCEPTION_SHARD_CACHE"])
    assert not [p for p in cache.rglob("*") if ".tmp-" in p.name]
    assert not list(cache.rglob("*.tar")) and not list(cache.rglob(MANIFEST))


def test_a_lease_write_whose_answer_was_lost_is_still_the_jobs(s3_env, monkeypatch):
    """A proxy loses the answers to the lease's first PUT (the create) and its third (the first renewal):
    the server stored each, the client retries it, and the retry is refused because the first attempt
    landed. The job must see its own write and keep its lease, not refuse itself as 'another job' or
    give the lease up."""
    from pipeline.shards.storage.lease import LEASE_NAME, Lease, holder

    port = free_port()
    proxy = subprocess.Popen([sys.executable, str(REPO / "tests" / "lossy_proxy.py"), s3_env.endpoint, str(port),
                              "PUT", LEASE_NAME, "1,3"], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proxy.stdout.readline().strip() == "ready"
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        split = s3_env.uri("lossy", "train")
        lease = Lease(split, "test job", seconds=3).acquire()  # renewed every second
        try:
            lease.check()
            wait_until(lambda: holder(objstore.join(split, LEASE_NAME))[0]["renewal"] >= 4, 30, "three renewals")
            assert lease.lost is None
            lease.check()
        finally:
            lease.release()
        assert holder(objstore.join(split, LEASE_NAME)) is None  # released: the job knew its latest version
    finally:
        stop_group(proxy)
    lost = [ln for ln in proxy.stdout.read().splitlines() if ln.startswith("drop ")]
    assert [ln.split()[1] for ln in lost] == ["1", "3"], lost


def test_object_storage_errors_end_the_shard_job_with_one_line(s3_env, tmp_path):
    """No such bucket, credentials the server refuses, an endpoint nobody answers on: exit 2 and one line
    naming the split and the cause, not a traceback."""
    root = make_fashion_mnist(tmp_path / "fmnist", n_train=20, n_val=4)
    auth_port = free_port()
    auth_log = tmp_path / "moto-auth.log"
    with open(auth_log, "wb") as f:  # a second server that checks credentials (ours are unknown to it)
        auth = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(auth_port)],
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{auth_port}/moto-api/"), 60, "moto server", auth, auth_log)
        cases = [("s3://no-such-bucket-here/x", {}, "NoSuchBucket"),
                 (s3_env.uri("denied", "x"), {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{auth_port}"}, "refused"),
                 (s3_env.uri("unreachable", "x"), {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"},
                  "Could not connect")]
        for out, env, want in cases:
            cmd = [sys.executable, str(REPO / "jobs" / "shard_dataset.py"), "--source", "fashion-mnist", "--root",
                   str(root), "--out", out, "--splits", "train"]
            p = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
            assert p.returncode == 2, (out, p.stderr[-3000:])
            line = p.stderr.strip()
            assert line.count("\n") == 0 and line.startswith("shard_dataset: error: ") and want in line, line
            assert f"{out}/fashion-mnist/train" in line, line
    finally:
        stop_group(auth)


def test_a_bogus_index_object_is_refused_by_the_cache_fill(s3_env, tmp_path):
    local = small_split(tmp_path, n=30)
    upload_split(local, uri := s3_env.uri("bogus-index", "train"))
    objstore.write_bytes(objstore.join(uri, "test-split-000001.idx"), (local / "test-split-000000.idx").read_bytes())
    with pytest.raises(ShardError, match="test-split-000001.idx: sha256 or size differs"):
        open_split(uri)
    upload_split(local, uri)  # repaired: the fill goes on from what it had verified
    assert open_split(uri, verify="sha256").num_samples == 30


def test_a_re_sharded_split_fits_a_cache_disk_that_holds_one_version(s3_env, tmp_path, monkeypatch):
    """The cache's disk holds one version of the split, not two: the version no process reads any more
    is removed before the new one is fetched (it was removed after, so the fill ran out of space). A
    split the disk cannot hold at all is one clear error, no temporary left."""
    from pipeline.shards import cache
    from pipeline.shards.cache import localize

    def split(name, n, seed):
        return write_test_split(tmp_path / name / "train", [jpeg_bytes(seed=seed + i, size=(160, 120)) for i in range(n)],
                                [i % 3 for i in range(n)], per_shard=10)

    v1, v2, big = split("v1", 40, 0), split("v2", 40, 1000), split("big", 120, 5000)
    one = sum(-(-f.stat().st_size // 4096) * 4096 for f in v1.iterdir())  # in whole pages
    with small_tmpfs(tmp_path / "disk", str(int(one * 1.6))) as disk:
        monkeypatch.setenv("INCEPTION_SHARD_CACHE", str(disk / "cache"))
        upload_split(v1, uri := s3_env.uri("resharded", "train"))
        first = localize(uri)
        os.close(cache._in_use.pop(first))  # no process reads it any more
        upload_split(v2, uri)  # sharded again: other bytes in every shard
        assert localize(uri) != first and not first.exists()
        assert list(iter_samples(uri)) == list(iter_samples(v2))

        upload_split(big, uri2 := s3_env.uri("too-big", "train"))
        with pytest.raises(ShardError, match=r"no room for its node-local copy.*set INCEPTION_SHARD_CACHE") as e:
            localize(uri2)
        assert "\n" not in str(e.value)
        assert not [p for p in (disk / "cache").rglob("*") if ".tmp-" in p.name]
