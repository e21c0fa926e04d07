"""State a user can trust off the demo path: checkpoints in a durable place, names that stay inside
their folder, settings that cannot be mixed on resubmission, the final weights from the final epoch,
and runs that end in a true state. (The job-level checks, on a real cluster, are in test_train_e2e.py,
test_kill.py and test_e2e.py.)"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from conftest import REPO, free_port, stop_group

from pipeline.config import ConfigError, load_recipe, settings_diff, settings_digest
from pipeline.train.loop import (
    CHECKPOINT_FILE,
    MARKER_FILE,
    CheckpointError,
    _Context,
    checkpoint_markers,
    latest_state,
    write_marker,
)


def test_relative_storage_path_is_refused_inside_a_ray_job(monkeypatch, tmp_path):
    """Inside `ray job submit`, a relative path resolves into the job's temporary copy of the working
    directory: checkpoints would vanish with it, and a resubmission (a new copy) would not find them."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray's job supervisor sets for the driver
    with pytest.raises(ConfigError, match=r"ensemble.storage_path: 'runs/ray' is relative; inside a Ray job"):
        load_recipe("demo", ["data.shards=/data/shards", "ensemble.storage_path=runs/ray"])
    with pytest.raises(ConfigError, match=r"data.shards: '.run/shards/fashion-mnist' is relative"):
        load_recipe("demo")  # the recipe's own relative default, not overridden
    cfg = load_recipe("demo", ["data.shards=/data/shards"])
    assert cfg.ensemble.storage_path == str(Path.home() / "ray_results")  # the default: absolute, Ray's own
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    cfg = load_recipe("demo", ["ensemble.storage_path=runs/ray"])  # a plain process: made absolute
    assert cfg.ensemble.storage_path == str(tmp_path / "runs" / "ray")


def _example_paths(text: str) -> list[str]:
    return re.findall(r"(?:ensemble\.storage_path|data\.shards)=(\S+)", text)


def test_every_example_stores_on_a_path_its_setup_has():
    """The cluster launcher's and the RayJobs' training commands use absolute paths that exist on that
    setup: the launcher mounts /mnt/efs on every node, the RayJobs mount /data. (The docs' commands:
    test_docs.py::test_paths_given_to_jobs_in_the_docs_are_absolute.)"""
    cluster = (REPO / "ray_cluster.yaml").read_text()
    mounts = re.findall(r"-v (/\S+):", cluster)
    paths = _example_paths(cluster)
    assert paths and mounts == ["/mnt/efs"]
    assert all(p.startswith("/mnt/efs/") for p in paths), paths
    for f in sorted((REPO / "infra" / "kuberay").glob("rayjob-*.yaml")):
        spec = yaml.safe_load(f.read_text())
        entry = spec["spec"]["entrypoint"]
        mounted = {m["mountPath"] for g in [spec["spec"]["rayClusterSpec"]["headGroupSpec"]]
                   + spec["spec"]["rayClusterSpec"].get("workerGroupSpecs", [])
                   for c in g["template"]["spec"]["containers"] for m in c.get("volumeMounts", [])}
        for p in _example_paths(entry):
            assert any(p.startswith(m + "/") for m in mounted), (f.name, p, mounted)
        if "train_ensemble.py" in entry:
            assert "ensemble.storage_path=" in entry, f.name  # never the single-machine default on a cluster


@pytest.mark.parametrize("name", ["../x", "a'b", "a b", "x/y", "has.dot", "", "-lead"])
def test_ensemble_name_is_a_plain_name(name):
    with pytest.raises(ConfigError, match="ensemble.name: .* must be a plain name"):
        load_recipe("demo", [f"ensemble.name={json.dumps(name)}"])
    assert load_recipe("demo", ["ensemble.name=my_ensemble-2"]).ensemble.name == "my_ensemble-2"


def test_settings_that_change_results_are_fingerprinted_and_resources_are_not():
    base = load_recipe("demo")
    s = base.result_settings()
    for k in ("data.input_size", "data.limit_val", "model.variant", "optim.lr", "schedule.epochs", "ensemble.seed",
              "ensemble.same_init", "ensemble.replicas", "ensemble.workers_per_replica"):
        assert k in s, k
    for k in ("data.shards", "data.num_threads", "ensemble.max_concurrent", "ensemble.cpus_per_worker",
              "ensemble.gpus_per_worker", "ensemble.storage_path", "ensemble.name", "tracking.log_every"):
        assert k not in s, k
    other = load_recipe("demo", ["ensemble.max_concurrent=1", "ensemble.cpus_per_worker=2", "data.num_threads=3"])
    assert settings_digest(other.result_settings()) == settings_digest(s)
    changed = load_recipe("demo", ["schedule.epochs=9", "optim.lr=0.5"])
    assert settings_digest(changed.result_settings()) != settings_digest(s)
    assert settings_diff(s, changed.result_settings()) == ["optim.lr: 0.01 -> 0.5", "schedule.epochs: 6 -> 9"]


def _state(epoch: int, settings: str = "s1") -> dict:
    return {"epoch": epoch, "model": {"w": torch.full((2,), float(epoch))}, "settings_sha256": settings,
            "history": [{"epoch": e} for e in range(1, epoch + 1)]}


def _checkpoint(folder: Path, state: dict, marker: bool = True) -> Path:
    folder.mkdir(parents=True)
    torch.save(state, folder / CHECKPOINT_FILE)
    if marker:
        write_marker(folder, state)
    return folder


def test_final_weights_come_from_the_most_advanced_checkpoint(tmp_path):
    """Ray's controller registers checkpoints asynchronously: `fit()` may return with the previous epoch's
    as `result.checkpoint` while the final one is already in the run folder. The driver takes the most
    advanced one (the final epoch's), as resume does."""
    from ray.train import Checkpoint

    registered = Checkpoint.from_directory(str(_checkpoint(tmp_path / "registered", _state(2))))
    run_dir = tmp_path / "run"
    _checkpoint(run_dir / "checkpoint_2026-11-29_10-00-00.000000", _state(2))
    _checkpoint(run_dir / "checkpoint_2026-11-29_10-00-05.000000", _state(3))
    best = latest_state(registered, str(run_dir))
    assert best["epoch"] == 3 and torch.equal(best["model"]["w"], torch.full((2,), 3.0))
    assert latest_state(registered, None)["epoch"] == 2  # nothing newer outside Ray's record
    # a checkpoint folder cut short (no marker) is not a confirmed checkpoint of its epoch
    _checkpoint(run_dir / "checkpoint_2026-11-29_10-00-09.000000", _state(4), marker=False)
    assert [m["epoch"] for _, m in checkpoint_markers(str(run_dir))] == [3, 2]
    assert json.loads((run_dir / "checkpoint_2026-11-29_10-00-05.000000" / MARKER_FILE).read_text()) == \
        {"epoch": 3, "settings_sha256": "s1"}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_only_the_checkpoint_that_can_be_the_answer_is_read(where, tmp_path, request):
    """Resume and the final weights read the markers, then load the most advanced checkpoint that loads,
    and nothing older (on object storage each is a download of model, optimizer and average). Here the
    newest (epoch 3) is cut short and skipped; epoch 2 is taken; epoch 1 holds a pickled object that
    would be refused if it were read at all."""
    import argparse

    run_dir = tmp_path / "run"
    _checkpoint(run_dir / "checkpoint_2026-11-29_10-00-00.000000",
                {**_state(1), "args": argparse.Namespace(cmd="never read")})
    _checkpoint(run_dir / "checkpoint_2026-11-29_10-00-05.000000", _state(2))
    cut = _checkpoint(run_dir / "checkpoint_2026-11-29_10-00-09.000000", _state(3))
    (cut / CHECKPOINT_FILE).write_bytes((cut / CHECKPOINT_FILE).read_bytes()[:200])
    where_to = str(run_dir)
    if where == "s3":
        from pipeline.shards.storage import objstore

        where_to = request.getfixturevalue("s3_env").uri("latest-state", "run")
        for f in run_dir.rglob("*"):
            if f.is_file():
                objstore.write_bytes(objstore.join(where_to, *f.relative_to(run_dir).parts), f.read_bytes())
    best = latest_state(None, where_to)
    assert best["epoch"] == 2 and torch.equal(best["model"]["w"], torch.full((2,), 2.0))


def upload_run(run_dir: Path, uri: str) -> str:
    """Copy a local run folder to object storage under `uri`; returns `uri`."""
    from pipeline.shards.storage import objstore

    for f in run_dir.rglob("*"):
        if f.is_file():
            objstore.write_bytes(objstore.join(uri, *f.relative_to(run_dir).parts), f.read_bytes())
    return uri


def lossy_proxy(endpoint: str, port: int, path_text: str, action: str) -> subprocess.Popen:
    """tests/lossy_proxy.py on `port` in front of `endpoint`, acting on every GET whose path holds `path_text`."""
    return subprocess.Popen([sys.executable, str(REPO / "tests" / "lossy_proxy.py"), endpoint, str(port), "GET",
                             path_text, "all", action], stdout=subprocess.PIPE, text=True, start_new_session=True)


LATEST = ("import sys; from pipeline.train.loop import latest_state; "
          "print('resumes from epoch', latest_state(None, sys.argv[1])['epoch'])")


def test_a_storage_error_reading_the_newest_checkpoint_fails_resume_instead_of_going_back(s3_env, tmp_path):
    """The object store answers 503 to every read of the newest checkpoint (epoch 2), as an overloaded or
    failing S3 does after its own retries. Taking that for a checkpoint cut short would resume from epoch
    1: epoch 2 trained again, its metrics logged twice. Resume fails instead, naming the error (Ray Train
    then restarts the worker, within its failure budget); once the store answers, epoch 2 is taken."""
    run_dir = tmp_path / "run"
    _checkpoint(run_dir / "checkpoint_2026-11-29_10-00-00.000000", _state(1))
    _checkpoint(run_dir / "checkpoint_2026-11-29_10-00-05.000000", _state(2))
    uri = upload_run(run_dir, s3_env.uri("read-error", "run"))
    port = free_port()
    proxy = lossy_proxy(s3_env.endpoint, port, f"10-00-05.000000/{CHECKPOINT_FILE}", "503")
    try:
        assert proxy.stdout.readline().strip() == "ready"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        p = subprocess.run([sys.executable, "-c", LATEST, uri], env={**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"},
                           capture_output=True, text=True, timeout=300)
        assert p.returncode != 0 and "resumes from epoch" not in p.stdout, (p.stdout, p.stderr[-2000:])
        assert "OSError: AWS Error SLOW_DOWN during GetObject" in p.stderr, p.stderr[-2000:]
    finally:
        stop_group(proxy)
    assert proxy.stdout.read().count("503 ") >= 1
    p = subprocess.run([sys.executable, "-c", LATEST, uri], env=env, capture_output=True, text=True, timeout=300)
    assert p.stdout.strip() == "resumes from epoch 2", p.stderr[-2000:]


def test_a_checkpoint_on_object_storage_is_read_in_one_request(s3_env, tmp_path):
    """Resuming (and the driver's final weights) read a whole checkpoint from object storage: one GET for
    the file, not one per 256 KB piece of a stream (97 for this one; a demo checkpoint is ~115 MB: read
    that way from a local S3 server it took 30 s, at once 0.2 s)."""
    run_dir = tmp_path / "run"
    state = _state(3)
    state["model"]["big"] = torch.arange(6 * 2**20, dtype=torch.float32)  # (24 MB)
    _checkpoint(run_dir / "checkpoint_2026-11-29_10-00-00.000000", state)
    uri = upload_run(run_dir, s3_env.uri("one-read", "run"))
    port = free_port()
    proxy = lossy_proxy(s3_env.endpoint, port, CHECKPOINT_FILE, "pass")
    try:
        assert proxy.stdout.readline().strip() == "ready"
        env = {**os.environ, "PYTHONPATH": str(REPO), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
        p = subprocess.run([sys.executable, "-c", LATEST, uri], env=env, capture_output=True, text=True, timeout=300)
        assert p.stdout.strip() == "resumes from epoch 3", p.stderr[-2000:]
    finally:
        stop_group(proxy)
    gets = [ln for ln in proxy.stdout.read().splitlines() if ln.startswith("pass ")]
    assert len(gets) == 1, gets[:5]


def test_a_checkpoint_written_under_other_settings_is_refused(tmp_path):
    ctx = _Context(str(tmp_path))  # outside Ray Train: a local folder
    ctx.report({}, _state(2, settings="aaaa"))
    assert ctx.load("aaaa")["epoch"] == 2
    with pytest.raises(CheckpointError, match="written under other settings"):
        ctx.load("bbbb")


def test_end_runs_marks_failed_with_the_error_or_killed_when_stopped(mlflow_server):
    from pipeline.tracking import JobStopped, end_runs

    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("run-state") or client.get_experiment(client.create_experiment("run-state"))
    failed, killed = (client.create_run(exp.experiment_id).info.run_id for _ in range(2))
    assert end_runs(client, [failed], ValueError("replica 3 has no weights")) == "FAILED"
    assert end_runs(client, [killed], JobStopped("SIGTERM")) == "KILLED"
    assert client.get_run(failed).info.status == "FAILED"
    assert client.get_run(failed).data.tags["error"] == "ValueError: replica 3 has no weights"
    assert client.get_run(killed).info.status == "KILLED"


def test_checkpoints_of_other_settings_under_the_name_are_refused(tmp_path):
    """No run in MLflow (another server, or runs deleted) but checkpoints under the ensemble's name: those
    of other settings are refused before any work; those of the same settings are resumed."""
    from pipeline.train.ensemble import check_checkpoints

    cfg = load_recipe("demo", [f"ensemble.storage_path={tmp_path}", "ensemble.name=ens", "ensemble.replicas=2"])
    digest = settings_digest(cfg.result_settings())
    _checkpoint(tmp_path / "ens-replica-1" / "checkpoint_2026-11-29_10-00-00.000000", _state(2, settings=digest))
    check_checkpoints(cfg, digest)
    _checkpoint(tmp_path / "ens-replica-1" / "checkpoint_2026-11-29_10-00-09.000000", _state(3, settings="other"))
    with pytest.raises(ConfigError, match=r"ens-replica-1/checkpoint_.* holds epoch 3 of replica 1 trained with other"):
        check_checkpoints(cfg, digest)


def test_settings_check_names_fields_and_accepts_fields_added_later_at_their_default_or_dropped(mlflow_server):
    from pipeline.train.ensemble import check_same_settings

    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("run-state") or client.get_experiment(client.create_experiment("run-state"))
    settings = load_recipe("demo").result_settings()
    older = {k: v for k, v in settings.items() if k != "optim.bias_decay"}  # recorded before that field existed
    older["model.memory_layout"] = "nchw"  # ... and with one no longer fingerprinted
    run = client.create_run(exp.experiment_id, tags={"settings": json.dumps(older),
                                                     "settings_sha256": settings_digest(older)})
    check_same_settings(client.get_run(run.info.run_id), settings, "ens")  # at its default: the same settings
    with pytest.raises(ConfigError, match=r"optim.bias_decay: <unset> -> False; optim.lr: 0.01 -> 0.2"):
        check_same_settings(client.get_run(run.info.run_id),
                            {**settings, "optim.bias_decay": False, "optim.lr": 0.2}, "ens")


def test_a_dry_run_refuses_what_the_run_would_refuse_without_writing(mlflow_server, tmp_path):
    from pipeline.train.ensemble import check_resubmission

    client = mlflow.MlflowClient(mlflow_server)
    cfg = load_recipe("demo", [f"ensemble.storage_path={tmp_path}", "ensemble.name=dry-ens",
                               "tracking.experiment=run-state-dry"])
    settings = cfg.result_settings()
    check_resubmission(client, cfg, settings)  # no experiment yet: nothing to refuse, nothing created
    assert client.get_experiment_by_name("run-state-dry") is None
    exp = client.create_experiment("run-state-dry")
    client.create_run(exp, tags={"ensemble": "dry-ens", "kind": "ensemble", "settings": json.dumps(settings),
                                 "settings_sha256": settings_digest(settings)})
    check_resubmission(client, cfg, settings)
    with pytest.raises(ConfigError, match=r"schedule.epochs: 6 -> 2"):
        check_resubmission(client, cfg, {**settings, "schedule.epochs": 2})
    assert len(client.search_runs([exp])) == 1


def test_the_fingerprint_holds_the_learning_rate_training_uses():
    """optim.lr at a reference batch is the same learning rate as the scaled optim.lr alone: an ensemble
    recorded either way resumes under the other; another effective rate is another ensemble."""
    plain = load_recipe("demo", ["optim.lr=0.02"]).result_settings()
    scaled = load_recipe("demo", ["optim.lr=0.04", "optim.reference_batch=128"]).result_settings()  # 64 x 1 worker
    assert "optim.reference_batch" not in scaled and scaled["optim.lr"] == pytest.approx(0.02)
    assert settings_diff(plain, scaled) == []
    assert settings_diff(plain, load_recipe("demo", ["optim.lr=0.04"]).result_settings()) == ["optim.lr: 0.02 -> 0.04"]


def test_a_tracking_server_down_past_the_limit_is_one_clear_error(monkeypatch):
    """Rank 0's logger against an address where no server listens: it retries for
    INCEPTION_TRACKING_WAIT_S seconds, then fails with one line naming the server, the limit and what
    to do; an error that is not about reaching the server (a refused request) is raised at once."""
    from pipeline.tracking import TrackingError, tracking_unreachable
    from pipeline.train.loop import _MlflowLogger

    monkeypatch.setenv("INCEPTION_TRACKING_WAIT_S", "3")
    # what the logger sets in a training process where they are unset (restored after this test)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    uri = f"http://127.0.0.1:{free_port()}"
    logger = _MlflowLogger(uri, "0123456789abcdef")
    with pytest.raises(TrackingError) as e:
        logger.log_steps({"train/step_loss": 1.0}, step=1)
    assert str(e.value).startswith(f"MLflow at {uri} could not be reached for 3 s (INCEPTION_TRACKING_WAIT_S); the "
                                   "checkpoints are intact: run the same command again") and "\n" not in str(e.value)
    assert "(last error: " in str(e.value) and "Max retries exceeded" in str(e.value)
    assert not tracking_unreachable(ValueError("RESOURCE_DOES_NOT_EXIST: run 0123 not found"))


def test_the_fingerprint_holds_what_changes_training_and_nothing_that_does_not(mlflow_server):
    """Equal training, equal fingerprint: the step schedule's lr_decay/decay_every under the cosine schedule
    and model.dropout None vs the variant's own value are no change, also against settings recorded before
    (dropout None, the unused decay fields). What does change numerics or the data is in it: bf16 on GPU
    workers vs fp32 on CPU ones (ensemble.gpus_per_worker), DALI on the GPU vs the CPU (data.device)."""
    from mlflow.entities import Param

    from pipeline.train.ensemble import check_same_settings

    cosine = load_recipe("demo", ["schedule.shape=cosine"])
    same = load_recipe("demo", ["schedule.shape=cosine", "schedule.lr_decay=0.5", "schedule.decay_every=2"])
    assert settings_digest(same.result_settings()) == settings_digest(cosine.result_settings())
    step = load_recipe("demo", ["schedule.shape=step"])
    assert settings_diff(step.result_settings(), load_recipe("demo", ["schedule.shape=step", "schedule.lr_decay=0.5"])
                         .result_settings()) == ["schedule.lr_decay: 0.96 -> 0.5"]
    for variant, p in (("paper", 0.4), ("bn", 0.2)):
        unset = load_recipe("demo", [f"model.variant={variant}", "model.dropout=null"])
        assert settings_digest(unset.result_settings()) == \
            settings_digest(load_recipe("demo", [f"model.variant={variant}", f"model.dropout={p}"]).result_settings())
    assert settings_diff(load_recipe("demo", ["model.variant=paper", "model.dropout=null"]).result_settings(),
                         load_recipe("demo", ["model.variant=paper", "model.dropout=0.5"]).result_settings()) == \
        ["model.dropout: 0.4 -> 0.5"]

    cpu = load_recipe("demo", ["ensemble.gpus_per_worker=0"]).result_settings()
    gpu = load_recipe("demo", ["ensemble.gpus_per_worker=1"]).result_settings()
    assert settings_diff(cpu, gpu) == ["data.device: cpu -> gpu", "model.precision: fp32 -> bf16"]
    half = load_recipe("demo", ["ensemble.gpus_per_worker=0.5"]).result_settings()
    assert settings_digest(half) == settings_digest(gpu)  # (a share of a GPU: resources, not results)
    assert settings_diff(gpu, load_recipe("demo", ["ensemble.gpus_per_worker=1", "data.device=cpu"])
                         .result_settings()) == ["data.device: gpu -> cpu"]

    # recorded by an earlier version: dropout None and the unused decay fields, no precision/device fields
    recorded = {**{k: v for k, v in cosine.result_settings().items() if k not in ("model.precision", "data.device")},
                "model.dropout": None, "schedule.lr_decay": 0.96, "schedule.decay_every": 8}
    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("run-state") or client.get_experiment(client.create_experiment("run-state"))
    run = client.get_run(client.create_run(exp.experiment_id, tags={
        "settings": json.dumps(recorded), "settings_sha256": settings_digest(recorded)}).info.run_id)
    check_same_settings(run, same.result_settings(), "ens")  # no difference
    with pytest.raises(ConfigError, match=r"model.dropout: 0.2 -> 0.3"):
        check_same_settings(run, load_recipe("demo", ["schedule.shape=cosine", "model.dropout=0.3"]).result_settings(),
                            "ens")
    # a GPU ensemble recorded then: its precision and DALI device come from the params it logged
    on_gpu = load_recipe("demo", ["schedule.shape=cosine", "ensemble.gpus_per_worker=1"])
    recorded_gpu = {k: v for k, v in on_gpu.result_settings().items() if k not in ("model.precision", "data.device")}
    run = client.get_run(client.create_run(exp.experiment_id, tags={
        "settings": json.dumps(recorded_gpu), "settings_sha256": settings_digest(recorded_gpu)}).info.run_id)
    client.log_batch(run.info.run_id, params=[Param("ensemble.gpus_per_worker", "1"), Param("data.device", "auto")])
    run = client.get_run(run.info.run_id)
    check_same_settings(run, on_gpu.result_settings(), "ens")
    with pytest.raises(ConfigError, match=r"data.device: gpu -> cpu; model.precision: bf16 -> fp32"):
        check_same_settings(run, cosine.result_settings(), "ens")


def test_the_preemption_watcher_is_off_only_where_no_node_can_be_preempted(ray_cluster):
    """Decided as each replica starts, from the nodes then: this loopback cluster (one machine) turns Ray
    Train's PreemptionWatcher off; a cluster with a node on a routable address keeps it, also while an
    autoscaling cluster holds only its head (its replicas' workers may land on spot nodes started for
    them)."""
    import ray

    from pipeline.train.ensemble import quiet_train_env

    here = ray.nodes()
    assert here and all(n["NodeManagerAddress"] == "127.0.0.1" for n in here)
    assert quiet_train_env(here)["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    head_only = [{**here[0], "NodeManagerAddress": "10.0.1.17"}]
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in quiet_train_env(head_only)
    grown = here + [{**here[0], "NodeManagerAddress": "10.0.1.18", "NodeID": "other"}]
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in quiet_train_env(grown)
    gone = here + [{**here[0], "NodeManagerAddress": "10.0.1.18", "Alive": False}]
    assert quiet_train_env(gone)["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
