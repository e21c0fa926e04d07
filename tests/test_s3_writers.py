"""Shard jobs on one s3:// split: a writer lease keeps them apart, and a part record written with other
settings is never taken as verified. Real jobs on a real Ray head, against the real S3 API server; jobs
are stopped with real signals."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, make_fashion_mnist, stop_group, wait_until
from test_s3 import assert_same_split_as_local, s3_ray  # noqa: F401  (s3_ray: the Ray head that sees the S3 server)

from pipeline.shards.format import MANIFEST, PARTS_DIR, PENDING_FORMAT
from pipeline.shards.splits import iter_samples, open_split
from pipeline.shards.storage import objstore
from pipeline.shards.storage.lease import LEASE_NAME, holder

pytestmark = pytest.mark.slow


def job_cmd(root: Path, out: str, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "jobs" / "shard_dataset.py"), "--source", "fashion-mnist", "--root", str(root),
            "--out", out, "--samples-per-shard", "16", "--splits", "train", *extra]


def run_job(env, root, out, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(job_cmd(root, out, *extra), env=env, capture_output=True, text=True, timeout=300)


def start_job(env, root, out, *extra) -> subprocess.Popen:
    return subprocess.Popen(job_cmd(root, out, *extra), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def parts(split_uri: str) -> list[str]:
    return [n for n in objstore.list_names(objstore.join(split_uri, PARTS_DIR))
            if n.endswith(".json") and n != "job.json"]


def recorded_seed(split_uri: str) -> int | None:
    text = objstore.read_text(objstore.join(split_uri, PARTS_DIR, "job.json"))
    return json.loads(text)["seed"] if text else None


def assert_refused_live_lease(p: subprocess.CompletedProcess) -> None:
    assert p.returncode == 2, (p.stdout[-2000:], p.stderr[-3000:])
    assert p.stderr.strip().count("\n") == 0 and "being written by another shard job" in p.stderr, p.stderr


def assert_whole(split_uri: str, n_inputs: int) -> None:
    """If the split has a complete manifest (not a job's placeholder), every input is in it exactly once
    and every tar matches it."""
    text = objstore.read_text(objstore.join(split_uri, MANIFEST))
    if text is None or json.loads(text)["format"] == PENDING_FORMAT:
        return
    info = open_split(split_uri, verify="sha256")
    sources = [s["meta"]["source"] for s in iter_samples(info)]
    assert len(sources) == len(set(sources)) == info.num_samples == n_inputs


def same_as_reference(split_uri: str, ref: Path) -> None:
    assert_same_split_as_local(split_uri, ref)


def wait_lease_expired(split_uri: str) -> None:
    def expired():
        held = holder(objstore.join(split_uri, LEASE_NAME))
        return held is None or held[2] > held[0]["seconds"]

    wait_until(expired, 120, f"expiry of the lease on {split_uri}")


@pytest.fixture(scope="module")
def small_ref(s3_ray, tmp_path_factory):  # noqa: F811
    """60 Fashion-MNIST images and their split sharded by a local run: what two writers' end state is
    compared with (one run for the module: the same inputs and settings give the same bytes)."""
    tmp = tmp_path_factory.mktemp("small-ref")
    root = make_fashion_mnist(tmp / "fmnist", n_train=60, n_val=4)
    ref = run_job(s3_ray.env, root, str(tmp / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    return root, tmp / "ref" / "fashion-mnist" / "train"


@pytest.fixture
def job_env(s3_ray, s3_server, tmp_path, monkeypatch):  # noqa: F811
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("INCEPTION_SHARD_CACHE", str(tmp_path / "cache"))
    return {**s3_ray.env, "INCEPTION_SHARD_LEASE_SECONDS": "15"}  # renewed every 5 s by its own thread


def test_a_part_written_with_other_settings_is_never_verified(job_env, s3_server, small_ref):
    """The end state of two interleaved writers: shards 0-1 of split A (tar, index and part) are those of a
    seed-1 run of the same data, the manifest not yet written. The seed-0 rerun must rewrite them: taken
    as verified, the manifest would list 60 samples of which only 50 are distinct."""
    root, ref = small_ref
    a_out, b_out = s3_server.uri("mixed", "a"), s3_server.uri("mixed", "b")
    a, b = objstore.join(a_out, "fashion-mnist", "train"), objstore.join(b_out, "fashion-mnist", "train")
    for out, seed in ((a_out, "0"), (b_out, "1")):
        p = run_job(job_env, root, out, "--seed", seed)
        assert p.returncode == 0, p.stderr[-3000:]
    objstore.delete(objstore.join(a, MANIFEST))
    for i in (0, 1):
        part = f"{PARTS_DIR}/fashion-mnist-train-{i:06d}.json"
        record = json.loads(objstore.read_bytes(objstore.join(b, part)))
        for rel in (record["name"], record["index"], part):  # B's part, and the objects it names
            objstore.write_bytes(objstore.join(a, rel), objstore.read_bytes(objstore.join(b, rel)))

    p = run_job(job_env, root, a_out, "--seed", "0")
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(re.findall(r"\[train\] shard +(\d+) written", p.stdout)) == ["0", "1"], p.stdout
    assert_whole(a, 60)
    same_as_reference(a, ref)


def test_a_second_job_on_a_split_is_refused_while_the_first_holds_its_lease(job_env, s3_ray, s3_server,  # noqa: F811
                                                                             small_ref):
    """Job A holds the lease and waits for CPUs (a process holds the cluster's two); job B on the same split
    with other settings and --overwrite is refused and deletes nothing; A then finishes, byte-identical to
    a local run, and releases the lease."""
    root, ref = small_ref
    out = s3_server.uri("concurrent", "x")
    split = objstore.join(out, "fashion-mnist", "train")
    hold = ("import ray, time\nray.init()\n@ray.remote(num_cpus=2)\nclass Hold:\n    def ok(self): return 1\n"
            "h = Hold.remote(); ray.get(h.ok.remote()); print('holding', flush=True); time.sleep(600)\n")
    holder_proc = subprocess.Popen([sys.executable, "-c", hold], env=job_env, stdout=subprocess.PIPE, text=True,
                                   start_new_session=True)
    a = None
    try:
        assert holder_proc.stdout.readline().strip() == "holding"
        a = start_job(job_env, root, out)
        wait_until(lambda: recorded_seed(split) == 0, 120, "job A's record", a)
        assert objstore.size(objstore.join(split, LEASE_NAME)) is not None

        b = run_job(job_env, root, out, "--seed", "1", "--overwrite")
        assert_refused_live_lease(b)
        assert recorded_seed(split) == 0 and a.poll() is None  # B deleted nothing, A still runs

        os.killpg(holder_proc.pid, signal.SIGKILL)  # the CPUs are free: A proceeds
        stdout, stderr = a.communicate(timeout=300)
        assert a.returncode == 0, stderr[-3000:]
    finally:
        stop_group(holder_proc)
        if a is not None:
            stop_group(a)
    same_as_reference(split, ref)
    assert objstore.size(objstore.join(split, LEASE_NAME)) is None  # released


def test_killed_writers_then_a_rerun_end_with_a_whole_split_or_a_refusal(job_env, s3_server, tmp_path):
    """A (seed 0) is SIGKILLed after writing some shards; B (seed 1, --overwrite) is refused while A's lease
    lives, runs once it has expired, and is SIGKILLed in turn; A's rerun is refused (the split now holds
    B's settings) and with --overwrite writes the whole split. At no point is there a manifest that lists
    an input twice or misses one."""
    n = 1200
    root = make_fashion_mnist(tmp_path / "fmnist", n_train=n, n_val=4)
    ref = run_job(job_env, root, str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = s3_server.uri("killed", "x")
    split = objstore.join(out, "fashion-mnist", "train")

    def start_and_kill(*extra, seed):
        p = start_job(job_env, root, out, "--workers", "1", *extra)
        try:
            wait_until(lambda: recorded_seed(split) == seed and len(parts(split)) >= 2, 180, "two shards", p)
        finally:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        assert_whole(split, n)

    start_and_kill("--seed", "0", seed=0)
    assert_refused_live_lease(run_job(job_env, root, out, "--seed", "1", "--overwrite"))
    assert recorded_seed(split) == 0
    wait_lease_expired(split)
    start_and_kill("--seed", "1", "--overwrite", seed=1)

    assert_refused_live_lease(run_job(job_env, root, out, "--seed", "0"))
    wait_lease_expired(split)
    p = run_job(job_env, root, out, "--seed", "0")
    assert p.returncode == 2 and "made with other settings" in p.stderr and "seed=1 (now 0)" in p.stderr, p.stderr
    assert_whole(split, n)
    p = run_job(job_env, root, out, "--seed", "0", "--overwrite")
    assert p.returncode == 0, p.stderr[-3000:]
    assert_whole(split, n)
    same_as_reference(split, tmp_path / "ref" / "fashion-mnist" / "train")
    assert objstore.size(objstore.join(split, LEASE_NAME)) is None


def test_the_mlflow_record_of_an_s3_shard_run_names_the_uri(job_env, s3_server, mlflow_server, tmp_path):
    import mlflow

    root = make_fashion_mnist(tmp_path / "fmnist", n_train=20, n_val=4)
    out = s3_server.uri("tracked", "x")
    p = run_job(job_env, root, out, "--mlflow-uri", mlflow_server, "--experiment", "s3-provenance")
    assert p.returncode == 0, p.stderr[-3000:]
    client = mlflow.MlflowClient(mlflow_server)
    [r] = client.search_runs([client.get_experiment_by_name("s3-provenance").experiment_id])
    assert r.data.params["out"] == out
    assert f"`{out}`" in r.data.tags["mlflow.note.content"]
    [ds] = r.inputs.dataset_inputs
    assert json.loads(ds.dataset.source)["uri"] == f"{out}/fashion-mnist/train", ds.dataset.source
