"""End to end training on a real Ray cluster, a real MLflow server and DALI (CPU), on a small
Fashion-MNIST subset: runs, metrics, artifacts, resume after a failure, no retraining when done."""

import os
import re
import time
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import FASHION_MNIST_ROOT

from pipeline.config import ShardConfig, load_recipe
from pipeline.model.googlenet import GoogLeNet
from pipeline.shards.job import run as shard
from pipeline.train.ensemble import run_ensemble

pytestmark = pytest.mark.slow
METRICS = ["train/loss", "train/top1_err", "val/top1_err", "val/top5_err", "train/lr", "data/images_per_s",
           "train/epoch_s", "time/data_wait_frac", "time/forward_backward_frac", "time/optimizer_frac",
           "time/polyak_frac", "time/other_frac", "time/checkpoint_s"]  # (time/*: where the step time went)


@pytest.fixture(scope="module")
def fm_shards(ray_cluster, tmp_path_factory):
    assert (FASHION_MNIST_ROOT / "train-images-idx3-ubyte.gz").is_file(), "make install provides Fashion-MNIST"
    out = tmp_path_factory.mktemp("fm")
    shard(ShardConfig(root=str(FASHION_MNIST_ROOT), out=str(out), limit=1000, samples_per_shard=250),
          log=lambda *_: None)
    return out / "fashion-mnist"


def recipe(shards, tmp_path, name, **sets):
    base = {"data.shards": str(shards), "data.limit_train": 640, "data.limit_val": 256, "data.batch_size": 64,
            "schedule.epochs": 3, "optim.lr": 0.02, "schedule.shape": "step", "schedule.warmup_epochs": 0, "ensemble.replicas": 2, "ensemble.max_concurrent": 2,
            "ensemble.storage_path": str(tmp_path / "ray_results"), "ensemble.name": name}
    base.update(sets)
    return load_recipe("demo", [f"{k}={v}" for k, v in base.items()])


# The e2e ensemble: replica 1 samples with a strategy the recipe defines (ensemble.custom_strategies)
E2E = {"ensemble.strategies": "[inception, mid-crops]",
       "ensemble.custom_strategies": "{mid-crops: {kind: area, area: [0.3, 1.0], interpolations: [linear, cubic]}}"}


def history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def trained(ray_cluster, mlflow_server, fm_shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ens")
    return run_ensemble(recipe(fm_shards, tmp, "e2e", **E2E, **{
        "tracking.uri": mlflow_server, "tracking.profile_steps": 2, "tracking.profile_replica": 1}), log=lambda *_: None)


def test_two_replicas_runs_metrics_and_artifacts(mlflow_server, trained, tmp_path):
    out = trained
    client = mlflow.MlflowClient(mlflow_server)
    parent = client.get_run(out["parent_run_id"])
    assert parent.data.tags["kind"] == "ensemble" and parent.info.status == "FINISHED"
    assert parent.data.params["schedule.epochs"] == "3"
    children = client.search_runs([out["experiment_id"]], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["replica-0-inception", "replica-1-mid-crops"]
    mid = next(c for c in children if c.data.tags["replica"] == "1")
    assert mid.data.params["strategy"] == "mid-crops" and mid.data.params["strategy.area"] == "(0.3, 1.0)"
    assert mid.data.params["strategy.interpolations"] == "('linear', 'cubic')"
    for c in children:
        for key in METRICS:
            assert [s for s, _ in history(client, c.info.run_id, key)] == [1, 2, 3], (c.info.run_name, key)
        losses = [v for _, v in history(client, c.info.run_id, "train/loss")]
        assert losses[-1] < losses[0], (c.info.run_name, losses)
        split = [history(client, c.info.run_id, f"time/{p}_frac")[-1][1]
                 for p in ("data_wait", "forward_backward", "optimizer", "polyak", "other")]
        assert sum(split) == pytest.approx(1) and split[1] > 0, split
        lrs = [v for _, v in history(client, c.info.run_id, "train/lr")]
        assert lrs == pytest.approx([0.02, 0.02 * 0.96, 0.02 * 0.96**2])
        profiled = {f.path for f in client.list_artifacts(c.info.run_id, "profile")}
        if c.data.tags["replica"] == "1":  # tracking.profile_steps=2 of replica 1: a trace to open in Perfetto
            assert profiled == {"profile/trace.json", "profile/ops.txt"}, profiled
            ops = Path(client.download_artifacts(c.info.run_id, "profile/ops.txt", str(tmp_path / "ops"))).read_text()
            assert "aten::convolution" in ops, ops[:2000]
        else:
            assert not profiled
        path = client.download_artifacts(c.info.run_id, "weights/polyak_state_dict.pt", str(tmp_path / c.info.run_id))
        model = GoogLeNet(10, variant="bn")
        model.load_state_dict(torch.load(path, weights_only=True))
        assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
        assert c.data.tags["completed"] == "true"
        version = client.get_model_version("googlenet-replica", c.data.tags["registered_version"])
        assert version.tags["ensemble_run_id"] == parent.info.run_id
    # the registered model (a torch.export program) names pinned requirements, and answers
    mlflow.set_tracking_uri(mlflow_server)  # (models:/ URIs resolve on the tracking server)
    uri = f"models:/googlenet-replica/{version.version}"
    reqs = Path(mlflow.pyfunc.get_model_dependencies(uri)).read_text().split()
    assert {r.split("==")[0] for r in reqs} == {"mlflow", "torch", "numpy"} and all("==" in r for r in reqs), reqs
    model = mlflow.pyfunc.load_model(uri)
    for batch in (1, 3):  # any batch (traced on 2)
        assert model.predict(torch.zeros(batch, 3, 32, 32).numpy()).shape == (batch, 10)


def test_finished_ensemble_resubmitted_retrains_nothing(mlflow_server, fm_shards, trained, tmp_path):
    """The same recipe again: the parent run is found, finished replicas are not retrained, and no new
    model version is registered. A completed replica whose run a stop ended KILLED (the job stopped between
    its `completed` tag and its end) is repaired to FINISHED. (Kills at the moments that hurt are in
    test_kill.py.)"""
    client = mlflow.MlflowClient(mlflow_server)
    [stopped] = [r["run_id"] for r in trained["replicas"] if r["replica"] == 1]
    client.set_terminated(stopped, status="KILLED")  # what end_runs leaves after such a stop
    client.set_tag(stopped, "error", "stopped (JobStopped: SIGTERM)")
    versions = client.search_model_versions("name = 'googlenet-replica'")
    storage = client.get_run(trained["parent_run_id"]).data.params["ensemble.storage_path"]
    lines = []
    again = run_ensemble(recipe(fm_shards, tmp_path, "e2e", **E2E, **{"tracking.uri": mlflow_server,
                                                               "ensemble.storage_path": storage}), log=lines.append)
    assert again["parent_run_id"] == trained["parent_run_id"]
    assert sum("already completed" in line for line in lines) == 2
    assert len(client.search_model_versions("name = 'googlenet-replica'")) == len(versions)
    repaired = client.get_run(stopped)
    assert repaired.info.status == "FINISHED" and "error" not in repaired.data.tags


def test_resubmission_with_other_settings_is_refused_naming_each_field(mlflow_server, fm_shards, trained, tmp_path):
    """The same ensemble name with settings that change results: refused before any work, each differing
    field named with its old and new value (it used to skip the finished replicas and resume the others
    under the new settings, silently). Other resources alone (max_concurrent) are not a difference."""
    from pipeline.config import ConfigError

    client = mlflow.MlflowClient(mlflow_server)
    runs_before = len(client.search_runs([trained["experiment_id"]], "tags.ensemble = 'e2e'"))
    storage = client.get_run(trained["parent_run_id"]).data.params["ensemble.storage_path"]  # its checkpoints too
    cfg = recipe(fm_shards, tmp_path, "e2e", **E2E, **{"tracking.uri": mlflow_server, "schedule.epochs": 4,
                                                "optim.lr": 0.05, "ensemble.max_concurrent": 1,
                                                "ensemble.storage_path": storage})
    with pytest.raises(ConfigError) as e:
        run_ensemble(cfg, log=lambda *_: None)
    msg = str(e.value)
    assert f"ensemble 'e2e' was started with other settings (MLflow run {trained['parent_run_id']})" in msg
    assert "optim.lr: 0.02 -> 0.05" in msg and "schedule.epochs: 3 -> 4" in msg
    assert "max_concurrent" not in msg and "ensemble.name" in msg
    other = {**E2E, "ensemble.custom_strategies": "{mid-crops: {kind: area, area: [0.5, 1.0]}}"}
    with pytest.raises(ConfigError, match=r"ensemble.custom_strategies.mid-crops: \{'area': \[0.3, 1.0\], .* -> "):
        run_ensemble(recipe(fm_shards, tmp_path, "e2e", **other, **{"tracking.uri": mlflow_server,
                                                                   "ensemble.storage_path": storage}), log=lambda *_: None)
    assert len(client.search_runs([trained["experiment_id"]], "tags.ensemble = 'e2e'")) == runs_before
    assert client.get_run(trained["parent_run_id"]).info.status == "FINISHED"


def test_an_ensemble_resubmitted_with_its_checkpoints_elsewhere_is_refused(mlflow_server, fm_shards, trained,
                                                                           tmp_path):
    """The same ensemble under another ensemble.storage_path would train its unfinished replicas again from
    scratch into the same MLflow runs (two trainings' metrics in one history): refused before any work,
    naming both places, in a dry run too."""
    from pipeline.config import ConfigError

    client = mlflow.MlflowClient(mlflow_server)
    parent = client.get_run(trained["parent_run_id"])
    storage = parent.data.params["ensemble.storage_path"]
    assert parent.data.tags["storage_path"] == storage
    runs_before = len(client.search_runs([trained["experiment_id"]], "tags.ensemble = 'e2e'"))
    elsewhere = tmp_path / "moved"
    for dry in (True, False):
        with pytest.raises(ConfigError) as e:
            run_ensemble(recipe(fm_shards, tmp_path, "e2e", **E2E, **{"tracking.uri": mlflow_server,
                                                              "ensemble.storage_path": elsewhere}),
                         log=lambda *_: None, dry_run=dry)
        msg = str(e.value)
        assert f"ensemble 'e2e' keeps its checkpoints under {storage}" in msg, msg
        assert f"not under ensemble.storage_path={elsewhere}" in msg and "set ensemble.name" in msg, msg
    assert not elsewhere.exists()
    assert len(client.search_runs([trained["experiment_id"]], "tags.ensemble = 'e2e'")) == runs_before
    assert client.get_run(trained["parent_run_id"]).info.status == "FINISHED"


def test_evaluation_refuses_validation_shards_training_did_not_use(mlflow_server, trained, tmp_path):
    """Regenerated shards (another seed: other images at samples [0, limit_val)) would make "the images
    after those training validated on" a false promise: refused, or scored with a loud warning and a
    tag when asked."""
    from pipeline.evaluate.run import EvaluationError, run_evaluation

    shard(ShardConfig(root=str(FASHION_MNIST_ROOT), out=str(tmp_path), limit=1000, samples_per_shard=250, seed=7,
                      splits=["val"]), log=lambda *_: None)
    other = str(tmp_path / "fashion-mnist")
    with pytest.raises(EvaluationError, match="are not those ensemble 'e2e' validated on during training"):
        run_evaluation(trained["parent_run_id"], shards=other, crops=[1], limit=8, device="cpu",
                       mlflow_uri=mlflow_server, log=lambda *_: None)
    lines = []
    r = run_evaluation(trained["parent_run_id"], shards=other, crops=[1], limit=8, device="cpu",
                       mlflow_uri=mlflow_server, log=lines.append, allow_other_shards=True)
    assert any("WARNING" in line and "validated on during training" in line for line in lines)
    run = mlflow.MlflowClient(mlflow_server).get_run(r["run_id"])
    assert run.data.tags["other_shards"] == "true" and run.info.status == "FINISHED"


def test_unreachable_tracking_server_fails_before_training(ray_cluster, fm_shards, tmp_path):
    from conftest import free_port

    from pipeline.tracking import TrackingError

    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingError, match=uri):
        run_ensemble(recipe(fm_shards, tmp_path, "x", **{"tracking.uri": uri}), log=lambda *_: None)
    assert not os.path.exists(tmp_path / "ray_results")


def test_evaluation_run_table_and_rerun_gives_identical_numbers(mlflow_server, trained, fm_shards):
    from pipeline.evaluate.run import run_evaluation

    lines = []
    a = run_evaluation(trained["parent_run_id"], limit=20, batch_size=4, workers="auto", device="cpu",
                       mlflow_uri=mlflow_server, log=lines.append)
    b = run_evaluation("e2e", limit=20, batch_size=4, workers=1, device="auto",  # no GPU in the cluster: CPU
                       mlflow_uri=mlflow_server, log=lambda *_: None)
    assert a["rows"] == b["rows"]  # and with a different number of workers
    # --workers auto: the test cluster's 2 CPUs, each task reserving a measured peak memory, as replicas do
    [plan] = [ln for ln in lines if ln.startswith("evaluate: workers: ")]
    assert re.match(r"evaluate: workers: 2 at once \(bound by CPUs\); each reserves [\d.]+ GiB \(a task peaks at "
                    r"[\d.]+ GiB, measured", plan), plan
    saved = Path(mlflow.MlflowClient(mlflow_server).download_artifacts(a["run_id"], "settings.yaml")).read_text()
    assert "workers: 2\n" in saved, saved  # the number it used, not "auto"
    assert {(r["models"], r["crops"], r["rule"]) for r in a["rows"]} == \
        {(m, c, rule) for m in (1, 2) for c in (1, 10, 144) for rule in ("mean", "max")}
    assert all(r["images"] == 20 for r in a["rows"])
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(a["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == trained["parent_run_id"]
    for m in (1, 2):
        for c in (1, 10, 144):
            for e in ("top1", "top5"):
                assert f"eval/{e}_err/models_{m}/crops_{c}" in run.data.metrics
            assert f"eval/{e}_err/models_{m}/crops_{c}/ci_lo" in run.data.metrics
    assert run.data.metrics["eval/compare/top1/2x144_vs_1x144/p_holm"] == \
        next(c["p_holm"] for c in a["comparisons"] if c["metric"] == "top1" and c["a"] == "2 models x 144 crops")
    assert all(r["top1_err_lo"] <= r["top1_err"] <= r["top1_err_hi"] for r in a["rows"])
    # the UI links the numbers to the model they describe, and the ensemble's run carries the headline
    parent = client.get_run(trained["parent_run_id"])
    assert run.data.tags["ensemble_model"] == f"models:/googlenet-ensemble/{parent.data.tags['ensemble_model_version']}"
    assert "Table 3" in run.data.tags["mlflow.note.content"]
    top = next(r for r in a["rows"] if (r["models"], r["crops"], r["rule"]) == (2, 144, "mean"))
    assert parent.data.metrics["table3/top5_err/models_2/crops_144"] == pytest.approx(top["top5_err"])
    assert [i.tags[0].value for i in client.get_run(a["run_id"]).inputs.dataset_inputs] == ["evaluation"]
    arts = {f.path for f in client.list_artifacts(a["run_id"])}
    assert {"table3.md", "table3.csv", "table3.png", "per_class_top1_err.json", "table3.json", "comparisons.csv",
            "evaluation.json"} <= arts
    assert "paper's Table 3" in a["markdown"] and "McNemar" in a["markdown"] and any("crops/s" in line for line in lines)
    # the "1 model" is replica 0, fixed in advance, and the evaluated images are not those that training
    # validated on (the first data.limit_val = 256 of the split)
    assert a["ranking"][0] == 0 and "fixed in advance" in a["selection"]
    from pipeline.data.dali import read_index
    from pipeline.shards.splits import open_split

    val_keys = [s.key for s in read_index(open_split(fm_shards / "val"))]
    assert a["offset"] == 256 and sorted(a["keys"]) == sorted(val_keys[256:276])
    assert not set(a["keys"]) & set(val_keys[:256])
    best = run_evaluation("e2e", limit=8, batch_size=4, crops=[1], device="cpu", single_model="best-val",
                          mlflow_uri=mlflow_server, log=lambda *_: None)
    assert best["ranking"][0] == min(range(2), key=lambda i: trained_val_err(client, trained, i))


def test_an_evaluation_of_one_row_has_no_comparisons_and_finishes(mlflow_server, trained):
    """All models at one crop scheme (`--models 2 --crops 1`): one row, nothing to compare; the run finishes
    with its table instead of failing after scoring every image."""
    from pipeline.evaluate.run import run_evaluation

    out = run_evaluation("e2e", models=[2], crops=[1], limit=8, batch_size=4, workers=1, device="cpu",
                         mlflow_uri=mlflow_server, log=lambda *_: None)
    assert [(r["models"], r["crops"]) for r in out["rows"]] == [(2, 1), (2, 1)]  # (rules mean and max)
    assert out["comparisons"] == [] and "No paired comparisons" in out["markdown"]
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED" and "eval/top1_err/models_2/crops_1" in run.data.metrics
    assert {"table3.md", "evaluation.json"} <= {f.path for f in client.list_artifacts(out["run_id"])}


def trained_val_err(client, trained, replica: int) -> float:
    runs = client.search_runs([trained["experiment_id"]], f"tags.replica = '{replica}' and tags.kind = 'replica' "
                              f"and tags.`mlflow.parentRunId` = '{trained['parent_run_id']}'")
    return runs[0].data.metrics["val/top1_err"]


def test_evaluation_bad_input_fails_before_work(mlflow_server, trained, tmp_path):
    from conftest import jpeg_bytes, write_test_split

    from pipeline.evaluate.run import EvaluationError, run_evaluation

    def ev(ref=trained["parent_run_id"], **kw):
        return run_evaluation(ref, limit=4, device="cpu", mlflow_uri=mlflow_server, log=lambda *_: None, **kw)

    with pytest.raises(EvaluationError, match="no MLflow run with id or ensemble name 'deadbeef'"):
        ev("deadbeef")
    client = mlflow.MlflowClient(mlflow_server)
    empty = client.create_run(trained["experiment_id"], tags={"kind": "ensemble", "ensemble": "empty"})
    with pytest.raises(EvaluationError, match="no finished replicas"):
        ev(empty.info.run_id)
    with pytest.raises(EvaluationError, match="split 'test'"):
        ev(split="test")
    three = write_test_split(tmp_path / "three" / "val", [jpeg_bytes(seed=i) for i in range(3)], [0, 1, 2])
    with pytest.raises(EvaluationError, match="predicts 10 classes but .* has 3"):
        ev(shards=str(three.parent))
    with pytest.raises(EvaluationError, match="--models"):
        ev(models=[1, 5])
    with pytest.raises(EvaluationError, match="overlap the evaluated ones"):  # selection on the scored images
        ev(single_model="best-val", offset=0)
    with pytest.raises(EvaluationError, match="--offset 5000"):
        ev(offset=5000)
    with pytest.raises(EvaluationError, match="--budget-minutes: must be positive, got 0"):
        ev(budget_minutes=0)
    with pytest.raises(EvaluationError, match="--budget-min-images: must be positive, got 0"):
        ev(budget_minutes=1, budget_min_images=0)


@pytest.fixture(scope="module")
def corrupt_shards(tmp_path_factory):
    """199 good training images and a corrupt one in the middle (a JPEG header over garbage)."""
    from conftest import jpeg_bytes, write_test_split
    from test_dali_bad_input import CORRUPT

    d = tmp_path_factory.mktemp("corrupt")
    images = [jpeg_bytes((28, 28), mode="L", seed=i) for i in range(200)]
    images[77] = CORRUPT
    write_test_split(d / "train", images, [i % 10 for i in range(200)], per_shard=50)
    write_test_split(d / "val", [jpeg_bytes((28, 28), mode="L", seed=1000 + i) for i in range(32)],
                     [i % 10 for i in range(32)])
    return d


@pytest.mark.timeout(600)
def test_replica_data_parallel_over_two_workers_with_a_corrupt_image(ray_cluster, mlflow_server, corrupt_shards,
                                                                     tmp_path):
    """DDP across a replica's 2 workers (gloo on CPU) on a split with a corrupt image mid-way: the driver
    finds it before training and both ranks leave it out, so neither ends an epoch early while the
    other waits in a gradient collective (that hung until the collective timed out), and both hold the
    same number of samples: 199 // 2 = 99 each, 3 batches of 32 per rank per epoch. Only rank 0 logs
    (one value per epoch)."""
    settings = {"ensemble.replicas": 1, "ensemble.workers_per_replica": 2, "schedule.epochs": 2,
                "tracking.uri": mlflow_server, "tracking.register_model": "null", "data.batch_size": 32,
                "data.limit_train": "null", "data.limit_val": 32}
    cfg = recipe(corrupt_shards, tmp_path, "e2e-ddp", **settings)
    lines = []
    out = run_ensemble(cfg, log=lines.append)
    client = mlflow.MlflowClient(mlflow_server)
    (child,) = client.search_runs([out["experiment_id"]], f"tags.`mlflow.parentRunId` = '{out['parent_run_id']}'")
    assert [s for s, _ in history(client, child.info.run_id, "train/loss")] == [1, 2]
    assert history(client, child.info.run_id, "train/images") == [(1, 192.0), (2, 192.0)]  # 2 ranks x 3 x 32
    assert history(client, child.info.run_id, "data/skipped_images") == [(1, 1.0), (2, 1.0)]
    assert client.get_run(out["parent_run_id"]).data.tags["corrupt_train_images"] == "1"
    assert any("1 corrupt" in line and "test-split-000001.tar:s000077" in line for line in lines)
    assert child.data.params["ensemble.workers_per_replica"] == "2" and child.data.tags["completed"] == "true"
    assert "registered_version" not in child.data.tags
    assert not client.get_run(child.info.run_id).outputs.model_outputs  # not registered: no MLflow model logged
    # the scan is cached by the split's fingerprint: the same command again does not rescan (and, its
    # replica completed, trains nothing)
    again = []
    run_ensemble(recipe(corrupt_shards, tmp_path, "e2e-ddp", **settings), log=again.append)
    assert any("1 found (cached" in line for line in again)
    assert any("already completed" in line for line in again)


def test_epoch_metrics_are_logged_once_even_when_logged_again(mlflow_server):
    """What a resumed replica does: log epochs 1-2, then (after a restart from epoch 1's checkpoint)
    epoch 2 again with other values, then backfill 1-3: MLflow keeps one value per (metric, epoch),
    the first."""
    from pipeline.train.loop import _MlflowLogger

    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("once") or client.create_experiment("once")
    exp_id = exp if isinstance(exp, str) else exp.experiment_id
    run = client.create_run(exp_id)
    log = _MlflowLogger(mlflow_server, run.info.run_id)
    assert log.log_epochs([{"epoch": 1, "a": 0.5, "b": 1.0}, {"epoch": 2, "a": 0.4, "b": 0.9}]) == [1, 2]
    assert log.log_epochs([{"epoch": 2, "a": 0.3, "b": 0.8}]) == []
    assert log.log_epochs([{"epoch": 1, "a": 9, "b": 9}, {"epoch": 2, "a": 9, "b": 9},
                           {"epoch": 3, "a": 0.2, "b": 0.7}]) == [3]
    assert history(client, run.info.run_id, "a") == [(1, 0.5), (2, 0.4), (3, 0.2)]
    assert history(client, run.info.run_id, "b") == [(1, 1.0), (2, 0.9), (3, 0.7)]


def test_system_metrics_never_reopen_a_run_the_driver_ended(mlflow_server):
    """A job stopped while Ray is still starting a replica's worker: the driver has ended the replica's run
    KILLED when the worker's rank 0 starts its system-metrics monitor. The run stays KILLED (it was set
    RUNNING again, for good, by a reopening start_run). A running replica's run gets its system metrics and
    is left RUNNING for the driver to end."""
    from pipeline.train.loop import _MlflowLogger

    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("monitor") or client.create_experiment("monitor")
    exp_id = exp if isinstance(exp, str) else exp.experiment_id
    ended, running = client.create_run(exp_id).info.run_id, client.create_run(exp_id).info.run_id
    client.set_terminated(ended, "KILLED")
    log = _MlflowLogger(mlflow_server, ended)
    log.start_system_metrics(0.2)
    time.sleep(1.0)  # (the monitor's first samples, then its look at the run)
    log.stop_system_metrics()
    assert client.get_run(ended).info.status == "KILLED"
    log = _MlflowLogger(mlflow_server, running)
    log.start_system_metrics(0.2)
    deadline = time.monotonic() + 60
    while "system/cpu_utilization_percentage" not in client.get_run(running).data.metrics:
        assert time.monotonic() < deadline, client.get_run(running).data.metrics
        time.sleep(0.2)
    log.stop_system_metrics()
    assert client.get_run(running).info.status == "RUNNING"


def test_registering_a_replica_leaves_its_run_status_to_the_driver(mlflow_server):
    """A job stopped while a finished replica's model is logged and registered: the driver has ended the
    run KILLED. The registration logs the model to that run and registers it, and leaves the run KILLED (a
    run made active for the logging was ended FINISHED: a stopped replica shown as finished); the same
    command repairs a completed replica's status (test_finished_ensemble_resubmitted_retrains_nothing)."""
    from pipeline.train.ensemble import register_replica

    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("register") or client.create_experiment("register")
    run_id = client.create_run(exp if isinstance(exp, str) else exp.experiment_id).info.run_id
    client.set_terminated(run_id, "KILLED")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2)).eval()
    version = register_replica(client, mlflow_server, run_id, "register-test", model, torch.zeros(2, 3, 2, 2).numpy(),
                               {"replica": "0"})
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.outputs.model_outputs, run
    assert client.get_model_version("register-test", version).run_id == run_id
    assert register_replica(client, mlflow_server, run_id, "register-test", model, None, {}) == version  # once


def test_a_budgeted_ensemble_is_sized_to_its_minutes_and_keeps_the_choice(mlflow_server, fm_shards, tmp_path,
                                                                           monkeypatch):
    """ensemble.budget_minutes on a real 2-CPU cluster: the warm-up measures the two replicas that run at
    once and the widened last one; a budget far too short says so and trains the floor; the choice is
    recorded on the parent run and kept by a resubmission under another budget; the third replica, alone
    in the last round, trains on both CPUs. Then a budgeted evaluation: far too short a budget scores its
    floor and says so, a generous one every image asked for."""
    from pipeline.evaluate.run import run_evaluation

    # (each warm-up round trains 2 s instead of 10: enough steps for a rate, and what is checked is the same)
    monkeypatch.setattr("pipeline.train.budget.WARMUP_S", 2.0)
    client = mlflow.MlflowClient(mlflow_server)
    sets = {"tracking.uri": mlflow_server, "ensemble.replicas": 3, "schedule.epochs": 2,
            "ensemble.budget_minutes": 0.1, "ensemble.budget_min_images": 256, "tracking.register_ensemble": "null",
            "tracking.register_model": "null", "data.limit_val": 64, "tracking.system_metrics_s": 0}
    # (no model exports: the evaluation reads the logged weights)
    lines = []
    out = run_ensemble(recipe(fm_shards, tmp_path, "budget", **sets), log=lines.append)
    text = "\n".join(lines)
    assert "budget: warm-up: 2 replica(s) train at once" in text and "then one on 2 slots' CPUs" in text, text
    assert "TOO SLOW for a meaningful result in 0.1 min" in text
    assert "data.limit_train = 128 images per epoch x 2 epochs = 256 per replica" in text
    parent = client.get_run(out["parent_run_id"])
    assert parent.data.params["data.limit_train"] == "128" and parent.data.tags["budget_limit_train"] == "128"
    assert parent.data.tags["budget_fits"] == "false" and parent.data.tags["budget_reason"].startswith("TOO SLOW")
    m = parent.data.metrics
    assert m["budget/warmup_images_per_s"] > 0 and m["budget/tail_images_per_s"] > 0 and m["budget/actual_s"] > 0
    children = client.search_runs([out["experiment_id"]], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' "
                                                          "and tags.kind = 'replica'")
    threads = {}
    for c in children:
        assert [v for _, v in history(client, c.info.run_id, "train/images")] == [128, 128], c.info.run_name
        threads[c.data.tags["replica"]] = c.data.tags["torch_threads"]
    assert threads == {"0": "1", "1": "1", "2": "2"}  # the last round's replica on both CPUs

    again = []
    sets["ensemble.budget_minutes"] = 60
    assert run_ensemble(recipe(fm_shards, tmp_path, "budget", **sets), log=again.append)["parent_run_id"] == \
        parent.info.run_id
    assert any("keeps data.limit_train = 128, chosen then; nothing is measured again" in line for line in again)
    assert sum("already completed" in line for line in again) == 3 and not any("warm-up" in line for line in again)

    short, generous = [], []
    a = run_evaluation(parent.info.run_id, limit=48, crops=[1], batch_size=4, workers=2, device="cpu",
                       mlflow_uri=mlflow_server, budget_minutes=0.01, budget_min_images=16, log=short.append)
    assert all(r["images"] == 16 for r in a["rows"]) and any("TOO SLOW" in line for line in short), short
    assert client.get_run(a["run_id"]).data.metrics["eval/images"] == 16
    assert client.get_run(a["run_id"]).data.tags["budget_reason"].startswith("TOO SLOW")
    b = run_evaluation(parent.info.run_id, limit=48, crops=[1], batch_size=4, workers=2, device="cpu",
                       mlflow_uri=mlflow_server, budget_minutes=60, budget_min_images=16, log=generous.append)
    assert all(r["images"] == 48 for r in b["rows"]) and any("48 of the 48 images fit 60 min" in line
                                                              for line in generous), generous


def test_a_failed_replica_leaves_the_widened_last_round_to_train(mlflow_server, fm_shards, tmp_path):
    """Three replicas two at a time on 2 CPUs (the demo's setup: the third alone in the last round, widened
    to both CPUs). Replica 0 cannot train: its run folder's place is taken by a file. The driver reports
    that failure, still trains replicas 1 and 2 (2 on both CPUs), ends replica 0's run FAILED with the
    reason, and raises one EnsembleError naming it."""
    from pipeline.train.ensemble import EnsembleError

    client = mlflow.MlflowClient(mlflow_server)
    storage = tmp_path / "ray_results"
    storage.mkdir()
    (storage / "widefail-replica-0").write_text("not a folder\n")
    sets = {"tracking.uri": mlflow_server, "ensemble.replicas": 3, "schedule.epochs": 1, "data.limit_train": 128,
            "data.limit_val": 64, "tracking.register_ensemble": "null", "tracking.register_model": "null",
            "tracking.system_metrics_s": 0}
    lines = []
    with pytest.raises(EnsembleError, match=r"1 replica\(s\) failed: replica 0: ") as failed:
        run_ensemble(recipe(fm_shards, tmp_path, "widefail", **sets), log=lines.append)
    text = "\n".join(lines)
    assert "replica 0 (inception): FAILED: " in text, text
    assert "replica 2 (inception-large): starting" in text and "on 2 CPUs (the 2 slots' CPUs" in text, text
    assert "replica 2 (inception-large): done, 1 epochs" in text, text
    runs = {r.data.tags["replica"]: r for r in client.search_runs(
        [mlflow.get_experiment_by_name("inception-pipeline").experiment_id],
        "tags.ensemble = 'widefail' and tags.kind = 'replica'")}
    assert runs["0"].info.status == "FAILED" and runs["0"].data.tags.get("error"), runs["0"].data.tags
    assert runs["1"].info.status == runs["2"].info.status == "FINISHED"
    assert runs["2"].data.tags["completed"] == "true" and runs["2"].data.tags["torch_threads"] == "2"
    assert "UnboundLocalError" not in str(failed.value)
