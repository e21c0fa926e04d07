"""Slow end-to-end checks: the job through `ray job submit`, the full Fashion-MNIST set with a kill
mid-run, and `make up` / `make down` on their own ports."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import BIN, FASHION_MNIST_ROOT, REPO, free_port, http_ok, make_fashion_mnist

from pipeline.shards.format import PARTS_DIR
from pipeline.shards.splits import open_split

pytestmark = pytest.mark.slow


def digests(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and PARTS_DIR not in p.parts}


def test_shard_job_through_ray_job_submit(ray_cluster, tmp_path):
    root = make_fashion_mnist(tmp_path / "fm", n_train=40, n_val=10)
    out = tmp_path / "shards"
    p = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", ray_cluster.dashboard_url,
                        "--working-dir", str(REPO), "--", "python", "jobs/shard_dataset.py",
                        "--root", str(root), "--out", str(out), "--samples-per-shard", "16"],
                       capture_output=True, text=True, env=ray_cluster.env, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "shards written under" in p.stdout and "img/s" in p.stdout
    assert open_split(out / "fashion-mnist" / "train", verify="sha256").num_samples == 40
    # a relative --out inside a submitted job would land in Ray's temporary copy: refused
    p = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", ray_cluster.dashboard_url,
                        "--working-dir", str(REPO), "--", "python", "jobs/shard_dataset.py",
                        "--root", str(root), "--out", "relative/out"],
                       capture_output=True, text=True, env=ray_cluster.env, timeout=300)
    assert p.returncode != 0 and "is relative" in p.stdout + p.stderr


def test_full_fashion_mnist_identical_after_kill_and_rerun(ray_cluster, tmp_path):
    assert (FASHION_MNIST_ROOT / "train-images-idx3-ubyte.gz").is_file(), \
        "Fashion-MNIST missing: `make install` installs Debian's dataset-fashion-mnist"
    job = [sys.executable, str(REPO / "jobs" / "shard_dataset.py"), "--root", str(FASHION_MNIST_ROOT)]
    ref = tmp_path / "ref"
    subprocess.run(job + ["--out", str(ref)], check=True, env=ray_cluster.env, capture_output=True, timeout=600)
    train = json.loads((ref / "fashion-mnist" / "train" / "manifest.json").read_text())
    val = json.loads((ref / "fashion-mnist" / "val" / "manifest.json").read_text())
    assert (train["num_samples"], val["num_samples"]) == (60000, 10000)
    for m in (train, val):
        assert sum(s["num_samples"] for s in m["shards"]) == m["num_samples"] == m["inputs_seen"]
        assert m["skipped"] == [] and m["classes"][9] == "Ankle boot"

    # same job, killed once some shards are done, then rerun: byte-identical to the reference
    out = tmp_path / "killed"
    proc = subprocess.Popen(job + ["--out", str(out), "--workers", "1"], env=ray_cluster.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    split = out / "fashion-mnist" / "train"
    deadline = time.monotonic() + 300
    while len(list(split.glob("*.tar"))) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (split / "manifest.json").exists(), "the job finished before it could be killed"
    done_before = len(list(split.glob("*.tar")))
    p = subprocess.run(job + ["--out", str(out)], env=ray_cluster.env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count(" verified ") >= done_before
    assert digests(out) == digests(ref)


def test_make_up_is_idempotent_and_down_stops_what_it_started(tmp_path, small_shards):
    """`make up` on a machine without Fashion-MNIST (an ImageNet box: the services need no dataset),
    twice: the second reuses the services; a job submitted as the docs show (no --mlflow-uri) finds
    the MLflow server; `make down` stops that running job first (its driver marks its runs KILLED while
    MLflow still answers, and exits), then Ray, then MLflow, leaving none of their processes behind."""
    import mlflow
    from ray.job_submission import JobStatus, JobSubmissionClient

    ports = {"RAY_PORT": free_port(), "RAY_DASHBOARD_PORT": free_port(), "RAY_CLIENT_PORT": free_port(),
             "RAY_AGENT_PORT": free_port(), "MLFLOW_PORT": free_port()}
    run_dir = tmp_path / "run"
    args = ["make", "-s", "-o", f"{BIN.parent}/.installed", f"RUN_DIR={run_dir}", f"VENV={BIN.parent}", "RAY_NUM_CPUS=1",
            f"FMNIST_ROOT={tmp_path / 'no-fashion-mnist'}"] + [f"{k}={v}" for k, v in ports.items()]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    try:
        up = subprocess.run(args + ["up"], cwd=REPO, capture_output=True, text=True, env=env, timeout=400)
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
        pids = {n: int((run_dir / "pids" / f"{n}.pid").read_text()) for n in ("ray", "mlflow")}
        assert http_ok(f"http://127.0.0.1:{ports['MLFLOW_PORT']}/health")
        assert http_ok(f"http://127.0.0.1:{ports['RAY_DASHBOARD_PORT']}/api/version")
        env_file = (run_dir / "services.env").read_text()
        assert f"MLFLOW_TRACKING_URI=http://127.0.0.1:{ports['MLFLOW_PORT']}" in env_file

        again = subprocess.run(args + ["up"], cwd=REPO, capture_output=True, text=True, env=env, timeout=400)
        assert again.returncode == 0 and again.stdout.count("already running") == 2
        assert {n: int((run_dir / "pids" / f"{n}.pid").read_text()) for n in ("ray", "mlflow")} == pids

        # every listening socket of the services' process groups is on loopback
        ss = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
        groups = set(pids.values())  # each service leads its own process group
        checked = 0
        for line in ss.splitlines():
            for pid in map(int, re.findall(r"pid=(\d+)", line)):
                try:
                    if os.getpgid(pid) in groups:
                        assert line.split()[3].removeprefix("[::ffff:").startswith("127.0.0.1"), line
                        checked += 1
                except ProcessLookupError:
                    pass
        assert checked >= 3  # GCS, dashboard, MLflow at least

        jobs = JobSubmissionClient(f"http://127.0.0.1:{ports['RAY_DASHBOARD_PORT']}")
        job = jobs.submit_job(entrypoint=" ".join([
            "python jobs/train_ensemble.py --recipe demo", f"--set data.shards={small_shards}",
            f"--set ensemble.storage_path={tmp_path / 'ray_results'}", "--set ensemble.name=down-test",
            "--set ensemble.replicas=1 --set schedule.epochs=50 --set data.limit_val=16 --set tracking.log_every=0"]),
            runtime_env={"working_dir": str(REPO)})

        # The replica's run is open and Ray Train is starting it: the job is in the middle of its work. (A
        # stop here may reach the worker's start, which must not reopen the run the driver ended KILLED:
        # test_train_e2e.py::test_system_metrics_never_reopen_a_run_the_driver_ended checks that directly.)
        def training():
            assert jobs.get_job_status(job) in (JobStatus.PENDING, JobStatus.RUNNING), jobs.get_job_logs(job)[-3000:]
            return "replica 0 (inception): starting" in jobs.get_job_logs(job)

        deadline = time.monotonic() + 900  # (a busy machine: Ray Train's start-up alone can take minutes)
        while not training():
            assert time.monotonic() < deadline, jobs.get_job_logs(job)[-3000:]
            time.sleep(1)
        driver = int(jobs.get_job_info(job).driver_info.pid)

        down = subprocess.run(args + ["down"], cwd=REPO, capture_output=True, text=True, env=env, timeout=180)
        assert down.returncode == 0, down.stderr
        assert f"jobs: stopping {job}" in down.stdout, down.stdout
        assert not Path(f"/proc/{driver}").exists()  # the job's driver did not outlive `make down`
        for pid in pids.values():
            assert subprocess.run(["pgrep", "-g", str(pid)], capture_output=True).returncode == 1
        assert not list((run_dir / "pids").glob("*.pid"))
        store = mlflow.MlflowClient(f"sqlite:///{run_dir}/mlflow/mlflow.db")  # the stopped server's own store
        runs = store.search_runs([store.get_experiment_by_name("inception-pipeline").experiment_id], "")
        assert sorted(r.data.tags["kind"] for r in runs) == ["ensemble", "replica"]
        assert {r.info.status for r in runs} == {"KILLED"}, [(r.info.run_name, r.info.status) for r in runs]
    finally:
        subprocess.run(args + ["down"], cwd=REPO, capture_output=True, env=env, timeout=300)
