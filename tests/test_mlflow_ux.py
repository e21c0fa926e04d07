"""What a user finds in MLflow after `ray job submit ... train_ensemble.py`, on a real Ray
cluster and a real MLflow server: the experiment marked as model training, datasets with their
digests and contexts, step and system metrics, job logs with each epoch line once, and the
registered `googlenet-ensemble` pyfunc, equal to the evaluation's 144-crop probabilities and served
over HTTP by `mlflow models serve`."""

import base64
import hashlib
import json
import os
import re
import subprocess
import urllib.error
import urllib.request

import mlflow
import pytest
import torch
from conftest import BIN, REPO, free_port, http_ok, jpeg_bytes, stop_group, wait_until, write_test_split

pytestmark = pytest.mark.slow
NAME = "ux-ens"


@pytest.fixture(scope="module")
def job(ray_cluster, mlflow_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ux")
    shards = tmp / "shards"
    write_test_split(shards / "train", [jpeg_bytes((28, 28), mode="L", seed=i) for i in range(192)],
                     [i % 10 for i in range(192)], per_shard=64)
    write_test_split(shards / "val", [jpeg_bytes((36, 28), mode="L", seed=900 + i) for i in range(24)],
                     [i % 10 for i in range(24)], per_shard=12)
    sets = {"data.shards": shards, "ensemble.storage_path": tmp / "ray_results", "ensemble.name": NAME,
            "ensemble.replicas": 2, "ensemble.max_concurrent": 2, "data.batch_size": 32, "data.limit_train": None,
            "data.limit_val": 16, "schedule.epochs": 2, "tracking.log_every": 2, "tracking.system_metrics_s": 1,
            "tracking.register_model": None}  # (the replicas' registration is tested in test_train_e2e)
    cmd = [str(BIN / "ray"), "job", "submit", "--address", ray_cluster.dashboard_url, "--working-dir", str(REPO),
           "--", "python", "jobs/train_ensemble.py", "--recipe", "demo", "--mlflow-uri", mlflow_server]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={'null' if v is None else v}"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=ray_cluster.env, timeout=900, cwd=REPO)
    assert p.returncode == 0, p.stdout[-5000:] + p.stderr[-3000:]
    mlflow.set_tracking_uri(mlflow_server)  # models:/ URIs below resolve on this server
    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("inception-pipeline")
    parent = client.search_runs([exp.experiment_id], f"tags.ensemble = '{NAME}' and tags.kind = 'ensemble'")[0]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' "
                                                       "and tags.kind = 'replica'")
    return {"logs": p.stdout, "shards": shards, "client": client, "exp": exp, "parent": parent,
            "children": sorted(children, key=lambda c: c.data.tags["replica"])}


def test_job_logs_show_each_epoch_line_once_and_no_ray_noise(job):
    logs = job["logs"]
    for replica, strategy in ((0, "inception"), (1, "inception-photometric")):
        for epoch in (1, 2):
            line = f"replica {replica} ({strategy}) epoch {epoch}/2 done:"
            assert logs.count(line) == 1, (line, logs.count(line))
        # 192 images / 32 = 6 steps per epoch, a progress line every 2 steps: 3 per epoch, each once
        assert len(re.findall(rf"replica {replica} \({re.escape(strategy)}\) epoch 1/2 step \d/6 ", logs)) == 3
    assert "PreemptionWatcher" not in logs and "Downloading artifacts" not in logs


def test_experiment_is_marked_as_model_training(job):
    tags = job["exp"].tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert tags["mlflow.experiment.primaryMetric.name"] == "val/top1_err"
    assert tags["mlflow.experiment.primaryMetric.greaterIsBetter"] == "false"
    assert "googlenet-ensemble" in tags["mlflow.note.content"]
    parent = job["parent"]
    assert "recipe `demo`" in parent.data.tags["mlflow.note.content"]
    assert parent.data.tags["mlflow.source.name"] == "jobs/train_ensemble.py"


def test_replica_runs_have_datasets_step_and_system_metrics(job):
    from pipeline.shards.splits import open_split

    client = job["client"]
    want = {}
    for split, context in (("train", "training"), ("val", "validation")):
        m = open_split(job["shards"] / split).manifest
        want[split] = (hashlib.sha256("\n".join(s["sha256"] for s in m["shards"]).encode()).hexdigest()[:16],
                       [context])
    assert len(job["children"]) == 2
    for c in job["children"]:
        c = client.get_run(c.info.run_id)
        inputs = {i.dataset.name.split("/")[-1]: (i.dataset.digest, [t.value for t in i.tags])
                  for i in c.inputs.dataset_inputs}
        assert inputs == want
        assert json.loads(c.inputs.dataset_inputs[0].dataset.source)["uri"].startswith(str(job["shards"]))
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "train/step_loss")]
        assert steps == [2, 4, 6, 8, 10, 12]  # every 2 steps, global step over the 2 epochs of 6
        for key in ("train/step_top1_err", "train/step_lr", "train/step_images_per_s"):
            assert len(client.get_metric_history(c.info.run_id, key)) == 6
        system = [k for k in c.data.metrics if k.startswith("system/")]
        assert "system/cpu_utilization_percentage" in system and "system/system_memory_usage_megabytes" in system
        assert c.data.tags["mlflow.note.content"].startswith(f"Replica {c.data.tags['replica']}")


@pytest.fixture(scope="module")
def ensemble_model(job):
    client, parent = job["client"], job["parent"]
    version = parent.data.tags["ensemble_model_version"]
    mv = client.get_model_version("googlenet-ensemble", version)
    assert mv.tags["ensemble_run_id"] == parent.info.run_id
    # the alias follows the newest finished ensemble: this job's, just registered
    assert client.get_model_version_by_alias("googlenet-ensemble", "latest-complete").version == version
    return f"models:/googlenet-ensemble/{version}"


def _val_images(shards, n):
    from pipeline.data.dali import read_index
    from pipeline.shards.splits import open_split

    out = []
    for s in read_index(open_split(shards / "val"))[:n]:
        with open(s.tar, "rb") as f:
            f.seek(s.jpg[0])
            out.append(f.read(s.jpg[1]))
    return out


def test_registered_ensemble_predicts_what_the_evaluation_scores(job, ensemble_model, tmp_path):
    """The pyfunc's 144-crop probabilities equal the evaluation job's path (DALIEvalLoader with
    dedup + forward_probs, mean over crops then models) on the same images and weights."""
    import pandas as pd

    from pipeline.data.dali import Normalizer
    from pipeline.data.dali_eval import DALIEvalLoader
    from pipeline.evaluate.run import forward_probs, load_replicas, unpack_eval_batch
    from pipeline.model.googlenet import inference_model

    model = mlflow.pyfunc.load_model(ensemble_model)
    sig = model.metadata.signature
    assert sig.inputs.input_names() == ["image"] and {p.name for p in sig.params} == {"crops", "top_k"}
    images = _val_images(job["shards"], 8)
    got = model.predict(pd.DataFrame({"image": images}), params={"crops": 144, "top_k": 3})
    assert list(got.columns) == ["label", "top_k_labels", "top_k_probs", "probabilities"]
    probs = torch.tensor(list(got["probabilities"]), dtype=torch.float32)

    replicas = load_replicas(job["client"], job["parent"], tmp_path)
    models = [inference_model(r.state_dict, r.num_classes, r.variant).to(memory_format=torch.channels_last)
              for r in replicas]
    norm, fmt, dev = Normalizer("cpu"), torch.channels_last, torch.device("cpu")
    ref = []
    for batch in DALIEvalLoader(job["shards"] / "val", n_crops=144, input_size=32, batch_size=4, device="cpu",
                                limit=8, dedup=True):
        x, _, inverse, b, k = unpack_eval_batch(batch, 32)
        ref.append(forward_probs(models, norm(x).contiguous(memory_format=fmt), inverse, b, k, dev, fmt).mean(2).mean(0))
    ref = torch.cat(ref)
    assert probs.shape == ref.shape == (8, 10)
    assert torch.allclose(probs, ref, atol=1e-5), (probs - ref).abs().max()
    assert got["label"].tolist() == [str(i) for i in ref.argmax(1).tolist()]
    assert all(len(t) == 3 for t in got["top_k_labels"])
    with pytest.raises(Exception, match="crops"):
        model.predict(pd.DataFrame({"image": images[:1]}), params={"crops": 7})
    with pytest.raises(Exception, match="image"):  # no image column: refused, naming it
        model.predict(pd.DataFrame({"picture": images[:1]}))


def test_mlflow_models_serve_answers_an_http_request(job, ensemble_model, mlflow_server, tmp_path):
    import pandas as pd

    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "PATH": f"{BIN}:{os.environ['PATH']}"}  # (uvicorn)
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", ensemble_model, "--env-manager", "local",
                                 "-h", "127.0.0.1", "-p", str(port), "--workers", "1"],
                                stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=tmp_path)
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/ping"), 240, "mlflow models serve", proc, log)
        images = _val_images(job["shards"], 3)
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b).decode()] for b in images]},
                "params": {"crops": 10, "top_k": 2}}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.loads(r.read())["predictions"]
        assert len(answer) == 3 and all(len(a["top_k_labels"]) == 2 for a in answer)
        local = mlflow.pyfunc.load_model(ensemble_model).predict(pd.DataFrame({"image": images}),
                                                                 params={"crops": 10, "top_k": 2})
        for a, (_, row) in zip(answer, local.iterrows(), strict=True):
            assert a["label"] == row["label"]
            assert torch.allclose(torch.tensor(a["probabilities"]), torch.tensor(row["probabilities"]), atol=1e-6)
            assert abs(sum(a["probabilities"]) - 1) < 1e-4
        # a bad row: a client error naming it, not a server error
        body["dataframe_split"]["data"][1] = [base64.b64encode(b"not an image").decode()]
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=120)
        assert e.value.code == 400, e.value.code
        assert "row 1: not a decodable image" in e.value.read().decode()
    finally:
        stop_group(proc, timeout=10)


def test_every_run_holds_its_settings_and_versions(job, mlflow_server, ray_cluster, tmp_path):
    """settings.yaml and env.* tags on the parent, each replica (versions from the rank-0 worker) and an
    evaluation; `evaluate_ensemble.py --dry-run` prints its plan and creates no run."""
    import ray
    import yaml

    from pipeline.evaluate.run import run_evaluation

    client, parent = job["client"], job["parent"]

    def saved(run_id):
        return yaml.safe_load(open(client.download_artifacts(run_id, "settings.yaml", str(tmp_path / run_id))))

    p = saved(parent.info.run_id)
    assert p["ensemble"]["name"] == NAME and p["data"]["batch_size"] == 32 and p["ensemble"]["replicas"] == 2
    for c in job["children"]:
        s = saved(c.info.run_id)
        assert s["replica"]["index"] == int(c.data.tags["replica"]) and s["replica"]["strategy"] == c.data.tags["strategy"]
        assert s["schedule"]["epochs"] == 2
    for run in [client.get_run(parent.info.run_id)] + [client.get_run(c.info.run_id) for c in job["children"]]:
        tags = run.data.tags
        assert tags["env.torch"] == torch.__version__ and tags["env.ray"] == ray.__version__, run.info.run_name
        assert tags["env.mlflow"] == mlflow.__version__ and tags["env.dali"].startswith("2.")

    def evaluations():
        return client.search_runs([job["exp"].experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' "
                                                               "and tags.kind = 'evaluation'")

    before = len(evaluations())
    p = subprocess.run([str(BIN / "python"), "jobs/evaluate_ensemble.py", "--ensemble-run", NAME, "--crops", "1",
                        "--limit", "4", "--mlflow-uri", mlflow_server, "--dry-run"],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    plan = yaml.safe_load(p.stdout.split("Settings:\n", 1)[1])["evaluation"]
    assert plan["ensemble_run"] == parent.info.run_id and plan["crops"] == [1] and plan["images"] == 4
    assert plan["offset"] == 16  # after the 16 images training validated on
    assert len(evaluations()) == before  # the dry run created nothing
    out = run_evaluation(NAME, crops=[1], limit=4, mlflow_uri=mlflow_server, log=lambda *_: None)
    run_id = out["run_id"]
    assert saved(run_id)["evaluation"] == plan  # what the dry run printed
    assert client.get_run(run_id).data.tags["env.torch"] == torch.__version__
