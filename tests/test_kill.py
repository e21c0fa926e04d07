"""Exactly-once under SIGKILL: real processes killed with real signals at the moments that hurt.

The training job runs as its own driver process (`jobs/train_ensemble.py`) on the test's Ray cluster.
The processes to kill are found the way an operator would: Ray Train workers by the lines they print
into Ray's own per-process log files (`worker-<id>-<job>-<pid>.out`, cross-checked with the state
API's live `RayTrainWorker` actors), shard tasks through the state API's running tasks. Nothing in the
product knows it is being tested. After each kill: every epoch 1..N logged exactly once per replica,
one child run per replica, every replica completed, final weights that load, one model version per
replica where the test registers models; shard output byte-identical to an unkilled run.
"""

import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import (
    BIN,
    REPO,
    free_port,
    grow_tmpfs,
    http_ok,
    make_fashion_mnist,
    mlflow_server_process,
    small_tmpfs,
)
from ray.job_submission import JobSubmissionClient

from pipeline.config import ShardConfig
from pipeline.model.googlenet import GoogLeNet
from pipeline.shards.format import PARTS_DIR
from pipeline.shards.job import run as shard

pytestmark = pytest.mark.slow
EPOCHS = 3  # (the kills land in epochs 2 and 3: a third one would only add minutes)
PER_EPOCH = ["train/loss", "train/top1_err", "val/top1_err", "val/top5_err", "train/lr", "data/images_per_s",
             "train/epoch_s", "train/images"]


@pytest.fixture(scope="module")
def shards(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("killfm")
    root = make_fashion_mnist(out / "src", n_train=1200, n_val=200)
    shard(ShardConfig(root=str(root), out=str(out / "shards"), samples_per_shard=400), log=lambda *_: None)
    return out / "shards" / "fashion-mnist"


# (the model exports of a registration cost ~10 s of CPU a replica: the tests whose faults come before it
# leave it out; the outage and node-loss tests register, and check one version per replica)
UNREGISTERED = {"tracking.register_model": "null", "tracking.register_ensemble": "null"}


def train_cmd(shards, tmp_path, name, mlflow_uri, replicas=1, **more) -> list[str]:
    sets = {"data.shards": shards, "data.limit_train": 640, "data.limit_val": 128, "data.batch_size": 64,
            "schedule.epochs": EPOCHS, "ensemble.replicas": replicas, "ensemble.max_concurrent": replicas,
            "ensemble.storage_path": tmp_path / "ray_results", "ensemble.name": name, "ensemble.max_failures": 3,
            "tracking.uri": mlflow_uri, "tracking.log_every": 2, **more}
    return [sys.executable, str(REPO / "jobs" / "train_ensemble.py"), "--recipe", "demo"] + \
        [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def start(cmd, env, log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)


def live_train_worker_pids(cluster) -> set[int]:
    from ray.util.state import list_actors

    return {a.pid for a in list_actors(cluster.dashboard_url, filters=[("class_name", "=", "RayTrainWorker"),
                                                                       ("state", "=", "ALIVE")], limit=1000)}


def actor_class_of(cluster, pid: int) -> str | None:
    """The state API's record of the actor that ran in process `pid` (asked after the kill: the kill
    must not wait for the state API). (The state API is always given its cluster: another may run here.)"""
    from ray.util.state import list_actors

    actors = list_actors(cluster.dashboard_url, filters=[("pid", "=", pid)], limit=10)
    return actors[0].class_name if actors else None


def log_sizes(cluster) -> dict[Path, int]:
    """Where each Ray worker log ends now: lines printed later are searched from there."""
    return {f: f.stat().st_size for f in cluster.worker_logs()}


def wait_for_worker_line(cluster, pattern: str, proc: subprocess.Popen, since: dict[Path, int],
                         timeout: float = 300) -> int:
    """The PID of the worker process whose Ray log file (`worker-<id>-<job>-<pid>.out`) shows, after the
    `since` snapshot, a line matching `pattern`. Only new bytes are read, every few milliseconds, so
    the caller can act within milliseconds of the line."""
    rx = re.compile(pattern)
    offsets, tails = dict(since), {}
    deadline, next_scan, files = time.monotonic() + timeout, 0.0, []
    while time.monotonic() < deadline:
        if time.monotonic() >= next_scan:  # new worker processes bring new files
            files, next_scan = cluster.worker_logs(), time.monotonic() + 0.5
        for f in files:
            try:
                size = f.stat().st_size
                if size <= offsets.get(f, 0):
                    continue
                with open(f, "rb") as fh:
                    fh.seek(offsets.get(f, 0))
                    chunk = fh.read(size - offsets.get(f, 0)).decode(errors="replace")
            except OSError:
                continue
            offsets[f] = size
            text = tails.get(f, "") + chunk
            if rx.search(text):
                return int(f.stem.rsplit("-", 1)[1])
            tails[f] = text[-500:]
        if proc.poll() is not None:
            raise AssertionError(f"the job ended (exit {proc.returncode}) before a worker printed {pattern!r}")
        time.sleep(0.003)
    raise AssertionError(f"no worker printed {pattern!r} within {timeout}s")


def finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    out = log.read_text(errors="replace")
    assert proc.returncode == 0, out[-4000:]
    return out


def steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def check_exactly_once(mlflow_uri: str, name: str, replicas: int, tmp_path: Path, registered: bool = True) -> list:
    client = mlflow.MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("inception-pipeline")
    parents = client.search_runs([exp.experiment_id], f"tags.ensemble = '{name}' and tags.kind = 'ensemble'")
    assert len(parents) == 1
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert sorted(int(c.data.tags["replica"]) for c in children) == list(range(replicas))  # one run each
    for c in children:
        for key in PER_EPOCH:
            assert steps(client, c.info.run_id, key) == list(range(1, EPOCHS + 1)), (c.info.run_name, key)
        assert c.data.tags["completed"] == "true" and c.data.tags["final_epoch"] == str(EPOCHS)
        versions = client.search_model_versions(f"name = 'googlenet-replica' and run_id = '{c.info.run_id}'")
        if registered:
            assert len(versions) == 1 and c.data.tags["registered_version"] == versions[0].version
        else:
            assert not versions and "registered_version" not in c.data.tags
        path = client.download_artifacts(c.info.run_id, "weights/polyak_state_dict.pt", str(tmp_path / c.info.run_id))
        model = GoogLeNet(10, variant="bn")
        model.load_state_dict(torch.load(path, weights_only=True))
        assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    return children


def test_worker_killed_between_epoch_line_and_checkpoint_then_mid_epoch(ray_cluster, mlflow_server, shards, tmp_path):
    """Two kills in one training. SIGKILL the worker the instant it has printed 'epoch 2/3 done': its
    checkpoint is being written and MLflow has not heard of epoch 2. Ray Train restarts the worker group;
    then SIGKILL the new worker mid-epoch 3: it resumes from epoch 2's checkpoint, no epoch retrained.
    Every epoch is logged once."""
    log, since = tmp_path / "job.log", log_sizes(ray_cluster)
    proc = start(train_cmd(shards, tmp_path, "kill-window", mlflow_server, **UNREGISTERED), ray_cluster.env, log)
    pid = wait_for_worker_line(ray_cluster, rf"replica 0 \(inception\) epoch 2/{EPOCHS} done", proc, since)
    os.kill(pid, signal.SIGKILL)
    since = log_sizes(ray_cluster)
    assert actor_class_of(ray_cluster, pid) == "RayTrainWorker"
    client = mlflow.MlflowClient(mlflow_server)
    run = client.search_runs([client.get_experiment_by_name("inception-pipeline").experiment_id],
                             "tags.ensemble = 'kill-window' and tags.kind = 'replica'")[0]
    assert 2 not in steps(client, run.info.run_id, "val/top1_err")  # killed before epoch 2 reached MLflow

    again = wait_for_worker_line(ray_cluster, rf"replica 0 \(inception\) epoch 3/{EPOCHS} step 4/10", proc, since)
    assert again != pid
    os.kill(again, signal.SIGKILL)
    assert actor_class_of(ray_cluster, again) == "RayTrainWorker"
    finish(proc, log)
    [child] = check_exactly_once(mlflow_server, "kill-window", 1, tmp_path, registered=False)
    assert child.data.tags["resumed_from_epoch"] == "2"  # from epoch 2's checkpoint: no epoch retrained


def digests(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and PARTS_DIR not in p.parts}


def test_shard_task_killed_mid_write_then_rerun(ray_cluster, tmp_path):
    """SIGKILL the worker of a running shard task while its tar is being written (a .tar.tmp file
    exists); after the job (Ray retries the task) and a rerun, the output equals an unkilled run's."""
    from conftest import write_photo_folder
    from ray.util.state import list_tasks

    # (shards of 600 photos: a task writes for a second or more, long enough to be caught at it)
    root = write_photo_folder(tmp_path / "photos", classes=4, per_class=300)
    job = [sys.executable, str(REPO / "jobs" / "shard_dataset.py"), "--source", "imagenet", "--root", str(root),
           "--splits", "train", "--samples-per-shard", "600", "--full-decode", "--workers", "2"]
    ref = tmp_path / "ref"
    subprocess.run(job + ["--out", str(ref)], check=True, env=ray_cluster.env, capture_output=True, timeout=600)
    out = tmp_path / "killed"
    log = tmp_path / "shard.log"
    proc = start(job + ["--out", str(out)], ray_cluster.env, log)
    deadline, killed = time.monotonic() + 300, None
    while killed is None and time.monotonic() < deadline and proc.poll() is None:
        if list(out.rglob("*.tar.tmp*")):
            running = [t for t in list_tasks(ray_cluster.dashboard_url, filters=[
                ("state", "=", "RUNNING"), ("func_or_class_name", "=", "write_shard")], detail=True) if t.worker_pid]
            if running:
                killed = running[0].worker_pid
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.01)
    assert killed, "no shard task was caught mid-write"
    proc.wait(600)
    if proc.returncode != 0:  # Ray could not retry it: the user reruns the same command
        subprocess.run(job + ["--out", str(out)], check=True, env=ray_cluster.env, capture_output=True, timeout=600)
    subprocess.run(job + ["--out", str(out)], check=True, env=ray_cluster.env, capture_output=True, timeout=600)
    assert digests(out) == digests(ref)
    assert not list(out.rglob("*.tmp*"))


def test_ray_job_stop_then_a_killed_driver_then_the_same_command_finishes(ray_cluster, mlflow_server, shards,
                                                                         tmp_path):
    """Two stops of a training, then the same command to the end. `ray job stop` mid-training (Ray sends
    the driver SIGTERM, then SIGKILL 3 s later): the parent run and the running replica run end KILLED,
    not RUNNING forever. The same command again resumes; its driver is SIGKILLed in the first epoch it
    trains after resuming (2 or 3: epochs take seconds here, and the stop may land after epoch 2's
    checkpoint) and Ray ends what that driver owned. The same command a third time resumes what is left
    from the checkpoint and finishes: every epoch logged once, every run FINISHED. (One replica on one
    CPU, so that an epoch lasts long enough for the stop to land in it; a replica that completed before
    a stop is the resubmission test's, in test_train_e2e.)"""
    name = "stopped-job"
    sets = train_cmd(shards, tmp_path, name, mlflow_server, **UNREGISTERED,
                     **{"ensemble.widen_tail": "false"})[2:]  # --recipe demo --set ...
    submit = [str(BIN / "ray"), "job", "submit", "--address", ray_cluster.dashboard_url, "--working-dir", str(REPO)]
    entry = ["--", "python", "jobs/train_ensemble.py", *sets]
    since = log_sizes(ray_cluster)
    proc = start(submit + ["--submission-id", f"{name}-1"] + entry, ray_cluster.env, tmp_path / "job1.log")
    wait_for_worker_line(ray_cluster, rf"replica 0 \(inception\) epoch 2/{EPOCHS} step 2/10", proc, since)
    # `ray job stop`'s request, sent from here at once (the CLI's own start takes seconds on a busy machine,
    # and epochs take seconds: the stop must land in the epoch that was running)
    assert JobSubmissionClient(ray_cluster.dashboard_url).stop_job(f"{name}-1")
    proc.wait(120)
    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("inception-pipeline")
    [parent] = client.search_runs([exp.experiment_id], f"tags.ensemble = '{name}' and tags.kind = 'ensemble'")
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert parent.info.status == "KILLED", parent.info.status
    [child] = children
    assert child.info.status == "KILLED" and "completed" not in child.data.tags, child  # (mid-epoch 2 when stopped)
    assert "stopped (SIGTERM)" in parent.data.tags["error"]

    # the same command, run as its own driver process, SIGKILLed once it has resumed and trained on
    driver_cmd = [sys.executable, str(REPO / "jobs" / "train_ensemble.py"), *sets]
    since = log_sizes(ray_cluster)
    proc = start(driver_cmd, ray_cluster.env, tmp_path / "job2.log")
    wait_for_worker_line(ray_cluster, r"replica 0 \(inception\): resuming after epoch", proc, since)
    wait_for_worker_line(ray_cluster, rf"replica 0 \(inception\) epoch [23]/{EPOCHS} step 2/10", proc, since)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 120
    while live_train_worker_pids(ray_cluster) and time.monotonic() < deadline:  # Ray reaps the driver's workers
        time.sleep(0.5)
    assert not live_train_worker_pids(ray_cluster)

    out = finish(start(submit + ["--submission-id", f"{name}-3"] + entry, ray_cluster.env, tmp_path / "job3.log"),
                 tmp_path / "job3.log")
    assert "resuming after epoch" in out or "already completed" in out
    children = check_exactly_once(mlflow_server, name, 1, tmp_path, registered=False)
    assert {c.info.status for c in children} == {"FINISHED"}
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


@pytest.fixture
def small_disk(tmp_path):
    """Room for one checkpoint of the demo model (~115 MB: weights, momentum and Polyak average), not two."""
    with small_tmpfs(tmp_path / "disk", "180m") as d:
        yield d


def server_down(stack: contextlib.ExitStack, uri: str, seconds: float, proc: subprocess.Popen, log: Path) -> None:
    """Stop the MLflow server `stack` holds (SIGTERM), keep it down `seconds`, and check that the job
    waited instead of giving up."""
    stack.close()
    assert not http_ok(f"{uri}/health")
    time.sleep(seconds)
    assert proc.poll() is None, log.read_text()[-3000:]


def test_tracking_outages_and_a_full_disk_in_one_training(ray_cluster, shards, small_disk, tmp_path):
    """Three faults in one training (one training costs minutes here), each survived:

    1. The MLflow server stops (SIGTERM, as a deploy or a database failover does) while the replica
       trains epoch 2, and starts again 6 s later on the same address and database: far longer than
       MLflow's own retries of a call (MLFLOW_HTTP_REQUEST_MAX_RETRIES=1 here). Rank 0's logging waits
       through it (retried every few seconds, up to INCEPTION_TRACKING_WAIT_S): the training pauses at its
       next log call instead of failing, and goes on soon after the server is back.
    2. Checkpoints go to a filesystem with room for one: epoch 1's is written, epoch 2's fills the disk.
       The job stops with one line naming the checkpoint folder and the cause (max_failures=0: Ray Train
       would otherwise restart the worker group, failing the same way); epoch 1's checkpoint is intact,
       and once the disk has room the same command resumes after it.
    3. The server stops again the moment that replica's training ends, before its final weights and
       model are logged, and stays down 5 s. Those calls, the driver's after them and the registrations
       wait for it under the same policy instead of failing the replica; once the server is back the job
       finishes: the replica completed with its registered version, every run FINISHED.

    Every epoch is logged exactly once, one run, one registered version."""
    port, backend = free_port(), tmp_path / "mlflow"
    backend.mkdir()
    with contextlib.ExitStack() as stack:
        uri = stack.enter_context(mlflow_server_process(backend, port=port))
        cmd = train_cmd(shards, small_disk, "faults", uri)
        log, since = tmp_path / "job1.log", log_sizes(ray_cluster)
        env = {**ray_cluster.env, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
        proc = start(cmd + ["--set", "ensemble.max_failures=0"], env, log)
        wait_for_worker_line(ray_cluster, rf"replica 0 \(inception\) epoch 2/{EPOCHS} step 2/10", proc, since)
        server_down(stack, uri, 6, proc, log)
        since = log_sizes(ray_cluster)
        up = time.monotonic()
        assert stack.enter_context(mlflow_server_process(backend, port=port)) == uri
        wait_for_worker_line(ray_cluster, r"MLflow at \S+ reached again after \d+ s; training goes on", proc, since)
        print(f"training went on {time.monotonic() - up:.0f} s after the server was started again")

        proc.wait(900)
        out = log.read_text(errors="replace")
        [last] = [ln for ln in out.splitlines() if ln.startswith("train_ensemble:")]  # (Ray's log lines interleave)
        assert proc.returncode == 1, out[-3000:]
        assert re.fullmatch(r"train_ensemble: 1 replica\(s\) failed: replica 0: CheckpointWriteError: cannot write "
                            rf"the checkpoint of epoch 2 under {re.escape(str(small_disk))}/\S+: No space left on "
                            r"device; the previous checkpoint is kept: .* run the same command again, it resumes from "
                            r"there", last), last
        grow_tmpfs(small_disk, "1g")
        log, since = tmp_path / "job2.log", log_sizes(ray_cluster)
        proc = start(cmd, {**env, "INCEPTION_TRACKING_WAIT_S": "300"}, log)
        wait_for_worker_line(ray_cluster, rf"replica 0 \(inception\): training done \({EPOCHS} epochs\)", proc, since)
        server_down(stack, uri, 5, proc, log)  # again, before the replica's final weights and model are logged
        assert stack.enter_context(mlflow_server_process(backend, port=port)) == uri
        out = finish(proc, log)
        assert "resuming after epoch 1" in out, out[-3000:]
        assert "cannot be reached; replica 0 waits for it" in out or \
            "cannot be reached; the driver waits for it" in out, out[-3000:]
        [child] = check_exactly_once(uri, "faults", 1, tmp_path)
        assert child.data.tags["resumed_from_epoch"] == "1"
        client = mlflow.MlflowClient(uri)
        parent = client.get_run(child.data.tags["mlflow.parentRunId"])
        assert parent.info.status == child.info.status == "FINISHED"
        assert [v.version for v in client.search_model_versions("name = 'googlenet-replica'")] == ["1"]
        assert {f.path for f in client.list_artifacts(child.info.run_id, "weights")} == \
            {"weights/polyak_state_dict.pt"}


def wait_for_line(log: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"ended (exit {proc.returncode}) before printing {text!r}: "
                                 f"{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not printed within {timeout}s")


def test_one_driver_per_ensemble_until_it_is_killed(ray_cluster, mlflow_server, shards, tmp_path):
    """A second driver of an ensemble that a running driver trains (a second `make demo`, a second
    `ray job submit`) is refused before it writes anything, naming the first; so is its dry run. Once
    the first driver is SIGKILLed, Ray drops its lock with it and the same command may run (its dry run
    passes). (A killed driver's ensemble resumed for real: the test above.)"""
    name = "two-drivers"
    cmd = train_cmd(shards, tmp_path, name, mlflow_server) + ["--set", "schedule.epochs=40"]  # (killed long before)
    first = start(cmd, ray_cluster.env, tmp_path / "first.log")
    try:
        wait_for_line(tmp_path / "first.log", "replica 0 (inception): starting", first)
        client = mlflow.MlflowClient(mlflow_server)
        exp = client.get_experiment_by_name("inception-pipeline")
        runs = {r.info.run_id for r in client.search_runs([exp.experiment_id], f"tags.ensemble = '{name}'")}
        for extra in ([], ["--dry-run"]):
            second = subprocess.run(cmd + extra, env=ray_cluster.env, capture_output=True, text=True, timeout=300,
                                    cwd=REPO)
            assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
            assert f"train_ensemble: error: ensemble '{name}' is being trained by another driver: Ray job" in \
                second.stderr and f"driver pid {first.pid} on" in second.stderr, second.stderr[-2000:]
        assert first.poll() is None  # the first goes on
        assert {r.info.run_id for r in client.search_runs([exp.experiment_id], f"tags.ensemble = '{name}'")} == runs
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    deadline = time.monotonic() + 120
    while True:
        again = subprocess.run(cmd + ["--dry-run"], env=ray_cluster.env, capture_output=True, text=True, timeout=300,
                               cwd=REPO)
        if again.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert again.returncode == 0, again.stderr[-2000:]


def test_interrupting_the_demo_job_script_stops_the_job(ray_cluster, tmp_path):
    """`make demo` follows each stage's Ray job through scripts/ray_job.sh: Ctrl-C there (SIGINT to the
    terminal's process group) stops the job on the cluster, not only the log tail. A job that succeeds
    exits 0, one that fails 1."""
    # (the three jobs at once: each spends most of its time waiting on Ray's job server)
    ends = [(subprocess.Popen(["bash", str(REPO / "scripts" / "ray_job.sh"), str(BIN / "ray"), ray_cluster.dashboard_url,
                               "--", "python", "-c", code], env=ray_cluster.env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True), rc)
            for code, rc in (("print('fine')", 0), ("raise SystemExit(3)", 1))]
    log = tmp_path / "submit.log"
    # Started as from a terminal, SIGINT at its default: a shell that finds SIGINT ignored when it starts
    # (this test process may have it ignored by then) cannot trap it, and Ctrl-C would not reach it at all.
    cmd = ["env", "--default-signal=INT", "bash", str(REPO / "scripts" / "ray_job.sh"), str(BIN / "ray"),
           ray_cluster.dashboard_url, "--",
           "python", "-c", "import time; print('job is running', flush=True); time.sleep(600)"]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=ray_cluster.env, cwd=tmp_path,
                                start_new_session=True)
    try:
        wait_for_line(log, "job is running", proc, timeout=180)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
        assert proc.wait(120) == 130
        for done, rc in ends:
            stdout, stderr = done.communicate(timeout=300)
            assert done.returncode == rc, stdout[-2000:] + stderr[-2000:]
    finally:
        for pid in [proc.pid] + [done.pid for done, _ in ends]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    out = log.read_text(errors="replace")
    [job_id] = re.findall(r"Stopping Ray job (\S+) \(interrupted here\)", out)
    status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", ray_cluster.dashboard_url, job_id],
                            env=ray_cluster.env, capture_output=True, text=True, timeout=120)
    assert f"Job '{job_id}' was stopped" in status.stdout + status.stderr, status.stdout + status.stderr
