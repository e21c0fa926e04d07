"""What a user checks before and after a run: `--help` with each job's examples and exit status,
`--dry-run` (the resolved settings and, for training, the placement plan; nothing written to MLflow),
and every run's resolved settings (`settings.yaml`) and versions (`env.*` tags) in MLflow."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, jpeg_bytes, write_test_split

from pipeline.config import load_recipe


def _job(name, *args, env=None):
    return subprocess.run([sys.executable, str(REPO / "jobs" / f"{name}.py"), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300, cwd=REPO)


@pytest.mark.parametrize("name", ["train_ensemble", "shard_dataset", "evaluate_ensemble"])
def test_help_shows_examples_exit_status_and_each_default_once(name):
    out = _job(name, "--help").stdout
    flat = " ".join(out.split())
    assert "ray job submit --address" in out and f"python jobs/{name}.py" in out  # the examples
    assert "Exit status: 0 done, 2 bad" in flat
    assert "--dry-run" in out
    assert "(default: None)" not in flat and "(default: True)" not in flat and "(default: False)" not in flat
    assert not re.search(r"default:(?:(?! --)[^()])*\(default:", flat), "a default printed twice"


def test_train_help_lists_every_field_set_takes():
    flat = " ".join(_job("train_ensemble", "--help").stdout.split())
    for f in ("data.{shards,", "optim.{lr,", "reference_batch", "ensemble.{replicas,", "check_resources",
              "tracking.{uri,"):
        assert f in flat, f


def test_evaluate_help_says_what_no_dedup_changes():
    flat = " ".join(_job("evaluate_ensemble", "--help").stdout.split())
    assert "--no-dedup run every crop through the models" in flat and "identical crops are computed once" in flat


def _experiments(client):
    return sorted(e.name for e in client.search_experiments())


def test_shard_dry_run_writes_nothing(mlflow_server, tiny_fmnist, tmp_path):
    import mlflow

    client = mlflow.MlflowClient(mlflow_server)
    before = _experiments(client)
    p = _job("shard_dataset", "--root", str(tiny_fmnist), "--out", str(tmp_path / "out"), "--mlflow-uri", mlflow_server,
             "--experiment", "dry-shard", "--dry-run")
    assert p.returncode == 0, p.stderr
    settings = yaml.safe_load(p.stdout.split("dry run:")[0])["shard"]
    assert settings["root"] == str(tiny_fmnist) and settings["out"] == str(tmp_path / "out")
    assert settings["samples_per_shard"] == 5000 and settings["mlflow_uri"] == mlflow_server
    assert not (tmp_path / "out").exists()
    assert _experiments(client) == before
    bad = _job("shard_dataset", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "out"), "--dry-run")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "does not exist" in bad.stderr


@pytest.mark.slow
def test_train_dry_run_prints_settings_and_placement_and_writes_nothing(ray_cluster, mlflow_server, tmp_path):
    import mlflow

    shards = tmp_path / "shards"
    write_test_split(shards / "train", [jpeg_bytes((28, 28), mode="L", seed=i) for i in range(20)],
                     [i % 10 for i in range(20)], per_shard=10)
    write_test_split(shards / "val", [jpeg_bytes((28, 28), mode="L", seed=50 + i) for i in range(10)],
                     [i % 10 for i in range(10)], per_shard=10)
    client = mlflow.MlflowClient(mlflow_server)
    before = _experiments(client)
    p = _job("train_ensemble", "--recipe", "demo", "--mlflow-uri", mlflow_server, "--dry-run",
             "--set", f"data.shards={shards}", "--set", f"ensemble.storage_path={tmp_path / 'ckpt'}",
             "--set", "optim.reference_batch=32", env={"RAY_ADDRESS": ray_cluster.address})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"data.shards = {shards}" in p.stdout and "ensemble.replicas = 7" in p.stdout
    # demo: 64 per worker x 1 worker; lr 0.01 at the reference batch 32 -> 0.02
    assert "global batch = 64" in p.stdout and "effective lr = 0.02 (optim.lr 0.01 x 64 / reference batch 32)" in p.stdout
    # the test cluster: 2 CPUs, a worker takes 1: 2 replicas at once (the recipe's max_concurrent: auto; its
    # memory_per_worker, unless measured before for these shards, is measured by the first run)
    assert re.search(r"placement: 7 replica\(s\) x 1 worker\(s\) x \{CPU: 1(, memory: [\d.]+ GiB)?\}; 2 replica\(s\) "
                     r"at once on this cluster \(2 worker\(s\) fit its nodes; bound by CPUs\)\n", p.stdout), p.stdout
    assert "dry run:" in p.stdout
    assert _experiments(client) == before  # no experiment, so no run
    assert not (tmp_path / "ckpt").exists()
    # a request the cluster can never hold is refused by the dry run as by the run (exit 2, one line)
    p = _job("train_ensemble", "--recipe", "demo", "--mlflow-uri", mlflow_server, "--dry-run", "--gpus-per-worker", "1",
             "--set", f"data.shards={shards}", "--set", f"ensemble.storage_path={tmp_path / 'ckpt'}",
             env={"RAY_ADDRESS": ray_cluster.address})
    assert p.returncode == 2 and "can never run one replica" in p.stderr and p.stderr.strip().count("\n") == 0
    assert _experiments(client) == before


def test_shard_run_saves_its_settings_and_versions(ray_cluster, mlflow_server, tiny_fmnist, tmp_path):
    import mlflow
    import ray
    import torch
    import torchvision

    from pipeline.config import ShardConfig
    from pipeline.shards.job import run

    run(ShardConfig(root=str(tiny_fmnist), out=str(tmp_path), mlflow_uri=mlflow_server, experiment="shard-settings"),
        log=lambda *_: None)
    client = mlflow.MlflowClient(mlflow_server)
    (r,) = client.search_runs([client.get_experiment_by_name("shard-settings").experiment_id])
    saved = yaml.safe_load(Path(client.download_artifacts(r.info.run_id, "settings.yaml", str(tmp_path / "dl")))
                           .read_text())["shard"]
    assert saved["root"] == str(tiny_fmnist) and saved["samples_per_shard"] == 5000 and saved["splits"] == ["train", "val"]
    tags = r.data.tags
    assert tags["env.torch"] == torch.__version__ and tags["env.torchvision"] == torchvision.__version__
    assert tags["env.ray"] == ray.__version__ and tags["env.mlflow"] == mlflow.__version__
    assert tags["env.dali"].startswith("2.") and tags["env.python"] == ".".join(map(str, sys.version_info[:3]))
    assert ("env.gpu" in tags) == torch.cuda.is_available()


def test_learning_rate_follows_the_global_batch():
    paper = load_recipe("imagenet-paper")
    assert paper.global_batch == 512 and paper.effective_lr() == pytest.approx(0.16)
    half = load_recipe("imagenet-paper", ["ensemble.workers_per_replica=2"])
    assert half.global_batch == 256 and half.effective_lr() == pytest.approx(0.08)
    one_node = load_recipe("imagenet-1node")  # one GPU per replica, 256 images per step
    assert one_node.global_batch == 256 and one_node.effective_lr() == pytest.approx(0.08)
    assert load_recipe("demo").effective_lr() == 0.01  # no reference batch: optim.lr as given
    assert "optim.reference_batch" not in load_recipe("demo").result_settings()
    # the fingerprint holds the rate training uses, however it is written
    assert load_recipe("imagenet-paper").result_settings()["optim.lr"] == pytest.approx(0.16)
    assert half.result_settings()["optim.lr"] == pytest.approx(0.08)
    assert "optim.reference_batch" not in load_recipe("imagenet-paper").result_settings()
    with pytest.raises(Exception, match=r"optim\.reference_batch"):
        load_recipe("demo", ["optim.reference_batch=0"])
