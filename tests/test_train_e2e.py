"""End to end training on a real Ray cluster, a real MLflow server and DALI (CPU), on a small
Fashion-MNIST subset: runs, metrics, artifacts, resume after a failure, no retraining when done."""

import os

import mlflow
import pytest
import torch
from conftest import FASHION_MNIST_ROOT

from pipeline.config import ShardConfig, load_recipe
from pipeline.data.shard_job import run as shard
from pipeline.model.googlenet import GoogLeNet
from pipeline.train.ensemble import run_ensemble

pytestmark = pytest.mark.slow
METRICS = ["train/loss", "train/top1_err", "val/top1_err", "val/top5_err", "train/lr", "data/images_per_s",
           "train/epoch_s"]


@pytest.fixture(scope="module")
def fm_shards(ray_cluster, tmp_path_factory):
    assert (FASHION_MNIST_ROOT / "train-images-idx3-ubyte.gz").is_file(), "make install provides Fashion-MNIST"
    out = tmp_path_factory.mktemp("fm")
    shard(ShardConfig(root=str(FASHION_MNIST_ROOT), out=str(out), limit=1000, samples_per_shard=250),
          log=lambda *_: None)
    return out / "fashion-mnist"


def recipe(shards, tmp_path, name, **sets):
    base = {"data.shards": str(shards), "data.limit_train": 640, "data.limit_val": 256, "data.batch_size": 64,
            "schedule.epochs": 3, "optim.lr": 0.02, "ensemble.replicas": 2, "ensemble.max_concurrent": 2,
            "ensemble.storage_path": str(tmp_path / "ray_results"), "ensemble.name": name}
    base.update(sets)
    return load_recipe("demo", [f"{k}={v}" for k, v in base.items()])


def history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_two_replicas_runs_metrics_and_artifacts(ray_cluster, mlflow_server, fm_shards, tmp_path):
    cfg = recipe(fm_shards, tmp_path, "e2e", **{"tracking.uri": mlflow_server})
    out = run_ensemble(cfg, log=lambda *_: None)
    client = mlflow.MlflowClient(mlflow_server)
    parent = client.get_run(out["parent_run_id"])
    assert parent.data.tags["kind"] == "ensemble" and parent.info.status == "FINISHED"
    assert parent.data.params["schedule.epochs"] == "3"
    children = client.search_runs([out["experiment_id"]], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["replica-0-inception", "replica-1-inception-photometric"]
    for c in children:
        for key in METRICS:
            assert [s for s, _ in history(client, c.info.run_id, key)] == [1, 2, 3], (c.info.run_name, key)
        losses = [v for _, v in history(client, c.info.run_id, "train/loss")]
        assert losses[-1] < losses[0], (c.info.run_name, losses)
        lrs = [v for _, v in history(client, c.info.run_id, "train/lr")]
        assert lrs == pytest.approx([0.02, 0.02 * 0.96, 0.02 * 0.96**2])
        path = client.download_artifacts(c.info.run_id, "weights/polyak_state_dict.pt", str(tmp_path / c.info.run_id))
        model = GoogLeNet(10, variant="bn")
        model.load_state_dict(torch.load(path, weights_only=True))
        assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
        assert c.data.tags["completed"] == "true"
        version = client.get_model_version("googlenet-replica", c.data.tags["registered_version"])
        assert version.tags["ensemble_run_id"] == parent.info.run_id


def test_failure_resumes_from_checkpoint_and_finished_job_is_not_retrained(ray_cluster, mlflow_server, fm_shards,
                                                                            tmp_path):
    marker = tmp_path / "failed-once"
    cfg = recipe(fm_shards, tmp_path, "e2e-fault", **{"ensemble.replicas": 1, "tracking.uri": mlflow_server})
    out = run_ensemble(cfg, log=lambda *_: None, fail_once={"replica": 0, "epoch": 1, "marker": str(marker)})
    assert marker.exists()  # the failure really happened
    client = mlflow.MlflowClient(mlflow_server)
    children = client.search_runs([out["experiment_id"]], f"tags.`mlflow.parentRunId` = '{out['parent_run_id']}'")
    assert len(children) == 1  # continued, not duplicated
    child = children[0]
    assert child.data.tags["resumed_from_epoch"] == "1"  # restarted after epoch 1's checkpoint
    assert child.data.tags["final_epoch"] == "3"
    assert [s for s, _ in history(client, child.info.run_id, "train/loss")] == [1, 2, 3]
    versions = client.search_model_versions("name = 'googlenet-replica'")

    lines = []
    again = run_ensemble(recipe(fm_shards, tmp_path, "e2e-fault", **{"ensemble.replicas": 1,
                                                                      "tracking.uri": mlflow_server}), log=lines.append)
    assert again["parent_run_id"] == out["parent_run_id"]
    assert any("already completed" in line for line in lines)
    assert len(client.search_model_versions("name = 'googlenet-replica'")) == len(versions)


def test_unreachable_tracking_server_fails_before_training(ray_cluster, fm_shards, tmp_path):
    from conftest import free_port

    from pipeline.tracking import TrackingError

    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingError, match=uri):
        run_ensemble(recipe(fm_shards, tmp_path, "x", **{"tracking.uri": uri}), log=lambda *_: None)
    assert not os.path.exists(tmp_path / "ray_results")
