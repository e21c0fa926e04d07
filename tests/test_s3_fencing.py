"""A shard job that pauses past its writer lease cannot damage the split of the job that took it over.

A relay between the cluster and the S3 API server (`tests/s3_hold_proxy.py`, a real process) holds one
request of the first job in flight, just after the job checked its lease: the first request of shard
0's tar upload, or the manifest's PUT. The process that sent it and the job's driver are stopped with
SIGSTOP (a GC pause, a frozen VM: the lease is no longer renewed and expires). Another job with other
settings and --overwrite then takes the expired lease and finishes. Then the held request reaches the
server and the paused job goes on (SIGCONT). The winner's split must stay byte-identical to a clean
run of its settings, and the paused job must end with an error.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import (
    REPO,
    free_port,
    make_fashion_mnist,
    ray_head,
    stop_group,
    wait_until,
)
from test_s3 import env_without_aws, without_job_token

from pipeline.shards.format import MANIFEST, dump_json
from pipeline.shards.splits import iter_samples, open_split
from pipeline.shards.storage import objstore
from pipeline.shards.storage.lease import LEASE_NAME, holder

pytestmark = pytest.mark.slow

LEASE_SECONDS = 6


@pytest.fixture(scope="module")
def relay(s3_server):
    """The relay on a free loopback port, in front of the session's S3 server; (its endpoint, control dir)."""
    tmp = Path(tempfile.mkdtemp(prefix="iprelay-"))
    port = free_port()
    upstream = int(s3_server.env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "s3_hold_proxy.py"), str(port), str(upstream),
                             str(tmp)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "listening"
        yield f"http://127.0.0.1:{port}", tmp
    finally:
        stop_group(proc)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def relay_ray(s3_server, relay):
    """A Ray head whose processes reach the S3 server through the relay."""
    with ray_head("ipray4-", env_without_aws(),
                  lambda tmp: {**s3_server.env, "AWS_ENDPOINT_URL": relay[0], "PYTHONPATH": str(REPO),
                               "INCEPTION_SHARD_CACHE": str(tmp / "shard-cache")},
                  {"INCEPTION_SHARD_LEASE_SECONDS": str(LEASE_SECONDS)}) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def clean(relay_ray, s3_server, tmp_path_factory):
    """The module's 60 images, and a clean seed-0 run's split of them, made once: (root, {0: split})."""
    root = make_fashion_mnist(tmp_path_factory.mktemp("fence") / "fmnist", n_train=60, n_val=4)
    out = s3_server.uri("fence-clean", "0")
    p = subprocess.run(job_cmd(root, out, "--seed", "0"), env=relay_ray.env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return root, {0: objstore.join(out, "fashion-mnist", "train")}


@pytest.fixture
def here(s3_server, monkeypatch, tmp_path):
    """This process reads the bucket directly (not through the relay), with a fresh shard cache."""
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("INCEPTION_SHARD_CACHE", str(tmp_path / "cache"))


def clear_holds(control: Path) -> None:
    """The relay's control files of an earlier test gone: nothing held, nothing reported."""
    for f in ("hold", "held", "delivered"):
        (control / f).unlink(missing_ok=True)


def job_cmd(root: Path, out: str, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "jobs" / "shard_dataset.py"), "--source", "fashion-mnist", "--root", str(root),
            "--out", out, "--samples-per-shard", "16", "--splits", "train", "--workers", "1", *extra]


def listed_names(split_uri: str) -> list[str]:
    """The object names the split's manifest lists."""
    manifest = json.loads(objstore.read_bytes(objstore.join(split_uri, MANIFEST)))
    return [s[k] for s in manifest["shards"] for k in ("name", "index")]


def listed_objects(split_uri: str) -> dict[str, bytes]:
    """The manifest and every object it lists, by name; names (in the manifest too) without the token of
    the job that uploaded them, so two runs of the same settings compare equal."""
    manifest = json.loads(objstore.read_bytes(objstore.join(split_uri, MANIFEST)))
    tokenless = without_job_token(json.loads(dump_json(manifest)))
    pairs = zip(listed_names(split_uri), [s[k] for s in tokenless["shards"] for k in ("name", "index")], strict=True)
    return {MANIFEST: dump_json(tokenless).encode(), **{t: objstore.read_bytes(objstore.join(split_uri, n)) for n, t in pairs}}


def final_manifest_put(bucket: str) -> str:
    """The hold pattern for the PUT of the split's final manifest (a thousand bytes or more), not the
    small placeholder a job claims the split with when it starts."""
    return (rf"(?si)^PUT \S*/{bucket}/raced/fashion-mnist/train/manifest\.json[? ].*?"
            r"\n(?:x-amz-decoded-)?content-length: *\d{4}")


def run_race(env: dict, relay, root: Path, base: str, hold: str) -> tuple[subprocess.CompletedProcess, str]:
    """(A's outcome, B's split: B runs with seed 0)."""
    control = relay[1]
    clear_holds(control)
    out = f"{base}/raced"
    split = objstore.join(out, "fashion-mnist", "train")

    (control / "hold").write_text(hold)
    a = subprocess.Popen(job_cmd(root, out, "--seed", "1"), env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    stopped, frozen = False, []
    try:
        wait_until(lambda: (control / "held").exists(), 180, "job A's held request", a)
        sender = int((control / "held").read_text().split()[0])
        assert sender > 0
        # A freezes: its driver (its lease is no longer renewed) and the process that sent the request
        # (the driver itself, or the Ray worker uploading the shard)
        frozen = sorted({a.pid, sender})
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        stopped = True

        def expired():
            held = holder(objstore.join(split, LEASE_NAME))
            return held is not None and held[2] > held[0]["seconds"]

        wait_until(expired, 60, "expiry of job A's lease")
        b = subprocess.run(job_cmd(root, out, "--seed", "0", "--overwrite"), env=env, capture_output=True, text=True,
                           timeout=300)
        assert b.returncode == 0, b.stderr[-3000:]
        (control / "hold").unlink()  # A's held request goes on to the server now
        for pid in frozen:  # (the sender may still have its body to send)
            os.kill(pid, signal.SIGCONT)
        stopped = False
        wait_until(lambda: (control / "delivered").exists(), 60, "delivery of A's held request")
        stdout, stderr = a.communicate(timeout=300)
    finally:
        if stopped:
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
        (control / "hold").unlink(missing_ok=True)
        stop_group(a)
    return subprocess.CompletedProcess(a.args, a.returncode, stdout, stderr), split


def assert_winner_intact(a: subprocess.CompletedProcess, split: str, clean: str) -> None:
    assert a.returncode != 0, (a.stdout[-2000:], a.stderr[-2000:])
    assert "Traceback" not in a.stderr and a.stderr.strip().splitlines()[-1].startswith("shard_dataset: error: "), \
        a.stderr[-3000:]
    assert listed_objects(split) == listed_objects(clean)
    info = open_split(split, verify="sha256")  # a fresh node reads it
    assert info.num_samples == 60
    assert len({s["meta"]["source"] for s in iter_samples(info)}) == 60


def test_a_paused_job_s_late_shard_upload_leaves_the_new_split_intact(relay_ray, relay, s3_server, here, clean):
    """A's Ray worker is stopped as it starts the upload of shard 0's tar (after its lease check)."""
    root, splits = clean
    a, split = run_race(relay_ray.env, relay, root, s3_server.uri("fence-shard"),
                        r"^(PUT|POST) /\S*/fence-shard/raced/fashion-mnist/train/fashion-mnist-train-000000[-0-9a-f]*\.tar[? ]")
    assert_winner_intact(a, split, splits[0])


def test_a_paused_job_s_late_manifest_leaves_the_new_split_intact(relay_ray, relay, s3_server, here, clean):
    """A's driver is stopped as it sends the manifest (after its lease check)."""
    root, splits = clean
    a, split = run_race(relay_ray.env, relay, root, s3_server.uri("fence-manifest"), final_manifest_put("fence-manifest"))
    assert_winner_intact(a, split, splits[0])
    assert "manifest is not written" in a.stderr, a.stderr[-2000:]


def test_a_record_deleted_between_the_look_and_the_read_reads_as_missing(relay, s3_server, here, tmp_path):
    """A reader of a job record (another job's --overwrite deleting it meanwhile) finds the object, opens
    it, and its GET, held in flight, reaches the server after the deletion: the record reads as missing
    (None), as when the look finds nothing, not as an error."""
    control = relay[1]
    clear_holds(control)
    uri = s3_server.uri("vanishing", "train", ".parts", "job.json")
    objstore.write_bytes(uri, b'{"seed": 0}')
    (control / "hold").write_text(r"^GET /\S*/vanishing/train/\.parts/job\.json")
    env = {**env_without_aws(), **s3_server.env, "AWS_ENDPOINT_URL": relay[0], "PYTHONPATH": str(REPO)}
    reader = subprocess.Popen([sys.executable, "-c", "from pipeline.shards.storage import objstore; import sys; "
                               "print(repr(objstore.read_text(sys.argv[1])))", uri], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: (control / "held").exists(), 120, "the reader's held GET", reader)
        objstore.delete(uri)  # (directly, not through the relay)
        (control / "hold").unlink()
        out, err = reader.communicate(timeout=120)
    finally:
        (control / "hold").unlink(missing_ok=True)
        if reader.poll() is None:
            reader.kill()
    assert reader.returncode == 0 and out.strip() == "None", (out, err[-3000:])


def test_overwrite_makes_the_split_incomplete_before_anything_else(relay_ray, relay, s3_server, here, tmp_path):
    """While --overwrite removes the old part records (its first DELETE held in flight), a reader finds the
    new job's placeholder (the split reads as incomplete), never a manifest naming removed records or
    shards; once the job is done, only the objects its manifest lists are left."""
    from pipeline.shards.format import PENDING_FORMAT, ShardError

    control = relay[1]
    clear_holds(control)
    root = make_fashion_mnist(tmp_path / "fmnist", n_train=40, n_val=4)
    out = s3_server.uri("overwrite-order")
    split = objstore.join(out, "fashion-mnist", "train")
    p = subprocess.run(job_cmd(root, out), env=relay_ray.env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    old = set(listed_names(split))
    (control / "hold").write_text(r"^DELETE /\S*/overwrite-order/fashion-mnist/train/\.parts/")
    a = subprocess.Popen(job_cmd(root, out, "--seed", "1", "--overwrite"), env=relay_ray.env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_until(lambda: (control / "held").exists(), 120, "the first part record deletion", a)
        assert json.loads(objstore.read_bytes(objstore.join(split, MANIFEST)))["format"] == PENDING_FORMAT
        with pytest.raises(ShardError, match="incomplete"):
            open_split(split)
    finally:
        (control / "hold").unlink(missing_ok=True)
        stdout, stderr = a.communicate(timeout=300)
    assert a.returncode == 0, stderr[-3000:]
    assert open_split(split, verify="sha256").manifest["seed"] == 1
    left = {n for n in objstore.list_names(split) if n.endswith((".tar", ".idx"))}
    assert left == set(listed_names(split)) and not left & old


def test_a_first_writer_s_late_manifest_cannot_land_while_the_next_job_runs(relay_ray, relay, s3_server, here,
                                                                            clean):
    """A writes a split that has no manifest yet; its manifest PUT is held and A frozen past its lease. B
    takes over with other settings and --overwrite and is frozen mid-run. A's PUT reaches the server and
    A goes on while B is still running: A's manifest must not land, A must end with an error, and B must
    finish with a split byte-identical to a clean run of its settings."""
    control = relay[1]
    clear_holds(control)
    root, splits = clean
    env = relay_ray.env
    out = f"{s3_server.uri('fence-first')}/raced"
    split = objstore.join(out, "fashion-mnist", "train")

    def recorded_seed():
        text = objstore.read_text(objstore.join(split, ".parts", "job.json"))
        return json.loads(text)["seed"] if text else None

    (control / "hold").write_text(final_manifest_put("fence-first"))
    a = subprocess.Popen(job_cmd(root, out, "--seed", "1"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    b = None
    stopped: set[int] = set()
    try:
        wait_until(lambda: (control / "held").exists() and recorded_seed() == 1, 180, "job A's held manifest", a)
        sender = int((control / "held").read_text().split()[0])
        assert sender > 0
        for pid in {a.pid, sender}:
            os.kill(pid, signal.SIGSTOP)
            stopped.add(pid)

        def expired():
            held = holder(objstore.join(split, LEASE_NAME))
            return held is not None and held[2] > held[0]["seconds"]

        wait_until(expired, 60, "expiry of job A's lease")
        b = subprocess.Popen(job_cmd(root, out, "--seed", "0", "--overwrite"), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
        wait_until(lambda: recorded_seed() == 0, 120, "job B's record", b)
        os.kill(b.pid, signal.SIGSTOP)  # B's driver: mid-run, its manifest not written yet
        stopped.add(b.pid)
        manifest = objstore.read_text(objstore.join(split, MANIFEST))
        assert manifest is None or json.loads(manifest).get("job", {}).get("seed") != 0, "B finished too soon"

        (control / "hold").unlink()  # A's held request reaches the server while B runs
        for pid in {a.pid, sender}:
            os.kill(pid, signal.SIGCONT)
            stopped.discard(pid)
        wait_until(lambda: (control / "delivered").exists(), 60, "delivery of A's held request")
        a_out, a_err = a.communicate(timeout=300)
        os.kill(b.pid, signal.SIGCONT)
        stopped.discard(b.pid)
        b_out, b_err = b.communicate(timeout=300)
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        (control / "hold").unlink(missing_ok=True)
        stop_group(a)
        if b is not None:
            stop_group(b)
    assert a.returncode != 0, (a_out[-2000:], a_err[-2000:])
    assert "Traceback" not in a_err and a_err.strip().splitlines()[-1].startswith("shard_dataset: error: "), a_err[-3000:]
    assert b.returncode == 0, b_err[-3000:]
    assert listed_objects(split) == listed_objects(splits[0])
    info = open_split(split, verify="sha256")
    assert info.num_samples == 60 and info.manifest["seed"] == 0


def test_a_paused_job_s_late_shard_deletion_leaves_the_new_split_intact(relay_ray, relay, s3_server, here,
                                                                        clean):
    """The split holds a seed-1 run. A (seed 0, --overwrite) has its first deletion of a shard object held
    in flight and is frozen past its lease; B (seed 1, --overwrite: the first run's settings, the same
    bytes) takes over and finishes. Then A's deletion reaches the server and A goes on: B's split must
    stay whole, byte-identical to a clean run of its settings."""
    control = relay[1]
    clear_holds(control)
    root, _ = clean
    env = relay_ray.env
    out = f"{s3_server.uri('fence-delete')}/raced"
    p = subprocess.run(job_cmd(root, out, "--seed", "1"), env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    split = objstore.join(out, "fashion-mnist", "train")
    want = listed_objects(split)  # a clean seed-1 run's objects: what B, with the same settings, must leave

    (control / "hold").write_text(r"^DELETE /\S*/fence-delete/raced/fashion-mnist/train/fashion-mnist-train-")
    a = subprocess.Popen(job_cmd(root, out, "--seed", "0", "--overwrite"), env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    stopped: set[int] = set()
    try:
        wait_until(lambda: (control / "held").exists(), 180, "job A's held deletion", a)
        sender = int((control / "held").read_text().split()[0])
        assert sender > 0
        for pid in {a.pid, sender}:
            os.kill(pid, signal.SIGSTOP)
            stopped.add(pid)

        def expired():
            held = holder(objstore.join(split, LEASE_NAME))
            return held is not None and held[2] > held[0]["seconds"]

        wait_until(expired, 60, "expiry of job A's lease")
        b = subprocess.run(job_cmd(root, out, "--seed", "1", "--overwrite"), env=env, capture_output=True, text=True,
                           timeout=300)
        assert b.returncode == 0, b.stderr[-3000:]
        (control / "hold").unlink()  # A's held deletion reaches the server now
        for pid in set(stopped):
            os.kill(pid, signal.SIGCONT)
            stopped.discard(pid)
        wait_until(lambda: (control / "delivered").exists(), 60, "delivery of A's held deletion")
        a.communicate(timeout=300)
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        (control / "hold").unlink(missing_ok=True)
        stop_group(a)
    assert listed_objects(split) == want
    info = open_split(split, verify="sha256")
    assert info.num_samples == 60 and info.manifest["seed"] == 1
